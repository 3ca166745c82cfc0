"""Every run against the baseline at a glance: each figure's ratio of medians with its interval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report import Section
from harness.report.charts import forest
from harness.report.comparison import words

ORDER = 5


def section(comparison: dict[str, Any], run_dir: Path) -> Section | None:
    base = comparison["baseline"]
    pairs = [
        (figure, label, result)
        for figure in comparison["figures"]
        for label, result in figure["vs_baseline"].items()
        if words.measured(result)
    ]
    if not pairs:
        return None
    result = Section(title=f"Against the baseline ({base})")
    result.notes.append(words.LEGEND.format(**comparison["method"]))
    unmeasured = [
        f"{figure['title']}: {label}"
        for figure in comparison["figures"]
        for label, ab in figure["vs_baseline"].items()
        if not words.measured(ab)
    ]
    if unmeasured:
        result.notes.append(f"Not measured on one side, so not compared: {'; '.join(unmeasured)}.")
    rows: list[list[Any]] = []
    points = []
    for figure, label, ab in pairs:
        unit = figure["unit"]
        rows.append(
            [
                figure["title"],
                label,
                words.verdict_cell(ab, label, base),
                words.value(ab["p50_candidate"], unit),
                words.value(ab["p50_baseline"], unit),
                f"{words.signed(ab['diff'], unit)} {words.interval(ab['diff_ci'], unit)}",
                words.ratio(ab["ratio"], ab["ratio_ci"]),
                words.p_value(ab["p_value"]),
            ]
        )
        if ab["ratio"] is not None and ab["ratio"] > 0:
            ci = tuple(ab["ratio_ci"]) if ab["ratio_ci"] and ab["ratio_ci"][0] > 0 else None
            points.append((f"{figure['title']}: {label}", ab["ratio"], ci, ab["verdict"]))
    if points:
        result.charts.append(
            (
                f"Each run's median over {base}'s, per figure, with its bootstrap interval (bar); 1 (dashed) is no "
                "difference. Colour: the verdict. Lower is better for every figure here.",
                forest(points, f"ratio to {base} (log scale)", f"Ratio of medians to {base}", words.VERDICT_COLOR),
            )
        )
    result.tables.append(
        (
            f"p50 of each run against {base}'s (Δ and ratio with their {comparison['method']['confidence']:.0%} "
            "intervals; each figure's own section gives its samples and conditions)",
            ["figure", "run", "verdict", "p50", f"{base} p50", "Δ p50 [interval]", "ratio [interval]", "U test"],
            rows,
        )
    )
    return result
