"""Host memory: per-process RSS/PSS/USS, MemAvailable, and memory pressure (PSI)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

SAMPLE_INTERVAL_S = 0.5
"""Period of the background sampler."""

MEMINFO = Path("/proc/meminfo")
PSI_MEMORY = Path("/proc/pressure/memory")


def process_memory(pid: int) -> dict[str, int]:
    """RSS, PSS and USS in bytes of one process (PSS/USS from smaps, as Firecracker's tests do)."""
    info = psutil.Process(pid).memory_full_info()
    return {"rss": info.rss, "pss": info.pss, "uss": info.uss}


def mem_available_bytes() -> int:
    for line in MEMINFO.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def memory_pressure() -> dict[str, float] | None:
    """PSI `some`/`full` avg10 and total (µs) for memory, or None where the kernel lacks PSI."""
    try:
        text = PSI_MEMORY.read_text()
    except OSError:
        return None
    pressure: dict[str, float] = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        for field in fields:
            key, value = field.split("=")
            if key in ("avg10", "total"):
                pressure[f"{kind}_{key}"] = float(value)
    return pressure


class MemorySampler(threading.Thread):
    """Samples host MemAvailable, PSI and the memory of tracked pids to a JSONL file."""

    def __init__(
        self, path: Path, pids: Callable[[], dict[str, list[int]]], interval_s: float = SAMPLE_INTERVAL_S
    ) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.path = path
        self.pids = pids
        """Returns {sandbox id: host pids} at each tick."""
        self.interval_s = interval_s
        self.started_at = time.monotonic()
        self.samples = 0
        self._stop_event = threading.Event()

    def sample(self) -> dict[str, object]:
        sandboxes: dict[str, int] = {}
        for sandbox_id, pids in self.pids().items():
            total = 0
            for pid in pids:
                try:
                    total += psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue
            sandboxes[sandbox_id] = total
        return {
            "t_s": round(time.monotonic() - self.started_at, 3),
            "mem_available_bytes": mem_available_bytes(),
            "psi": memory_pressure(),
            "sandbox_rss_bytes": sandboxes,
        }

    def run(self) -> None:
        with self.path.open("a") as out:
            while not self._stop_event.is_set():
                out.write(json.dumps(self.sample()) + "\n")
                out.flush()
                self.samples += 1
                self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5)


def read_samples(path: Path) -> list[dict[str, object]]:
    """The sampler's JSONL, skipping a torn last line from an interrupted run."""
    samples = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return samples
