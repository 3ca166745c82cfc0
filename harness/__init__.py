"""blastradius: a benchmark and chaos harness for sandboxes that hold AI coding agents."""
