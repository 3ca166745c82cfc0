"""density: what N clones cost the host as they diverge from their template, sharing on and off (scenario.py)."""
