"""Paired bootstrap over rounds: a figure measured once per round on every target, and an interval for any
statistic of those per-round figures (a difference of medians, a ratio, the excess over a limit).

    estimate, ci = bootstrap(n_rounds, lambda idx: median(a[i] for i in idx) - median(d[i] for i in idx), seed)

Rounds are resampled with replacement, the same rounds for every target in one resample, so drift a round
shares between targets (the host got busier) stays paired. Pure Python: ten rounds need no numpy.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence

from harness.metrics.ab import CONFIDENCE, interval

RESAMPLES = 2000
"""Resamples per interval: the ends move by well under a percent between seeds at this count."""
MIN_ROUNDS = 3
"""Fewer rounds with a figure than this: no interval (a bootstrap of two values is their range, no more)."""

Stat = Callable[[Sequence[int]], float | None]
"""A statistic of the rounds whose indexes are given (repeats allowed); None when it is undefined."""


def median_of(values: Sequence[float | None], rounds: Sequence[int]) -> float | None:
    """Median of the figures of `rounds` (a round without a figure is left out); None when none has one."""
    present = [values[i] for i in rounds if values[i] is not None]
    return statistics.median(present) if present else None  # type: ignore[type-var]


def bootstrap(
    n_rounds: int, stat: Stat, seed: int, resamples: int = RESAMPLES, confidence: float = CONFIDENCE
) -> tuple[float | None, tuple[float, float] | None]:
    """The statistic over all rounds, and its percentile-bootstrap interval over resampled rounds (None with
    fewer than MIN_ROUNDS rounds, or when the statistic is undefined in most resamples)."""
    everything = list(range(n_rounds))
    estimate = stat(everything)
    if estimate is None or n_rounds < MIN_ROUNDS:
        return estimate, None
    rng = random.Random(seed)
    values = [v for v in (stat(rng.choices(everything, k=n_rounds)) for _ in range(resamples)) if v is not None]
    if len(values) < resamples // 2:
        return estimate, None
    return estimate, interval(values, confidence)


def contains_zero(ci: tuple[float, float] | None) -> bool:
    return ci is None or ci[0] <= 0.0 <= ci[1]
