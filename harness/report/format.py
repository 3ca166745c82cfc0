"""Number formatting shared by report sections and the terminal summary."""

from __future__ import annotations

MIB = 1024 * 1024


def mib(value: float | None) -> str:
    return "—" if value is None else f"{value / MIB:.1f} MiB"


def ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} ms"
