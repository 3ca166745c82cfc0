"""Summary statistics with their spread, the way every figure in a report is given."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

TRIM_FRACTION = 0.05
"""Share cut from each end for the trimmed mean, as public sandbox benchmarks do."""


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def trimmed_mean(values: Sequence[float], fraction: float = TRIM_FRACTION) -> float:
    ordered = sorted(values)
    cut = int(len(ordered) * fraction)
    kept = ordered[cut : len(ordered) - cut] or ordered
    return statistics.fmean(kept)


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, p50, p95, p99, min, max, mean, trimmed mean and stdev; all None but n when empty."""
    keys = ("p50", "p95", "p99", "min", "max", "mean", "trimmed_mean", "stdev")
    if not values:
        return {"n": 0, **dict.fromkeys(keys)}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 2),
        "p95": round(percentile(values, 95), 2),
        "p99": round(percentile(values, 99), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "mean": round(statistics.fmean(values), 2),
        "trimmed_mean": round(trimmed_mean(values), 2),
        "stdev": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
    }
