"""Host memory: per-process RSS/PSS/USS, MemAvailable, and memory pressure (PSI)."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import threading
import time
from collections.abc import Callable, Collection
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


def mapped_pss_bytes(pid: int, paths: Collection[str]) -> int:
    """The PSS of process `pid`'s mappings of the files at `paths` (a template's RAM): its share of them,
    which the figure "PSS - this + the files' resident pages / N" replaces by an even share of the whole
    file, so that each page is counted once, mapped or not."""
    if not paths:
        return 0
    # A private mapping's copied-on-write pages are anonymous pages of the same region: its own, not the file's.
    regions = [region for region in psutil.Process(pid).memory_maps() if region.path in paths]
    return sum(max(region.pss - region.anonymous, 0) for region in regions)


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


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
MAP_FAILED = ctypes.c_void_p(-1).value


def file_resident_bytes(path: Path) -> int | None:
    """Bytes of the file at `path` in host memory now (page cache or tmpfs), by mincore over a read-only
    mapping that touches no page; None when the file is gone. A file every sandbox maps (a template's RAM)
    is a cost none of their PSS figures holds whole."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, MAP_FAILED):
            return None
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(address, size, vector) != 0:
                return None
            return sum(byte & 1 for byte in vector) * mmap.PAGESIZE
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)
