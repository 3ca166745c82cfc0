"""Number formatting shared by report sections and the terminal summary."""

from __future__ import annotations

MIB = 1024 * 1024


def mib(value: float | None) -> str:
    return "—" if value is None else f"{value / MIB:.1f} MiB"


def ms(value: float | None) -> str:
    """Whole milliseconds, or two decimals below 10 ms where the difference matters (proxy latency)."""
    if value is None:
        return "—"
    return f"{value:.2f} ms" if abs(value) < 10 else f"{value:.0f} ms"


def counts(by_kind: dict[str, int] | None) -> str:
    """Failures (or any tally) by kind as `kind: n, ...`, or "none": never a Python dict on the page."""
    return ", ".join(f"{kind}: {n}" for kind, n in (by_kind or {}).items()) or "none"
