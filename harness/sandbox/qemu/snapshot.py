"""Snapshot boots: restore a booted template guest instead of booting a kernel.

A template guest is cold-booted once per image, accelerator and RAM size, then live-migrated to a
file (QEMU `migrate exec:cat > FILE`); each sandbox starts QEMU with `-incoming exec:cat FILE` and
resumes where the template was, with its own network backend (own agent port, own gateway relay).
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
from harness.sandbox.qemu.vm import Microvm
from harness.scratch import scratch_dir
from harness.supervisor import Supervisor

TEMPLATE_CMDLINE = "init_on_free=1"
"""Zero freed pages in the template so they are left out of the snapshot."""

SNAPSHOT_FORMAT = 1
"""Bumped when the way templates are made changes."""

MIGRATE_TIMEOUT_S = 60.0
SETTLE_S = 1.0
"""Let the template's boot-time work (module init, ARP) finish before it is frozen."""

DROP_CACHES = "sync; echo 3 > /proc/sys/vm/drop_caches; echo 1 > /proc/sys/vm/compact_memory"


def snapshot_path(cache: Path, image: GuestImage, accel: str, spec: SandboxSpec, qemu_version: str) -> Path:
    """Content-addressed: image, accelerator, QEMU and every part of the shape a restore must match."""
    shape = f"{spec.mem_mib}|{spec.vcpus}|{spec.reclaim}"
    key = hashlib.sha256(f"{SNAPSHOT_FORMAT}|{image.digest}|{accel}|{shape}|{qemu_version}".encode()).hexdigest()
    return cache / "snapshots" / f"{key[:16]}.vmstate"


def snapshot_record(path: Path) -> Path:
    """The sidecar written after a snapshot is complete: its size and digest. No sidecar, no snapshot."""
    return path.with_suffix(".json")


def valid_snapshot(path: Path) -> bool:
    """A snapshot whose file is whole: same size and SHA-256 as when it was written. A truncated or
    half-written file (a killed run, a full disk) must be rebuilt, never restored."""
    try:
        record = json.loads(snapshot_record(path).read_text())
        if path.stat().st_size != record["bytes"]:
            return False
        with path.open("rb") as snapshot:
            return hashlib.file_digest(snapshot, "sha256").hexdigest() == record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def make_template(
    path: Path, image: GuestImage, accel: str, spec: SandboxSpec, timeout_s: float = MIGRATE_TIMEOUT_S
) -> Path:
    """The template snapshot at `path`: reused when valid, else cold-booted and migrated there.

    Runs that need the same template at once take turns on a lock; each writer migrates into a name
    of its own and renames it into place only when QEMU says the migration completed, then records
    its size and digest, so no reader ever sees a file that two writers wrote or one left half done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_suffix(".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if valid_snapshot(path):
            return path
        snapshot_record(path).unlink(missing_ok=True)
        _migrate_template(path, image, accel, spec, timeout_s)
    return path


def _migrate_template(path: Path, image: GuestImage, accel: str, spec: SandboxSpec, timeout_s: float) -> None:
    with scratch_dir("br-template-") as tmp, Supervisor(f"template-{os.getpid()}") as sup:
        qmp_socket = Path(tmp) / "qmp.sock"
        partial = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
        template = Microvm(
            replace(spec, id="template", workdir=Path(tmp), gateway_port=None),
            image,
            sup,
            accel,
            extra_cmdline=TEMPLATE_CMDLINE,
            qmp_socket=qmp_socket,
        )
        template.spawn()
        try:
            template.wait_ready()
            time.sleep(SETTLE_S)
            template.exec(DROP_CACHES, timeout=10)
            with Qmp(qmp_socket) as qmp:
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
            with partial.open("rb") as written:
                record = {"bytes": partial.stat().st_size, "sha256": hashlib.file_digest(written, "sha256").hexdigest()}
            partial.replace(path)
            staged = snapshot_record(path).with_suffix(f".{os.getpid()}.json.partial")
            staged.write_text(json.dumps(record))
            staged.replace(snapshot_record(path))
        finally:
            template.stop()
            partial.unlink(missing_ok=True)
