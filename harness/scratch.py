"""Scratch directories the harness makes outside a run directory (under the system temp dir), each
recorded with the process that owns it, so `invoke clean` removes what a SIGKILLed run left behind
by record, not by guessing at name prefixes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.paths import pid_records_dir
from harness.supervisor import process_create_time

RECORDS_DIR_NAME = "scratch"
"""Under the pid records: one JSON file per live scratch directory."""


def _record_path(path: Path) -> Path:
    directory = pid_records_dir() / RECORDS_DIR_NAME
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{hashlib.sha256(str(path).encode()).hexdigest()[:16]}.json"


def make_scratch_dir(prefix: str) -> Path:
    """A fresh temporary directory, recorded as this process's before anything is put in it."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    owner = {"pid": os.getpid(), "create_time": process_create_time(os.getpid())}
    _record_path(path).write_text(json.dumps({"path": str(path), "owner": owner}))
    return path


def remove_scratch_dir(path: Path) -> None:
    """Remove the directory and its record. Idempotent."""
    shutil.rmtree(path, ignore_errors=True)
    _record_path(path).unlink(missing_ok=True)


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """make_scratch_dir for a with-block: removed on the way out, however it ends."""
    path = make_scratch_dir(prefix)
    try:
        yield path
    finally:
        remove_scratch_dir(path)


def sweep_scratch_dirs() -> list[str]:
    """Remove the scratch directories of processes that are gone; return a line per directory."""
    removed: list[str] = []
    directory = pid_records_dir() / RECORDS_DIR_NAME
    for record_path in sorted(directory.glob("*.json")) if directory.exists() else []:
        try:
            record = json.loads(record_path.read_text())
            path, owner = Path(record["path"]), record["owner"]
        except (OSError, ValueError, KeyError, TypeError):
            record_path.unlink(missing_ok=True)
            removed.append(f"unreadable scratch record {record_path.name}")
            continue
        if process_create_time(owner["pid"]) == owner["create_time"]:
            continue  # its owner still runs and will remove it
        existed = path.exists()
        remove_scratch_dir(path)
        if existed:
            removed.append(f"removed scratch directory {path}")
    return removed
