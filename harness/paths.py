"""Where blastradius keeps its caches and run bookkeeping on the host."""

import os
import shutil
from collections.abc import Callable
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


READY_MARK = ".ready"
"""In a cached directory: present once it is whole."""


def cached_dir(root: Path, fill: Callable[[Path], None]) -> Path:
    """`root`, a content-addressed cache directory, made once: `fill` writes it into a staging directory of
    this writer's own, which is renamed into place whole, so two runs building it at once never see half
    of one (the second rename loses, and its copy goes)."""
    if (root / READY_MARK).exists():
        return root
    staging = root.with_name(f"{root.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        fill(staging)
    except BaseException:  # a failed or interrupted build leaves no half-built entry behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (staging / READY_MARK).touch()
    try:
        staging.rename(root)
    except OSError:  # another run made it first
        shutil.rmtree(staging, ignore_errors=True)
    return root
