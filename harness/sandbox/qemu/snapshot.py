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

import hashlib
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from harness.errors import EnvironmentMissing
from harness.image import GuestImage
from harness.sandbox.base import SandboxSpec
from harness.sandbox.qemu.qmp import Qmp
from harness.sandbox.qemu.vm import Microvm
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


def make_template(
    path: Path, image: GuestImage, accel: str, spec: SandboxSpec, timeout_s: float = MIGRATE_TIMEOUT_S
) -> Path:
    """Cold-boot a template guest and migrate it to `path`; a no-op when the snapshot exists."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="br-template-") as tmp, Supervisor(f"template-{os.getpid()}") as sup:
        qmp_socket = Path(tmp) / "qmp.sock"
        partial = path.with_suffix(".partial")
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
        finally:
            template.stop()
        partial.replace(path)
    return path
