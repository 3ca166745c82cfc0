"""Template snapshots under concurrency and damage: two runs that need the same template at once both
get one whole file, a truncated snapshot is rebuilt, never restored, and so is one whose RAM file changed
or vanished; a clone's writes never reach the template's RAM file."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from harness.image import GuestImage
from harness.sandbox.base import SandboxSpec
from harness.sandbox.qemu.backend import QemuBackend
from harness.sandbox.qemu.ramfile import file_sha256
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
    path = make_template(tmp_path / "snapshots" / "t.vmstate", image, "tcg", spec).vmstate
    whole = path.stat().st_size
    with path.open("r+b") as damaged:
        damaged.truncate(whole // 2)
    assert not valid_snapshot(path)
    template = make_template(path, image, "tcg", spec)
    assert valid_snapshot(path) and path.stat().st_size > whole // 2

    backend = QemuBackend(image, "tcg", boot_mode="snapshot", cache=tmp_path)
    backend._templates[(spec.mem_mib, spec.vcpus, spec.reclaim, spec.shared_ram)] = template
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


ALLOC_AND_FREE = "awk 'BEGIN { for (i = 0; i < 64; i++) heap[i] = sprintf(\"%1048576d\", i) }'"
"""Allocate, touch and free 64 distinct MiB inside a guest (ram-pressure's allocator)."""

WRITER_MEM_MIB = 256
"""A 128 MiB guest has ~64 MiB free after boot: too little to hold 64 MiB more."""


@pytest.mark.qemu
def test_a_clone_writing_64_mib_leaves_the_template_ram_file_unchanged(supervisor: Supervisor, tmp_path: Path) -> None:
    from harness.metrics.memory import process_memory
    from harness.paths import cache_dir
    from harness.sandbox import BackendOptions, create_backend

    options = BackendOptions(cache=cache_dir(), accel="tcg", mem_mib=WRITER_MEM_MIB, memory_sharing="file")
    backend = create_backend("qemu", options)
    assert isinstance(backend, QemuBackend)
    (template,) = backend._templates.values()
    assert template.ram_file is not None and template.vmstate.stat().st_size < 1 << 20  # device state only
    before = (template.ram_file.stat().st_size, file_sha256(template.ram_file))
    writer = SandboxSpec(id="writer", workdir=tmp_path, mem_mib=WRITER_MEM_MIB, reclaim=False, shared_ram=True)
    clone = backend.boot(writer, supervisor)
    try:
        uss_before = process_memory(clone.pids()[0])["uss"]
        assert clone.exec(f"echo marker > /tmp/marker && {ALLOC_AND_FREE}", timeout=60).rc == 0
        # The writes happened, in the clone's own memory (copy-on-write), not in the file.
        assert process_memory(clone.pids()[0])["uss"] - uss_before > 48 << 20
        assert (template.ram_file.stat().st_size, file_sha256(template.ram_file)) == before
    finally:
        clone.stop()
    assert (template.ram_file.stat().st_size, file_sha256(template.ram_file)) == before
    assert valid_snapshot(template.vmstate)


@pytest.mark.qemu
def test_a_template_whose_ram_file_changed_or_vanished_is_rebuilt(
    image: GuestImage, supervisor: Supervisor, tmp_path: Path
) -> None:
    spec = SandboxSpec(id="t", workdir=tmp_path, reclaim=False, shared_ram=True)
    path, ram = tmp_path / "snapshots" / "t.vmstate", tmp_path / "ram"
    ram.mkdir()
    first = make_template(path, image, "tcg", spec, ram_directory=ram)
    assert first.ram_file is not None and first.ram_file.parent == ram
    with first.ram_file.open("r+b") as changed:  # a byte of guest RAM changed behind the template's back
        changed.seek(first.ram_file.stat().st_size // 2)
        changed.write(b"\x5a")
    assert not valid_snapshot(path)
    second = make_template(path, image, "tcg", spec, ram_directory=ram)
    assert second.ram_file is not None and second.ram_file != first.ram_file and not first.ram_file.exists()
    assert valid_snapshot(path)

    second.ram_file.unlink()  # gone, as /dev/shm is after a reboot
    assert not valid_snapshot(path)
    third = make_template(path, image, "tcg", spec, ram_directory=ram)
    assert valid_snapshot(path) and third.ram_file is not None and third.ram_file.exists()

    backend = QemuBackend(image, "tcg", boot_mode="snapshot", cache=tmp_path, memory_sharing="file")
    backend._templates[(spec.mem_mib, spec.vcpus, spec.reclaim, spec.shared_ram)] = third
    clone = backend.boot(replace(spec, id="clone", workdir=tmp_path / "clone"), supervisor)
    try:
        assert clone.exec("hostname").text.strip() == "clone"
    finally:
        clone.stop()
