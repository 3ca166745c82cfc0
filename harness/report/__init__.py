"""results.json -> report.html. Reads only the run directory, never QEMU or gateway code.

Each module in harness/report/sections/ contributes one section: `ORDER: int` and
`section(data, run_dir) -> Section | None` (None when the run has nothing for it).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from harness.results import load_results

REPORT_FILE = "report.html"


@dataclass
class Section:
    """One titled part of the report."""

    title: str
    """Heading."""
    charts: list[tuple[str, str]] = field(default_factory=list)
    """(caption, data URI) pairs."""
    tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)
    """(caption, header, rows)."""
    notes: list[str] = field(default_factory=list)
    """Plain sentences shown above the charts (conditions, caveats)."""
    anchor: str = ""
    """HTML id."""
    html: str = ""
    """Optional pre-built HTML shown after the tables (e.g. <details> evidence); the section module
    must escape everything it puts in it. Empty for sections that only use notes/charts/tables."""


def _sections(data: dict[str, Any], run_dir: Path) -> list[Section]:
    from harness.report import sections as package

    modules = [importlib.import_module(f"{package.__name__}.{info.name}")
               for info in pkgutil.iter_modules(package.__path__)]
    built = []
    for module in sorted(modules, key=lambda m: m.ORDER):
        section = module.section(data, run_dir)
        if section is not None:
            section.anchor = section.anchor or module.__name__.rsplit(".", 1)[-1]
            built.append(section)
    return built


def render_report(run_dir: Path) -> Path:
    """Render run_dir/report.html from run_dir/results.json and the raw files beside it."""
    data = load_results(run_dir)
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("harness.report", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
    )
    html = env.get_template("report.html.j2").render(data=data, sections=_sections(data, run_dir))
    path = run_dir / REPORT_FILE
    path.write_text(html)
    return path
