"""Scenarios: one folder per scenario under scenarios/, imported as a package by `loader`.

A folder holds:
- `__init__.py`, light: the report imports the package to reach the section in `report.py`;
- `scenario.py` with
  - `Options`, a frozen dataclass: one field per option with a type, a default and a one-line
    docstring that is its help (`invoke scenario NAME --help-options`, set with `--set key=value`),
    and an optional `validate()` raising ConfigError;
  - `create(options: Options) -> Scenario` (see `base.Scenario`);
  - optionally `needs(options, config: RunConfig) -> base.Needs`: the guest size, boot mode or image its
    sandboxes need, which the runner applies before it creates the backend;
  - optionally `sweep_leftovers() -> list[str]`, which `invoke clean` calls, and
    `terminal_summary(data) -> rich renderable`, which `invoke scenario` prints from the saved results;
- `report.py` with `ORDER` and `section(data, run_dir)`, like harness/report/sections/;
- any sibling modules it imports relatively (`from . import probes`), and its data files.
`runner` owns the supervisor, the journal and results.json; the scenario only does its steps.
"""
