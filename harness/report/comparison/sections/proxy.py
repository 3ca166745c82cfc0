"""A multi-backend bench's proxy comparison: it does not depend on the backend, so it ran once, after every
fleet was down, into the comparison directory's own results.json; shown as a single run's report shows it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report import Section
from harness.report.sections import proxy
from harness.results import load_results

ORDER = 50


def section(comparison: dict[str, Any], run_dir: Path) -> list[Section] | None:
    return proxy.section(load_results(run_dir), run_dir)
