"""Where blastradius keeps its caches and run bookkeeping on the host."""

import os
from pathlib import Path

CACHE_ENV = "BLASTRADIUS_CACHE"
"""Environment variable that overrides the cache directory."""


def cache_dir() -> Path:
    """The host-side cache (kernel packages, initramfs images, accel verdicts, pid records)."""
    base = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blastradius"
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pid_records_dir() -> Path:
    """One JSON file per live run listing the processes it started, for `invoke clean`."""
    path = cache_dir() / "pids"
    path.mkdir(parents=True, exist_ok=True)
    return path
