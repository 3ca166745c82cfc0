"""payments-service: a memory-starved service, broken on purpose, fixed and graded (scenario.py)."""
