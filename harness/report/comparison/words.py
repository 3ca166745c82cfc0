"""Figures and verdicts of a comparison in words, for its sections."""

from __future__ import annotations

from typing import Any

from markupsafe import Markup

from harness.metrics import ab
from harness.report.format import mib, ms

VERDICT_CLASS = {ab.SIGNIFICANT: "sig", ab.NO_DIFFERENCE: "nodiff", ab.BORDERLINE: "borderline", ab.TOO_FEW: "few"}
VERDICT_COLOR = {
    ab.SIGNIFICANT: "#c44e52",
    ab.BORDERLINE: "#d8a100",
    ab.NO_DIFFERENCE: "#55a868",
    ab.TOO_FEW: "#8c8c8c",
}
"""The forest chart's colour per verdict (the table's are in the template's CSS)."""


def value(number: float | None, unit: str) -> str:
    if number is None:
        return "—"
    return ms(number) if unit == "ms" else mib(number) if unit == "bytes" else f"{number:g} {unit}"


def signed(number: float | None, unit: str) -> str:
    if number is None:
        return "—"
    text = value(abs(number), unit)
    return ("+" if number > 0 else "-" if number < 0 else "±") + text


def span(low: float | None, high: float | None, unit: str) -> str:
    """`low to high unit`, the unit said once."""
    if low is None or high is None:
        return "—"
    low_text, high_text = value(low, unit), value(high, unit)
    suffix = " " + high_text.rsplit(" ", 1)[1] if " " in high_text else ""
    if suffix and low_text.endswith(suffix):
        low_text = low_text[: -len(suffix)]
    return f"{low_text} to {high_text}"


def interval(ci: list[float] | None, unit: str) -> str:
    if not ci:
        return ""
    return f"[{signed(ci[0], unit)}, {signed(ci[1], unit)}]"


def ratio(number: float | None, ci: list[float] | None = None) -> str:
    if number is None:
        return "—"
    return f"{number:.3g}x" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")


def p_value(p: float | None) -> str:
    if p is None:
        return "—"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def measured(result: dict[str, Any]) -> bool:
    """Both runs have samples of the figure (else there is nothing to compare)."""
    return bool(result["n_baseline"]) and bool(result["n_candidate"])


def verdict_text(result: dict[str, Any], label: str, baseline: str) -> str:
    """The verdict of `label`'s figure against the baseline's, in a few words (plain text)."""
    kind = result["verdict"]
    if not result["n_candidate"]:
        return f"not measured in {label}"
    if not result["n_baseline"]:
        return f"not measured in {baseline}"
    if kind == ab.TOO_FEW:
        return f"too few samples (n = {result['n_candidate']} vs {result['n_baseline']})"
    if kind == ab.NO_DIFFERENCE:
        return "no significant difference (within noise)"
    if kind == ab.BORDERLINE:
        return "borderline: within noise"
    return f"significant: {'higher' if (result['diff'] or 0) > 0 else 'lower'}"


def verdict_cell(result: dict[str, Any], label: str, baseline: str) -> Markup:
    """The verdict, coloured by kind (escaped HTML for a table cell)."""
    kind = VERDICT_CLASS.get(result["verdict"], "") if measured(result) else "few"
    return Markup('<span class="{}">{}</span>').format(kind, verdict_text(result, label, baseline))


LEGEND = (
    "Verdicts: significant = the interval of the difference excludes 0 and the U test's p < {alpha}; no "
    "significant difference (within noise) = the interval contains 0 and p >= {alpha}; borderline = the two "
    "disagree, so the difference is within noise as far as this data can tell; too few samples = fewer than "
    "{min_samples} on either side, so only the medians are given."
)
"""Formatted with the comparison's method."""


def conditions(run: dict[str, Any]) -> str:
    """A run's conditions in a few words: backend, accelerator, cores, N, warm-up + measured rounds (a
    scenario has no rounds)."""
    c = run["conditions"]
    parts = [f"{c.get('backend')} under {c.get('accel')}", f"{c.get('cores')} cores", f"N={c.get('sandboxes')}"]
    parts.append(f"{c.get('warmup')}+{c.get('repeat')} rounds" if c.get("repeat") is not None else str(c.get("what")))
    return ", ".join(parts)
