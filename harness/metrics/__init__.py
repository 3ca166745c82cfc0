"""Host-side measurement: memory and pressure sampling, percentiles."""
