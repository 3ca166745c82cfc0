"""The comparison report's sections, one module each (see harness.report.comparison)."""
