"""A comparison directory's report.html: its comparison data (harness.compare) -> sections -> HTML.

Each module in harness/report/comparison/sections/ contributes: `ORDER: int` and
`section(comparison, run_dir) -> Section | list[Section] | None`, where `comparison` is the plain data of
`harness.compare.compute_comparison`. A section that fails shows as its error; the rest still render.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Any

from harness.compare import comparison_of
from harness.report import build_sections, environment, write_report


def _section_modules() -> tuple[list[tuple[str, ModuleType]], list[tuple[str, Exception]]]:
    from harness.report.comparison import sections as package

    modules: list[tuple[str, ModuleType]] = []
    failed: list[tuple[str, Exception]] = []
    for info in pkgutil.iter_modules(package.__path__):
        try:
            modules.append((info.name, importlib.import_module(f"{package.__name__}.{info.name}")))
        except Exception as exc:
            failed.append((info.name, exc))
    return modules, failed


def render_comparison(run_dir: Path, data: dict[str, Any]) -> Path:
    """Render run_dir/report.html of a comparison directory whose results.json is `data`."""
    comparison = comparison_of(run_dir, data)
    modules, failed = _section_modules()
    sections = build_sections(modules, failed, comparison, run_dir)
    html = environment().get_template("comparison.html.j2").render(data=data, comparison=comparison, sections=sections)
    return write_report(run_dir, html)
