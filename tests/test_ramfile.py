"""A template's RAM file is published sparse, named by its content, and never rewritten."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from harness.metrics.memory import file_resident_bytes
from harness.sandbox.qemu.ramfile import PAGE, publish, staging_path, sweep_staging

PAGES = 256


def staged(directory: Path, marker: bytes) -> Path:
    """A RAM image of PAGES pages, all zero but every 16th, which holds `marker`."""
    path = staging_path(directory)
    with path.open("wb") as ram:
        ram.truncate(PAGES * PAGE)
        for page in range(0, PAGES, 16):
            os.pwrite(ram.fileno(), marker * (PAGE // len(marker)), page * PAGE)
    return path


def test_published_file_is_sparse_content_addressed_and_never_rewritten(tmp_path: Path) -> None:
    first = staged(tmp_path, b"ab")
    content = first.read_bytes()
    published, digest = publish(first)
    assert digest == hashlib.sha256(content).hexdigest() and published.name == f"{digest[:32]}.ram"
    assert published.read_bytes() == content
    assert published.stat().st_blocks * 512 < len(content) // 2  # the zero pages are holes
    assert file_resident_bytes(published) is not None

    inode = published.stat().st_ino
    again, same = publish(staged(tmp_path, b"ab"))
    assert (again, same) == (published, digest) and again.stat().st_ino == inode  # kept, not replaced
    other, _ = publish(staged(tmp_path, b"cd"))
    assert other != published and published.read_bytes() == content
    assert not list(tmp_path.glob("*.partial"))


def test_a_dead_builders_staging_file_is_swept_and_a_live_ones_kept(tmp_path: Path) -> None:
    live = staging_path(tmp_path)
    live.touch()
    dead = tmp_path / "staging.999999999.abcd.ram"
    dead.touch()
    assert sweep_staging(tmp_path) == [f"removed a killed template build's RAM file {dead}"]
    assert live.exists() and not dead.exists()
