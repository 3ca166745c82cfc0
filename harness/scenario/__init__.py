"""Scenarios: one folder per scenario under scenarios/, imported as a package by `loader`.

A folder holds:
- `__init__.py`, light (the report imports the package to reach its section);
- `scenario.py` with `create(options: dict) -> Scenario`, an optional `OPTIONS` dict documenting its
  flags, an optional `sweep_leftovers() -> list[str]` that `invoke clean` calls, and an optional
  `terminal_summary(data) -> rich renderable` that `invoke scenario` prints from the saved results;
- any sibling modules it imports relatively (`from . import probes`), and its data files.
`runner.run_scenario` owns the supervisor, the journal and results.json; the scenario only does its steps.
"""
