"""Report sections, discovered by module; see harness.report."""
