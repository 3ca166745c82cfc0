"""A/B statistics: is run B's figure different from baseline A's, beyond the noise of either?

Per figure, as Firecracker's A/B tests report it: the difference of medians and their ratio, each with a
percentile-bootstrap confidence interval (seeded, so the same inputs give the same report), and a two-sided
Mann-Whitney U test. A difference counts as significant only when both agree: the interval excludes 0 and
p < ALPHA. Pure Python (no numpy or scipy in the project's dependencies).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

RESAMPLES = 2000
"""Bootstrap resamples per comparison: the interval's ends move by well under 1 % between seeds at this count."""
SEED = 20240501
"""Fixed, so a re-rendered report shows the same intervals."""
CONFIDENCE = 0.95
ALPHA = 0.05
"""Mann-Whitney p below this, with the interval excluding 0, is a significant difference."""
MIN_SAMPLES = 3
"""Fewer samples than this on either side: no interval or test is given, only the medians."""

TOO_FEW = "too few samples"
NO_DIFFERENCE = "no significant difference"
SIGNIFICANT = "significant"
BORDERLINE = "borderline"
"""The interval and the U test disagree (one says different, the other not)."""


@dataclass(frozen=True)
class MannWhitney:
    """The two-sided Mann-Whitney U test of two samples."""

    u: float
    """U of the first sample: the number of (a, b) pairs with a > b, ties counting one half."""
    z: float
    """Standard score of U under no difference, with tie and continuity correction."""
    p: float
    """Two-sided p-value from the normal approximation."""


@dataclass(frozen=True)
class ABResult:
    """One figure of a candidate run against the baseline's."""

    n_baseline: int
    n_candidate: int
    p50_baseline: float | None
    p50_candidate: float | None
    diff: float | None
    """Candidate median minus baseline median."""
    diff_ci: tuple[float, float] | None
    """Bootstrap confidence interval of `diff`; None with too few samples."""
    ratio: float | None
    """Candidate median over baseline median; None unless the baseline's median is above zero."""
    ratio_ci: tuple[float, float] | None
    """Bootstrap confidence interval of `ratio`; None with too few samples or no ratio."""
    u: float | None
    """Mann-Whitney U of the candidate sample."""
    p_value: float | None
    verdict: str
    """TOO_FEW, NO_DIFFERENCE, SIGNIFICANT or BORDERLINE."""

    def to_json(self) -> dict[str, object]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def rank(values: Sequence[float]) -> tuple[list[float], list[int]]:
    """1-based ranks of `values` (ties share their average rank), and the size of each group of ties."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    ties: list[int] = []
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        shared = (start + end) / 2 + 1
        for position in range(start, end + 1):
            ranks[order[position]] = shared
        ties.append(end - start + 1)
        start = end + 1
    return ranks, ties


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def mann_whitney(a: Sequence[float], b: Sequence[float], continuity: bool = True) -> MannWhitney:
    """Two-sided Mann-Whitney U test by the normal approximation, with tie correction (and continuity
    correction unless told otherwise), as textbooks and scipy's `method="asymptotic"` give it."""
    n1, n2 = len(a), len(b)
    if not n1 or not n2:
        raise ValueError("the Mann-Whitney test needs samples on both sides")
    ranks, ties = rank([*a, *b])
    u = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    n = n1 + n2
    mean = n1 * n2 / 2
    tie_term = sum(t**3 - t for t in ties) / (n * (n - 1)) if n > 1 else 0.0
    variance = n1 * n2 / 12 * ((n + 1) - tie_term)
    if variance <= 0:  # every value equal: nothing tells the samples apart
        return MannWhitney(u=u, z=0.0, p=1.0)
    distance = abs(u - mean) - (0.5 if continuity else 0.0)
    z = max(distance, 0.0) / math.sqrt(variance)
    return MannWhitney(u=u, z=z if u >= mean else -z, p=min(1.0, 2 * normal_sf(z)))


def bootstrap_medians(
    a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED
) -> list[tuple[float, float]]:
    """(median of a resample of a, median of a resample of b) per bootstrap resample: each sample drawn
    with replacement, on its own, at its own size."""
    rng = random.Random(seed)
    return [(median(rng.choices(a, k=len(a))), median(rng.choices(b, k=len(b)))) for _ in range(resamples)]


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The central `confidence` share of `values` (a percentile interval); None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    tail = (1 - confidence) / 2
    return _quantile(ordered, tail), _quantile(ordered, 1 - tail)


def _quantile(ordered: list[float], q: float) -> float:
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def compare(
    baseline: Sequence[float],
    candidate: Sequence[float],
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = SEED,
    alpha: float = ALPHA,
) -> ABResult:
    """The candidate's sample against the baseline's: medians, their difference and ratio with bootstrap
    intervals, the Mann-Whitney p-value and the verdict."""
    a, b = [float(v) for v in baseline], [float(v) for v in candidate]
    p50_a = median(a) if a else None
    p50_b = median(b) if b else None
    diff = p50_b - p50_a if p50_a is not None and p50_b is not None else None
    ratio = p50_b / p50_a if p50_a is not None and p50_b is not None and p50_a > 0 else None
    if len(a) < MIN_SAMPLES or len(b) < MIN_SAMPLES:
        return ABResult(len(a), len(b), p50_a, p50_b, diff, None, ratio, None, None, None, TOO_FEW)
    medians = bootstrap_medians(a, b, resamples, seed)
    diff_ci = interval([mb - ma for ma, mb in medians], confidence)
    ratio_ci = interval([mb / ma for ma, mb in medians if ma > 0], confidence) if ratio is not None else None
    test = mann_whitney(b, a)
    assert diff_ci is not None  # resamples > 0: a difference of medians is always defined
    return ABResult(
        len(a), len(b), p50_a, p50_b, diff, diff_ci, ratio, ratio_ci, test.u, test.p, verdict(diff_ci, test.p, alpha)
    )


def verdict(diff_ci: tuple[float, float], p_value: float, alpha: float = ALPHA) -> str:
    """SIGNIFICANT when the interval excludes 0 and p < alpha; NO_DIFFERENCE when it contains 0 and
    p >= alpha; BORDERLINE when the two disagree."""
    excludes_zero = diff_ci[0] > 0 or diff_ci[1] < 0
    if excludes_zero and p_value < alpha:
        return SIGNIFICANT
    if not excludes_zero and p_value >= alpha:
        return NO_DIFFERENCE
    return BORDERLINE
