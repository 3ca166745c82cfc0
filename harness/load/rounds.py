"""Interleaved rounds of the paced (Locust) phase: in every round each target gets one window of the same
load, in an order shuffled per round, so that a noisy host's drift lands on every target alike instead of in
the differences between them.

    orders, schedule = make_schedule(targets, rounds=6, window_s=4.0, start=t0, seed=seed)
    per_window = window_figures(samples, schedule, len(targets), settle_s=0.5)

A window's first `settle_s` is discarded: requests still in flight to the previous target, and any
connection a target's idle timeout closed between its windows, are reopened there.
"""

from __future__ import annotations

import bisect
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.load.analyse import STREAM_SUFFIX, Sample, figures

SETTLE_S = 0.5
"""Discarded start of every window."""


@dataclass
class Window:
    """One target's turn in one round, and what was measured in it."""

    round: int
    target: str
    start: float
    end: float
    samples: list[Sample] = field(default_factory=list)
    """Requests to `target` started after the settle time and before `end`."""


def make_schedule(
    targets: Sequence[str], rounds: int, window_s: float, start: float, seed: int
) -> tuple[list[list[str]], list[tuple[float, float, str]]]:
    """The order of every round (shuffled by a Random seeded with `seed`) and the back-to-back windows."""
    rng = random.Random(seed)
    orders: list[list[str]] = []
    schedule: list[tuple[float, float, str]] = []
    t = start
    for _ in range(rounds):
        order = list(targets)
        rng.shuffle(order)
        orders.append(order)
        for name in order:
            schedule.append((round(t, 3), round(t + window_s, 3), name))
            t += window_s
    return orders, schedule


def assign(samples: Sequence[Sample], schedule: Sequence[tuple[float, float, str]], per_round: int, settle_s: float):
    """Every window of the schedule with its samples (by start time and target)."""
    windows = [Window(i // per_round, target, start, end) for i, (start, end, target) in enumerate(schedule)]
    starts = [w.start for w in windows]
    for s in samples:
        index = bisect.bisect_right(starts, s.started) - 1
        if index < 0:
            continue
        w = windows[index]
        if s.target == w.target and w.start + settle_s <= s.started < w.end:
            w.samples.append(s)
    return windows


def window_figures(windows: Sequence[Window], settle_s: float) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """target -> kind -> one figures() dict per round (with its round index), over each window's samples."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for w in windows:
        span = max(w.end - w.start - settle_s, 0.0)
        by_kind: dict[str, list[Sample]] = defaultdict(list)
        for s in w.samples:
            by_kind[s.name].append(s)
        for kind, group in by_kind.items():
            out[w.target][kind].append({"round": w.round, **figures(group, span)})
    return {t: dict(kinds) for t, kinds in out.items()}


def requests_only(samples: Sequence[Sample]) -> list[Sample]:
    """Samples that are requests (time-to-first-byte samples are extra figures of a request)."""
    return [s for s in samples if not s.name.endswith(STREAM_SUFFIX)]
