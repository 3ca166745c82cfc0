"""matplotlib charts rendered to PNG bytes, embedded in the report as data URIs."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import contextmanager

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

FIGSIZE = (9.0, 3.6)
"""Inches; wide and short reads well in a one-column report."""

DPI = 110

PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


@contextmanager
def figure(height: float = FIGSIZE[1]) -> Iterator[Figure]:
    fig = plt.figure(figsize=(FIGSIZE[0], height), dpi=DPI)
    try:
        yield fig
    finally:
        plt.close(fig)


def to_data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def stacked_bars(labels: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> str:
    """One bar per label, its segments stacked in series order."""
    with figure() as fig:
        ax = fig.add_subplot()
        bottoms = [0.0] * len(labels)
        for color, (name, values) in zip(PALETTE, series.items(), strict=False):
            ax.bar(labels, values, bottom=bottoms, label=name, color=color)
            bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize="small", ncols=len(series))
        ax.tick_params(axis="x", labelrotation=60, labelsize="small")
        return to_data_uri(fig)


def grouped_bars(labels: list[str], series: dict[str, list[float]], ylabel: str, title: str,
                 hline: tuple[float, str] | None = None) -> str:
    """Bars side by side per label, with an optional target line."""
    with figure() as fig:
        ax = fig.add_subplot()
        width = 0.8 / max(1, len(series))
        positions = range(len(labels))
        for index, (color, (name, values)) in enumerate(zip(PALETTE, series.items(), strict=False)):
            ax.bar([p + index * width for p in positions], values, width=width, label=name, color=color)
        ax.set_xticks([p + width * (len(series) - 1) / 2 for p in positions], labels)
        if hline:
            ax.axhline(hline[0], color="#c44e52", linestyle="--", linewidth=1, label=hline[1])
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize="small")
        ax.tick_params(axis="x", labelrotation=60, labelsize="small")
        return to_data_uri(fig)


def time_series(panels: list[tuple[str, dict[str, tuple[list[float], list[float]]]]], xlabel: str,
                title: str) -> str:
    """Stacked panels sharing the x axis; each panel maps a series name to (xs, ys)."""
    with figure(height=2.4 * len(panels)) as fig:
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (ylabel, series) in zip(axes, panels, strict=True):
            for color, (name, (xs, ys)) in zip(PALETTE, series.items(), strict=False):
                ax.plot(xs, ys, label=name, color=color, linewidth=1.2)
            ax.set_ylabel(ylabel)
            if len(series) > 1:
                ax.legend(loc="upper right", fontsize="small")
        axes[0].set_title(title)
        axes[-1].set_xlabel(xlabel)
        return to_data_uri(fig)
