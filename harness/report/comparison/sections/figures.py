"""One part per figure: every run's distribution, its percentiles with their spread and conditions, and the
comparison with the baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report import Section
from harness.report.charts import distributions
from harness.report.comparison import words
from harness.report.format import MIB

ORDER = 10


def section(comparison: dict[str, Any], run_dir: Path) -> list[Section]:
    runs = {run["label"]: run for run in comparison["runs"]}
    return [_figure(figure, runs, comparison["baseline"]) for figure in comparison["figures"]]


def _figure(figure: dict[str, Any], runs: dict[str, dict[str, Any]], base: str) -> Section:
    unit = figure["unit"]
    result = Section(title=f"{figure['title']} ({'MiB' if unit == 'bytes' else unit})")
    result.notes.append(f"Samples: {figure['source']}.")
    labels = list(figure["runs"])
    scale = MIB if unit == "bytes" else 1.0
    groups = [[v / scale for v in figure["runs"][label]["samples"]] for label in labels]
    ticks = [label if group else f"{label}\n(not measured)" for label, group in zip(labels, groups, strict=True)]
    if any(groups):
        result.charts.append(
            (
                "Every sample of each run (dots), over its quartiles (box) and 1.5 IQR (whiskers).",
                distributions(ticks, groups, "MiB" if unit == "bytes" else unit, figure["title"]),
            )
        )
    percentiles = figure["percentiles"]
    header = [
        "run",
        "conditions: backend, accel, cores, N, warm-up+measured rounds",
        "boots ok",
        "n",
        *percentiles,
        "spread: IQR (p25 to p75)",
        "min to max",
        "stdev",
        f"Δ p50 vs {base} [interval]",
        "ratio [interval]",
        "U test",
        "verdict",
    ]
    rows: list[list[Any]] = []
    for label in labels:
        stats, run = figure["runs"][label], runs[label]
        ab = figure["vs_baseline"].get(label)
        if stats["n"]:
            spread = [
                words.span(stats["p25"], stats["p75"], unit),
                words.span(stats["min"], stats["max"], unit),
                words.value(stats["stdev"], unit),
            ]
        else:
            spread = ["not measured in this run", "", ""]
        if ab is None:
            against = ["(baseline)", "", "", ""]
        elif words.measured(ab):
            against = [
                f"{words.signed(ab['diff'], unit)} {words.interval(ab['diff_ci'], unit)}",
                words.ratio(ab["ratio"], ab["ratio_ci"]),
                words.p_value(ab["p_value"]),
                words.verdict_cell(ab, label, base),
            ]
        else:
            against = ["", "", "", words.verdict_cell(ab, label, base)]
        success = run["success"]
        rows.append(
            [
                label,
                words.conditions(run),
                f"{success['ok']}/{success['boots']}",
                stats["n"],
                *(words.value(stats[p], unit) for p in percentiles),
                *spread,
                *against,
            ]
        )
    result.tables.append((f"{figure['title']} per run, with its conditions", header, rows))
    return result
