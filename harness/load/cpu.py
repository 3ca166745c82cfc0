"""CPU of the load generator and of the proxy under test, sampled with psutil in a thread.

The honesty check of the bench: a latency figure measured while the generator was pegged says
more about the generator than about the proxy.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

SAMPLE_INTERVAL_S = 0.5
SATURATED_PCT = 90.0
"""A generator process above this share of one core (mean over the measured window) is saturated."""
HOST = "host"
"""Pseudo-group: the whole host's busy CPU, in % of one core (200 = both cores of a 2-core host)."""


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


@dataclass
class CpuSampler:
    """groups: label -> root pids; each root's descendants count towards it (squid's kids...)."""

    groups: dict[str, list[int]]
    interval_s: float = SAMPLE_INTERVAL_S
    samples: list[tuple[float, dict[str, float], dict[int, float]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _procs: dict[int, psutil.Process] = field(default_factory=dict)

    def start(self) -> CpuSampler:
        psutil.cpu_percent(None)  # prime the host-wide counter
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def add(self, group: str, pid: int) -> None:
        self.groups.setdefault(group, []).append(pid)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            per_group: dict[str, float] = {}
            per_root: dict[int, float] = {}
            for group, roots in list(self.groups.items()):
                total = 0.0
                for root in list(roots):
                    share = 0.0
                    for proc in _tree(root):
                        cached = self._procs.setdefault(proc.pid, proc)
                        with contextlib.suppress(psutil.Error):
                            # The first call per process primes psutil and returns 0.
                            share += cached.cpu_percent(None)
                    per_root[root] = share
                    total += share
                per_group[group] = total
            # Whole-host busy share in % of one core: other tenants of the host count against us too.
            per_group[HOST] = psutil.cpu_percent(None) * (psutil.cpu_count() or 1)
            self.samples.append((time.time(), per_group, per_root))

    def summary(self, start: float, end: float, per_root_of: str | None = None) -> dict[str, Any]:
        """Mean and max % of one core per group inside [start, end]; per root pid for per_root_of."""
        window = [s for s in self.samples if start <= s[0] <= end] or self.samples[-2:]
        out: dict[str, Any] = {}
        for group, roots in [*self.groups.items(), (HOST, [])]:
            values = [s[1].get(group, 0.0) for s in window]
            entry: dict[str, Any] = {
                "mean_pct": round(sum(values) / len(values), 1) if values else None,
                "max_pct": round(max(values), 1) if values else None,
                "processes": len(roots),
            }
            if group == per_root_of:
                entry["per_process_mean_pct"] = {
                    str(pid): round(sum(s[2].get(pid, 0.0) for s in window) / len(window), 1) if window else None
                    for pid in roots
                }
            out[group] = entry
        return out


def generator_saturated(cpu: dict[str, Any], group: str = "generator") -> bool:
    """True when any single generator process averaged more than SATURATED_PCT of a core."""
    per = cpu.get(group, {}).get("per_process_mean_pct") or {}
    return any(v is not None and v > SATURATED_PCT for v in per.values())


def host_saturated(cpu: dict[str, Any]) -> bool:
    """True when the host as a whole was busier than SATURATED_PCT of all its cores."""
    mean = cpu.get(HOST, {}).get("mean_pct")
    return mean is not None and mean > SATURATED_PCT * (psutil.cpu_count() or 1)
