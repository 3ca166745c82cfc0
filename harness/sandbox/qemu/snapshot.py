"""Snapshot boots: restore a booted template guest instead of booting a kernel.

A template guest is cold-booted once per image, accelerator and RAM size, then live-migrated to a
file (QEMU `migrate exec:cat > FILE`); each sandbox starts QEMU with `-incoming defer`, is handed the
file over QMP and resumes where the template was, with its own network backend (own agent port, own
gateway relay).

With file-backed RAM (`--memory-sharing file`) the template's RAM is a file (share=on) and the migration
leaves it out (x-ignore-shared): the vmstate is device state only, the RAM file is published beside it
(ramfile.py), and every clone maps that file privately, so the pages no clone has written are one copy
in memory for all of them. Free page reporting is off in template and clones alike (QEMU 7.2 punches
holes into the file on a discard, even under a private mapping; and it is device state, so both must
match).
The template boots with init_on_free=1 so the pages its kernel freed are zero and stay out of the
file (QEMU does not send zero pages), which keeps both the file and each clone's resident set small.

Clones share the template's kernel state: boot id, uptime and the kernel RNG's state at the time of
the snapshot. The harness renames each clone and mixes fresh host randomness into its entropy pool,
but the guest kernel (no vmgenid driver) only reseeds its CRNG from that at its next reseed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import time
from dataclasses import replace
from pathlib import Path

from harness.errors import EnvironmentMissing
from harness.image import GuestImage
from harness.sandbox.base import SandboxSpec
from harness.sandbox.qemu.qmp import Qmp
from harness.sandbox.qemu.ramfile import file_sha256, publish, staging_path
from harness.sandbox.qemu.vm import Microvm, RamFile, Snapshot
from harness.scratch import scratch_dir
from harness.supervisor import Supervisor

TEMPLATE_CMDLINE = "init_on_free=1"
"""Zero freed pages in the template so they are left out of the snapshot."""

SNAPSHOT_FORMAT = 2
"""Bumped when the way templates are made changes."""

MIGRATE_TIMEOUT_S = 60.0
SETTLE_S = 1.0
"""Let the template's boot-time work (module init, ARP) finish before it is frozen."""

DROP_CACHES = "sync; echo 3 > /proc/sys/vm/drop_caches; echo 1 > /proc/sys/vm/compact_memory"


def snapshot_path(
    cache: Path, image: GuestImage, accel: str, spec: SandboxSpec, qemu_version: str, ram_file: bool = False
) -> Path:
    """Content-addressed: image, accelerator, QEMU and every part of the shape a restore must match, RAM
    in the vmstate or in a file of its own included."""
    shape = f"{spec.mem_mib}|{spec.vcpus}|{spec.reclaim}|{'ram-file' if ram_file else 'ram-in-vmstate'}"
    key = hashlib.sha256(f"{SNAPSHOT_FORMAT}|{image.digest}|{accel}|{shape}|{qemu_version}".encode()).hexdigest()
    return cache / "snapshots" / f"{key[:16]}.vmstate"


def snapshot_record(path: Path) -> Path:
    """The sidecar written after a snapshot is complete: its size and digest. No sidecar, no snapshot."""
    return path.with_suffix(".json")


def valid_snapshot(path: Path) -> bool:
    """A snapshot whose files are whole: the vmstate, and the RAM file where it has one, of the same size
    and SHA-256 as when they were written. A truncated or half-written file (a killed run, a full disk), a
    RAM file changed or gone (tmpfs is emptied at reboot) must be rebuilt, never restored."""
    return load_snapshot(path) is not None


def load_snapshot(path: Path) -> Snapshot | None:
    """The snapshot at `path` if valid (see valid_snapshot), else None."""
    try:
        record = json.loads(snapshot_record(path).read_text())
        if not _whole(path, record["bytes"], record["sha256"]):
            return None
        ram = record.get("ram")
        if ram is None:
            return Snapshot(path)
        ram_path = Path(ram["path"])
        return Snapshot(path, ram_path) if _whole(ram_path, ram["bytes"], ram["sha256"]) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _whole(path: Path, size: int, sha256: str) -> bool:
    if path.stat().st_size != size:
        return False
    with path.open("rb") as written:
        return hashlib.file_digest(written, "sha256").hexdigest() == sha256


def make_template(
    path: Path,
    image: GuestImage,
    accel: str,
    spec: SandboxSpec,
    timeout_s: float = MIGRATE_TIMEOUT_S,
    ram_directory: Path | None = None,
) -> Snapshot:
    """The template snapshot at `path`: reused when valid, else cold-booted and migrated there. With
    `ram_directory` its RAM is a file published there (see the module's doc), and `spec.reclaim` must be off.

    Runs that need the same template at once take turns on a lock; each writer migrates into a name
    of its own and renames it into place only when QEMU says the migration completed, then records
    its size and digest (and its RAM file's), so no reader ever sees a file that two writers wrote or
    one left half done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_suffix(".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (snapshot := load_snapshot(path)) is not None:
            return snapshot
        _forget(path)
        return _migrate_template(path, image, accel, spec, timeout_s, ram_directory)


def _forget(path: Path) -> None:
    """Drop an invalid snapshot's record, and the RAM file it named (a live clone keeps its mapping; a
    clone not yet started reads the new record, which names another file)."""
    try:
        ram = json.loads(snapshot_record(path).read_text()).get("ram") or {}
        if ram.get("path"):
            Path(ram["path"]).unlink(missing_ok=True)
    except (OSError, ValueError, AttributeError):
        pass
    snapshot_record(path).unlink(missing_ok=True)


def _migrate_template(
    path: Path, image: GuestImage, accel: str, spec: SandboxSpec, timeout_s: float, ram_directory: Path | None
) -> Snapshot:
    with scratch_dir("br-template-") as tmp, Supervisor(f"template-{os.getpid()}") as sup:
        qmp_socket = Path(tmp) / "qmp.sock"
        partial = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
        staging = staging_path(ram_directory) if ram_directory is not None else None
        template = Microvm(
            replace(spec, id="template", workdir=Path(tmp), gateway_port=None),
            image,
            sup,
            accel,
            extra_cmdline=TEMPLATE_CMDLINE,
            qmp_socket=qmp_socket,
            ram_file=RamFile(staging, shared=True) if staging is not None else None,
        )
        template.spawn()
        try:
            template.wait_ready()
            time.sleep(SETTLE_S)
            template.exec(DROP_CACHES, timeout=10)
            with Qmp(qmp_socket) as qmp:
                if staging is not None:
                    # RAM blocks that are share=on stay out of the stream: device state only.
                    qmp.execute(
                        "migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}]
                    )
                # Migrating a running guest (no `stop` first) records it as running, so a restore
                # resumes by itself without a QMP `cont`.
                qmp.execute("migrate", uri=f"exec:cat > {partial}")
                deadline = time.monotonic() + timeout_s
                while (status := qmp.execute("query-migrate").get("status")) not in ("completed", "failed"):
                    if time.monotonic() > deadline:
                        raise EnvironmentMissing(f"snapshot of the template guest took over {timeout_s:g} s")
                    time.sleep(0.02)
            if status != "completed":
                raise EnvironmentMissing("QEMU failed to snapshot the template guest; try --boot-mode cold")
            template.stop()  # its RAM file is final only once QEMU is gone
            record: dict[str, object] = {"bytes": partial.stat().st_size, "sha256": file_sha256(partial)}
            ram_file = None
            if staging is not None:
                ram_file, digest = publish(staging)
                record["ram"] = {"path": str(ram_file), "bytes": ram_file.stat().st_size, "sha256": digest}
            partial.replace(path)
            staged = snapshot_record(path).with_suffix(f".{os.getpid()}.json.partial")
            staged.write_text(json.dumps(record))
            staged.replace(snapshot_record(path))
            return Snapshot(path, ram_file)
        finally:
            template.stop()
            partial.unlink(missing_ok=True)
            if staging is not None:
                staging.unlink(missing_ok=True)
