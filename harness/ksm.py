"""Linux KSM (kernel samepage merging), switched on for a run that asks for it and put back after.

KSM is host-wide: ksmd scans the memory that processes marked mergeable (QEMU marks guest RAM so by
default, its `mem-merge` machine option) and merges identical pages copy-on-write. It costs ksmd's CPU
time, and it merges nothing until a page has looked the same on two of its passes, so a figure read
too soon after boot shows none of it: `settle` waits for two full scans.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.errors import EnvironmentMissing
from harness.paths import pid_records_dir
from harness.supervisor import process_create_time

KSM_DIR = Path("/sys/kernel/mm/ksm")
"""The kernel's KSM controls and counters."""

SETTLE_SCANS = 2
"""Full scans to wait for: a page is merged on the scan after the one that saw it unchanged."""

SETTLE_MAX_S = 120.0
"""Longest wait for those scans."""

PAGES_TO_SCAN = 1000
"""ksmd's pages per 20 ms wake-up while a run has it on (the kernel's default, 100, is ~20 MiB/s: two full
scans of eight idle guests took over a minute); put back with `run`."""

SETTLE_POLL_S = 0.5

COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "full_scans", "pages_to_scan", "sleep_millisecs")
"""What is recorded of KSM's state."""

RECORD_NAME = "ksm.json"
"""Under the pid records: KSM's `run` before a live run switched it on, for `invoke clean` after a SIGKILL."""


def ksm_stats() -> dict[str, int]:
    """KSM's counters now (pages are 4 KiB)."""
    return {name: int((KSM_DIR / name).read_text()) for name in COUNTERS if (KSM_DIR / name).exists()}


@contextmanager
def ksm_switched_on(wanted: bool) -> Iterator[dict[str, Any] | None]:
    """KSM running (`run=1`) inside the block when `wanted`, and `run` put back to what it was on the way
    out, however the block ends; yields what is recorded of it (None when not wanted)."""
    if not wanted:
        yield None
        return
    control, pace = KSM_DIR / "run", KSM_DIR / "pages_to_scan"
    try:
        before, pace_before = control.read_text().strip(), pace.read_text().strip()
        pace.write_text(str(PAGES_TO_SCAN))
        control.write_text("1")
    except OSError as exc:
        raise EnvironmentMissing(
            f"--memory-sharing ksm needs {control} writable ({exc.strerror}); run as root on a kernel with "
            "CONFIG_KSM, or use --memory-sharing off or file"
        ) from None
    record = pid_records_dir() / RECORD_NAME
    owner = {"pid": os.getpid(), "create_time": process_create_time(os.getpid())}
    record.write_text(json.dumps({"run": before, "pages_to_scan": pace_before, **owner}))
    info: dict[str, Any] = {"run_before": before, "pages_to_scan": PAGES_TO_SCAN, "at_start": ksm_stats()}
    try:
        yield info
    finally:
        control.write_text(before)
        pace.write_text(pace_before)
        record.unlink(missing_ok=True)


def settle() -> dict[str, Any]:
    """Wait until ksmd has done SETTLE_SCANS full scans (at most SETTLE_MAX_S); its counters then."""
    started = time.monotonic()
    first = ksm_stats().get("full_scans", 0)
    while ksm_stats().get("full_scans", 0) < first + SETTLE_SCANS and time.monotonic() - started < SETTLE_MAX_S:
        time.sleep(SETTLE_POLL_S)
    return {**ksm_stats(), "waited_s": round(time.monotonic() - started, 1)}


def sweep_ksm() -> list[str]:
    """Put KSM's `run` back for a run that was killed while it had KSM on (`invoke clean`)."""
    record_path = pid_records_dir() / RECORD_NAME
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return []
    if process_create_time(record["pid"]) == record["create_time"]:
        return []  # its run still goes, and will put it back
    (KSM_DIR / "run").write_text(record["run"])
    (KSM_DIR / "pages_to_scan").write_text(record["pages_to_scan"])
    record_path.unlink(missing_ok=True)
    return [f"put KSM back to run={record['run']}"]
