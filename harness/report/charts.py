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

LEGEND_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": "small", "frameon": False}
"""Beside the axes, so a legend never hides a bar."""

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
        if series:  # a boot that recorded no phases has nothing to name
            ax.legend(**LEGEND_OUTSIDE)
        ax.tick_params(axis="x", labelrotation=60, labelsize="small")
        return to_data_uri(fig)


def grouped_bars(
    labels: list[str], series: dict[str, list[float]], ylabel: str, title: str, hline: tuple[float, str] | None = None
) -> str:
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
        ax.legend(**LEGEND_OUTSIDE)
        ax.tick_params(axis="x", labelrotation=60, labelsize="small")
        return to_data_uri(fig)


def time_series(panels: list[tuple[str, dict[str, tuple[list[float], list[float]]]]], xlabel: str, title: str) -> str:
    """Stacked panels sharing the x axis; each panel maps a series name to (xs, ys)."""
    with figure(height=2.4 * len(panels)) as fig:
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (ylabel, series) in zip(axes, panels, strict=True):
            for color, (name, (xs, ys)) in zip(PALETTE, series.items(), strict=False):
                ax.plot(xs, ys, label=name, color=color, linewidth=1.2)
            ax.set_ylabel(ylabel)
            if len(series) > 1:
                ax.legend(**LEGEND_OUTSIDE)
        axes[0].set_title(title)
        axes[-1].set_xlabel(xlabel)
        return to_data_uri(fig)


def heatmap(
    rows: list[str],
    columns: list[str],
    values: list[list[float | None]],
    title: str,
    unit: str = "",
    fmt: str = "{:.0f}",
) -> str:
    """A rows x columns matrix, each cell coloured by value and labelled with it (None: blank)."""
    import numpy as np

    grid = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    with figure(height=max(2.4, 0.55 * len(rows) + 1.4)) as fig:
        ax = fig.add_subplot()
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="OrRd", aspect="auto")
        ax.set_xticks(range(len(columns)), columns, fontsize="small")
        ax.set_yticks(range(len(rows)), rows, fontsize="small")
        ax.tick_params(axis="x", labelrotation=30)
        finite = grid[np.isfinite(grid)]
        middle = float(finite.max()) / 2 if finite.size else 0.0
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                if value is not None:
                    ax.text(
                        j,
                        i,
                        fmt.format(value),
                        ha="center",
                        va="center",
                        fontsize="small",
                        color="white" if float(value) > middle else "black",
                    )
        fig.colorbar(image, ax=ax, label=unit)
        ax.set_title(title)
        return to_data_uri(fig)


def time_series_windows(
    panels: list[tuple[str, dict[str, tuple[list[float], list[float | None]]]]],
    windows: list[tuple[float, float, str]],
    xlabel: str,
    title: str,
    hlines: dict[int, tuple[float, str]] | None = None,
) -> str:
    """Like time_series, with shaded (start, end, label) windows on every panel (fault windows)
    and an optional dashed threshold line per panel index."""
    with figure(height=2.4 * len(panels)) as fig:
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        for index, (ax, (ylabel, series)) in enumerate(zip(axes, panels, strict=True)):
            for w_index, (start, end, label) in enumerate(windows):
                ax.axvspan(
                    start,
                    end,
                    color=PALETTE[(w_index + 3) % len(PALETTE)],
                    alpha=0.15,
                    label=label if index == 0 else None,
                )
            for color, (name, (xs, ys)) in zip(PALETTE, series.items(), strict=False):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], label=name, color=color, linewidth=1.2)
            if hlines and index in hlines:
                ax.axhline(hlines[index][0], color="#c44e52", linestyle="--", linewidth=1, label=hlines[index][1])
            ax.set_ylabel(ylabel)
            if index == 0 or len(series) > 1 or (hlines and index in hlines):
                ax.legend(loc="upper right", fontsize="x-small")
        axes[0].set_title(title)
        axes[-1].set_xlabel(xlabel)
        return to_data_uri(fig)


LOG_SCALE_SPREAD = 20.0
"""Largest over smallest positive median beyond which a chart of several runs switches to a log axis."""


def wants_log(groups: list[list[float]]) -> bool:
    """True when the groups' medians are too far apart for one linear axis to show them all."""
    import statistics

    medians = [statistics.median(g) for g in groups if g]
    return bool(medians) and min(medians) > 0 and max(medians) / min(medians) > LOG_SCALE_SPREAD


def distributions(labels: list[str], groups: list[list[float]], ylabel: str, title: str) -> str:
    """One box per label (quartiles, median, whiskers to 1.5 IQR) with every sample drawn over it, jittered
    sideways; a log axis when the medians are far apart (see wants_log)."""
    import random

    jitter = random.Random(0)  # the same report for the same data
    with figure(height=max(2.8, FIGSIZE[1])) as fig:
        ax = fig.add_subplot()
        present = [(i, g) for i, g in enumerate(groups) if g]
        if present:
            ax.boxplot(
                [g for _, g in present],
                positions=[i for i, _ in present],
                widths=0.5,
                showfliers=False,
                medianprops={"color": "#222"},
            )
        for index, group in present:
            color = PALETTE[index % len(PALETTE)]
            xs = [index + jitter.uniform(-0.18, 0.18) for _ in group]
            ax.plot(xs, group, "o", color=color, alpha=0.6, markersize=4)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.6, len(labels) - 0.4)
        if wants_log(groups):
            ax.set_yscale("log")
            ylabel += " (log scale)"
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=20, labelsize="small")
        return to_data_uri(fig)


def forest(
    rows: list[tuple[str, float, tuple[float, float] | None, str]],
    xlabel: str,
    title: str,
    colors: dict[str, str],
    reference: float = 1.0,
) -> str:
    """One row per (label, estimate, interval or None, kind): a dot with its interval as a bar, coloured by
    kind, against a dashed reference line; a log axis (ratios)."""
    with figure(height=max(2.4, 0.36 * len(rows) + 1.2)) as fig:
        ax = fig.add_subplot()
        for y, (_, estimate, ci, kind) in enumerate(rows):
            color = colors.get(kind, "#555")
            if ci is not None:
                ax.plot([ci[0], ci[1]], [y, y], "-", color=color, linewidth=2.5, alpha=0.6)
            ax.plot([estimate], [y], "o", color=color, markersize=6)
        ax.axvline(reference, color="#888", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(rows)), [row[0] for row in rows], fontsize="small")
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        handles = [
            plt.Line2D([], [], marker="o", linestyle="", color=color, label=kind)
            for kind, color in colors.items()
            if any(row[3] == kind for row in rows)
        ]
        if handles:
            ax.legend(handles=handles, **LEGEND_OUTSIDE)
        return to_data_uri(fig)
