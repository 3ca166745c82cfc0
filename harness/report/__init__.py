"""results.json -> report.html. Reads only the run directory, never QEMU or gateway code.

Each module in harness/report/sections/, and each scenario folder's report.py, contributes one section:
`ORDER: int` and `section(data, run_dir) -> Section | None` (None when the run has nothing for it).
A comparison directory (results.json of kind "comparison") is rendered by harness/report/comparison/
instead, from its sections, with the same machinery.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import jinja2

from harness.results import COMPARISON_KIND, load_results

REPORT_FILE = "report.html"

SECTION_ERROR_ORDER = 1000
"""Sections that could not even be imported go last."""


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


def _section_modules() -> tuple[list[tuple[str, ModuleType]], list[tuple[str, Exception]]]:
    """(anchor, module) of every section module, and (name, error) of those that could not be imported:
    the generic ones in harness/report/sections/, then each scenario folder's report.py."""
    from harness.report import sections as package
    from harness.scenario.loader import SCENARIOS_DIR, available_scenarios, load_scenario_module

    modules: list[tuple[str, ModuleType]] = []
    failed: list[tuple[str, Exception]] = []
    generic = [(info.name, f"{package.__name__}.{info.name}") for info in pkgutil.iter_modules(package.__path__)]
    for name, qualified in generic:
        try:
            modules.append((name, importlib.import_module(qualified)))
        except Exception as exc:
            failed.append((name, exc))
    for name in available_scenarios():
        if (SCENARIOS_DIR / name / "report.py").exists():
            try:
                modules.append((name, load_scenario_module(name, "report")))
            except Exception as exc:
                failed.append((name, exc))
    return modules, failed


def _sections(data: dict[str, Any], run_dir: Path) -> list[Section]:
    """Every section module's part; one that fails is shown as its error, so the rest still render."""
    modules, failed = _section_modules()
    return build_sections(modules, failed, data, run_dir)


def build_sections(
    modules: list[tuple[str, ModuleType]], failed: list[tuple[str, Exception]], *args: Any
) -> list[Section]:
    """Each module's `section(*args)` (a Section, a list of them, or None), ordered by its ORDER; a module
    that failed to load or whose section raises is shown as its error, so the rest still render."""
    built = [
        (SECTION_ERROR_ORDER, Section(title=f"Section {name} failed to load", notes=[f"{type(exc).__name__}: {exc}"]))
        for name, exc in failed
    ]
    for anchor, module in modules:
        try:
            made = module.section(*args)
        except Exception as exc:
            made = Section(title=f"Section {anchor} failed", notes=[f"{type(exc).__name__}: {exc}"])
        parts = made if isinstance(made, list) else [made] if made is not None else []
        for index, section in enumerate(parts):
            section.anchor = section.anchor or (anchor if index == 0 else f"{anchor}-{index}")
            built.append((module.ORDER, section))
    return [section for _, section in sorted(built, key=lambda pair: pair[0])]


def environment() -> jinja2.Environment:
    """The report templates, autoescaped."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("harness.report", "templates"),
        autoescape=jinja2.select_autoescape(["html", "html.j2"]),
        undefined=jinja2.StrictUndefined,
    )


def write_report(run_dir: Path, html: str) -> Path:
    """run_dir/report.html, whole or absent: an interrupted write leaves only the staging file, never half a
    report."""
    path = run_dir / REPORT_FILE
    staged = path.with_name(f".{REPORT_FILE}.{os.getpid()}.partial")
    staged.write_text(html)
    staged.replace(path)
    return path


def render_report(run_dir: Path) -> Path:
    """Render run_dir/report.html from run_dir/results.json and the raw files beside it (a comparison's from
    its comparison data)."""
    data = load_results(run_dir)
    if data.get("kind") == COMPARISON_KIND:
        from harness.report.comparison import render_comparison

        return render_comparison(run_dir, data)
    html = environment().get_template("report.html.j2").render(data=data, sections=_sections(data, run_dir))
    return write_report(run_dir, html)
