"""proxy-chaos: faults inside the gateway under load, against a steady-state hypothesis (scenario.py)."""
