"""Per-request samples (written by each Locust process) -> the figures in results.json."""

from __future__ import annotations

import csv
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.metrics.stats import percentile

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p99.9": 99.9}
TIMELINE_BIN_S = 1.0
COMPARABLE_KINDS = ("model", "page", "download")
"""Kinds whose latency through a target is compared with direct's (blocked is compared too, with nginx's deny
listener standing in for a proxy's refusal on the direct path)."""
STREAM_SUFFIX = "-ttfb"
"""Extra sample names (time to first byte) that are not requests of their own."""


@dataclass(frozen=True)
class Sample:
    t: float
    """Wall-clock time the request finished."""
    name: str
    """Traffic kind (or kind-ttfb)."""
    ms: float
    length: int
    failure: str
    """Empty when the request succeeded, else its failure kind."""
    target: str = ""
    """The target of an interleaved plan's window the request started in; empty otherwise."""

    @property
    def started(self) -> float:
        """Wall-clock time the request started."""
        return self.t - self.ms / 1000.0


def read_samples(samples_dir: Path) -> list[Sample]:
    out: list[Sample] = []
    for path in sorted(samples_dir.glob("samples-*.csv")):
        with open(path, newline="") as fh:
            for row in csv.reader(fh):
                if len(row) not in (5, 6):
                    continue  # a process killed mid-write leaves a torn last line
                try:
                    out.append(Sample(float(row[0]), row[1], float(row[2]), int(row[3]), row[4], *row[5:]))
                except ValueError:
                    continue
    out.sort(key=lambda s: s.t)
    return out


def latency(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {**dict.fromkeys(PERCENTILES), "min": None, "max": None, "mean": None}
    figures: dict[str, float | None] = {k: round(percentile(values, q), 3) for k, q in PERCENTILES.items()}
    figures.update(min=round(min(values), 3), max=round(max(values), 3), mean=round(sum(values) / len(values), 3))
    return figures


def figures(samples: Iterable[Sample], window_s: float) -> dict[str, Any]:
    """Requests, failures by kind, rps and latency of successful requests, for one group of samples."""
    group = list(samples)
    failures = Counter(s.failure for s in group if s.failure)
    ok = [s.ms for s in group if not s.failure]
    return {
        "requests": len(group),
        "ok": len(ok),
        "failures": dict(sorted(failures.items())),
        "failure_count": sum(failures.values()),
        "rps": round(len(group) / window_s, 2) if window_s > 0 else None,
        "bytes": sum(s.length for s in group),
        "latency_ms": latency(ok),
    }


def window(samples: list[Sample], warmup_s: float, duration_s: float) -> tuple[list[Sample], float, float]:
    """Samples inside the measured window: after warm-up from the first request, for duration_s."""
    if not samples:
        return [], 0.0, 0.0
    start = samples[0].t + warmup_s
    end = start + duration_s
    return [s for s in samples if start <= s.t < end], start, end


def summarise_phase(samples: list[Sample], warmup_s: float, duration_s: float) -> dict[str, Any]:
    measured, start, end = window(samples, warmup_s, duration_s)
    actual = min(end, measured[-1].t) - start if measured else 0.0
    span = duration_s if actual >= duration_s * 0.9 else max(actual, 0.0)
    requests = [s for s in measured if not s.name.endswith(STREAM_SUFFIX)]
    by_kind: dict[str, list[Sample]] = defaultdict(list)
    for s in measured:
        by_kind[s.name].append(s)
    result = figures(requests, span)
    result["comparable"] = figures([s for s in requests if s.name in COMPARABLE_KINDS], span)
    result["window_s"] = round(span, 2)
    result["window"] = [start, end]
    result["traffic"] = {kind: figures(group, span) for kind, group in sorted(by_kind.items())}
    return result


def timeline(samples: list[Sample], origin: float, bin_s: float = TIMELINE_BIN_S) -> list[list[float | None]]:
    """[t since origin, requests/s, p50 ms, p95 ms] per bin, successful requests for latency."""
    bins: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        if not s.name.endswith(STREAM_SUFFIX):
            bins[math.floor((s.t - origin) / bin_s)].append(s)
    rows: list[list[float | None]] = []
    for index in sorted(bins):
        group = bins[index]
        ok = [s.ms for s in group if not s.failure]
        rows.append(
            [
                round(index * bin_s, 2),
                round(len(group) / bin_s, 1),
                round(percentile(ok, 50), 3) if ok else None,
                round(percentile(ok, 95), 3) if ok else None,
            ]
        )
    return rows


def read_history(csv_path: Path, origin: float) -> list[list[float]]:
    """Locust's stats history, Aggregated rows only: [t since origin, users, requests/s]."""
    if not csv_path.exists():
        return []
    rows = []
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("Name") != "Aggregated":
                continue
            try:
                rows.append(
                    [
                        round(float(row["Timestamp"]) - origin, 1),
                        float(row["User Count"]),
                        round(float(row["Requests/s"]), 2),
                    ]
                )
            except (KeyError, ValueError):
                continue
    return rows


def added(target: dict[str, Any] | None, direct: dict[str, Any] | None) -> dict[str, float | None]:
    """Target latency minus direct latency, per percentile (None when either side is missing)."""
    out: dict[str, float | None] = {}
    for key in PERCENTILES:
        a = (target or {}).get(key)
        b = (direct or {}).get(key)
        out[key] = round(a - b, 3) if a is not None and b is not None else None
    return out
