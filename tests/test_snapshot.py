"""Template snapshots under concurrency and damage: two runs that need the same template at once both
get one whole file, and a truncated snapshot is rebuilt, never restored."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.image import GuestImage
from harness.sandbox.base import SandboxSpec
from harness.sandbox.qemu.backend import QemuBackend
from harness.sandbox.qemu.snapshot import make_template, snapshot_record, valid_snapshot
from harness.supervisor import Supervisor
from tests.conftest import REPO

MAKE_ONE = """
import sys
from pathlib import Path
from harness.image import build_image
from harness.paths import cache_dir
from harness.sandbox.base import SandboxSpec
from harness.sandbox.qemu.snapshot import make_template
path = Path(sys.argv[1])
make_template(path, build_image(cache_dir()), "tcg", SandboxSpec(id="t", workdir=path.parent))
print("made", path.stat().st_size)
"""


@pytest.mark.qemu
def test_two_runs_building_the_same_template_at_once_both_succeed(tmp_path: Path) -> None:
    path = tmp_path / "snapshots" / "shared.vmstate"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", MAKE_ONE, str(path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outcomes = [writer.communicate(timeout=240) for writer in writers]
    for writer, (out, err) in zip(writers, outcomes, strict=True):
        assert writer.returncode == 0, err.decode()[-2000:]
        assert out.decode().startswith("made ")
    assert valid_snapshot(path)
    assert not list(path.parent.glob("*.partial")), "no writer's temporary file is left behind"


@pytest.mark.qemu
def test_a_truncated_template_is_rebuilt_and_restores(
    image: GuestImage, supervisor: Supervisor, tmp_path: Path
) -> None:
    spec = SandboxSpec(id="t", workdir=tmp_path)
    path = make_template(tmp_path / "snapshots" / "t.vmstate", image, "tcg", spec)
    whole = path.stat().st_size
    with path.open("r+b") as damaged:
        damaged.truncate(whole // 2)
    assert not valid_snapshot(path)
    make_template(path, image, "tcg", spec)
    assert valid_snapshot(path) and path.stat().st_size > whole // 2

    backend = QemuBackend(image, "tcg", boot_mode="snapshot", cache=tmp_path)
    backend._templates[(spec.mem_mib, spec.vcpus, spec.reclaim)] = path
    clone = backend.boot(SandboxSpec(id="clone", workdir=tmp_path / "clone"), supervisor)
    try:
        assert clone.restored and clone.exec("hostname").text.strip() == "clone"
    finally:
        clone.stop()


def test_a_snapshot_without_its_record_is_not_valid(tmp_path: Path) -> None:
    path = tmp_path / "orphan.vmstate"
    path.write_bytes(b"QEVM" + bytes(1000))
    assert not valid_snapshot(path)
    snapshot_record(path).write_text('{"bytes": 1004, "sha256": "0"}')
    assert not valid_snapshot(path)
    snapshot_record(path).write_text("not json")
    assert not valid_snapshot(path)
