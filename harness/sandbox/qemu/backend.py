"""The embedded default backend: a QEMU `microvm` guest per sandbox, booted from the harness's image,
cold or restored from a template snapshot."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

from harness.errors import ConfigError, EnvironmentMissing
from harness.image import GuestImage, build_image
from harness.image.catalog import IMAGES, image_kind
from harness.paths import cache_dir
from harness.sandbox.base import BOOT_MODES, MEMORY_SHARING, BackendOptions, BootFailed, Features, SandboxSpec
from harness.sandbox.qemu.accel import decide_accel
from harness.sandbox.qemu.ramfile import on_tmpfs, ram_dir, sweep_staging
from harness.sandbox.qemu.snapshot import make_template, snapshot_path
from harness.sandbox.qemu.vm import (
    KERNEL_CMDLINE,
    MACHINE,
    PHASES,
    RESTRICTED,
    TCG_TB_SIZE_MIB,
    Exposure,
    Microvm,
    Snapshot,
    qemu_binary,
    qemu_version,
    socat_binary,
    tcg_cmdline,
)
from harness.supervisor import Supervisor

FEATURES = Features(
    snapshot=True,
    reclaim=True,
    own_kernel=True,
    weaken=True,
    guest_memory=True,
    min_mem_mib=96,
    memory_sharing=MEMORY_SHARING,
    images=tuple(IMAGES),
)
"""The 6.1 guest kernel panics below 96 MiB."""

PORT_CLASH_ATTEMPTS = 3
"""Spawns tried when another process takes the agent port between our bind test and QEMU's bind."""


class QemuBackend:
    """Boots Microvms from one guest image under one accelerator, cold or from template snapshots."""

    name = "qemu"
    features = FEATURES
    phases = PHASES

    def __init__(
        self,
        image: GuestImage,
        accel: str,
        accel_reason: str = "",
        boot_mode: str = "snapshot",
        cache: Path | None = None,
        exposure: Exposure = RESTRICTED,
        memory_sharing: str = "off",
    ) -> None:
        self.image = image
        self.tls_profile = image_kind(image.name).tls_profile
        self.accel = accel
        self.accel_reason = accel_reason
        self.boot_mode = boot_mode
        """snapshot: restore each sandbox from a template booted with the same device set; cold: boot it."""
        self.cache = cache
        self.exposure = exposure
        """Restricted unless weakened for --leaky."""
        self.memory_sharing = memory_sharing
        """How clones share host memory (MEMORY_SHARING); KSM itself is switched on by the run."""
        self.file_backed = "file" in memory_sharing and boot_mode == "snapshot"
        """By default (Run's spec template), templates keep their RAM in a file every clone maps privately;
        each spec says so itself (`shared_ram`), so one backend can boot both kinds side by side."""
        if self.file_backed:
            # Free page reporting would punch holes into the template's file (see snapshot.py).
            self.features = replace(FEATURES, reclaim=False)
        self._templates: dict[tuple[int, int, bool, bool], Snapshot] = {}
        self._template_lock = threading.Lock()

    def template_for(self, spec: SandboxSpec) -> Snapshot | None:
        """The snapshot a sandbox of this shape restores from, made on first use; None when booting cold.

        A restore needs the same RAM size and devices as its template, so there is one per shape."""
        if self.boot_mode != "snapshot":
            return None
        assert self.cache is not None, "snapshot boots need a cache directory"
        if spec.shared_ram and spec.reclaim:
            raise ConfigError(
                "a shared template RAM file (--memory-sharing file) needs free page reporting off (a discard "
                "would punch holes into it); use --memory-sharing off or ksm for reclaim"
            )
        shape = (spec.mem_mib, spec.vcpus, spec.reclaim, spec.shared_ram)
        with self._template_lock:
            if shape not in self._templates:
                path = snapshot_path(self.cache, self.image, self.accel, spec, qemu_version(), spec.shared_ram)
                directory = ram_dir(self.cache) if spec.shared_ram else None
                self._templates[shape] = make_template(path, self.image, self.accel, spec, ram_directory=directory)
            return self._templates[shape]

    def boot(self, spec: SandboxSpec, supervisor: Supervisor) -> Microvm:
        template = self.template_for(spec)
        for attempt in range(1, PORT_CLASH_ATTEMPTS + 1):
            vm = Microvm(spec, self.image, supervisor, self.accel, restore_from=template, exposure=self.exposure)
            vm.spawn()
            try:
                vm.wait_ready()
                return vm
            except BootFailed as failure:
                vm.stop()
                # Not a retried boot: QEMU never started the guest because its agent port was taken.
                if "host forwarding rule" not in failure.reason or attempt == PORT_CLASH_ATTEMPTS:
                    raise
            except BaseException:
                vm.stop()
                raise
        raise AssertionError("unreachable")

    def weaken(self, engine_socket: Path) -> QemuBackend:
        """Unrestricted user networking (host loopback at the host alias, direct egress) and the host's
        engine socket forwarded into every guest; same image, accelerator and templates."""
        weak = QemuBackend(
            self.image,
            self.accel,
            self.accel_reason,
            self.boot_mode,
            self.cache,
            replace(self.exposure, restricted=False, engine_socket=engine_socket),
            self.memory_sharing,
        )
        weak._templates = self._templates  # the netdev may differ on restore; the device set is the same
        return weak

    def describe(self) -> dict[str, object]:
        return {
            "vmm": qemu_version(),
            "machine": MACHINE,
            "accel": self.accel,
            "accel_reason": self.accel_reason,
            "boot_mode": self.boot_mode,
            "memory_sharing": self.memory_sharing,
            "network": "restricted" if self.exposure.restricted else "unrestricted (weakened)",
            "snapshot_bytes": {
                _shape_label(shape): template.vmstate.stat().st_size for shape, template in self._templates.items()
            },
            "template_ram": {
                _shape_label(shape): {
                    "path": str(template.ram_file),
                    "bytes": template.ram_file.stat().st_size,
                    "allocated_bytes": template.ram_file.stat().st_blocks * 512,
                    "on_tmpfs": on_tmpfs(template.ram_file),
                }
                for shape, template in self._templates.items()
                if template.ram_file is not None
            },
            "shared_files": [str(t.ram_file) for t in self._templates.values() if t.ram_file is not None],
            "tcg_tb_size_mib": TCG_TB_SIZE_MIB if self.accel == "tcg" else None,
            "kernel_cmdline": KERNEL_CMDLINE + (tcg_cmdline() if self.accel == "tcg" else ""),
            "image": self.image.name,
            "tls_profile": self.tls_profile,
            "root_disk_bytes": self.image.disk.stat().st_size if self.image.disk else None,
            "image_build": {k: v for k, v in self.image.build.items() if k != "package_versions"},
            "kernel_release": self.image.kernel_release,
            "initramfs_bytes": self.image.initrd.stat().st_size,
            "image_digest": self.image.digest,
            "guest_modules": list(self.image.modules),
        }


def _shape_label(shape: tuple[int, int, bool, bool]) -> str:
    mem, cpus, fpr, shared_ram = shape
    return f"{mem}MiB/{cpus}cpu/fpr={'on' if fpr else 'off'}" + ("/ram-file" if shared_ram else "")


def sweep_leftovers() -> list[str]:
    """For `invoke clean`: template RAM files that a killed template build left on tmpfs."""
    return sweep_staging(ram_dir(cache_dir()))


def check_argument(argument: str | None) -> None:
    """`qemu:cold` or `qemu:snapshot` picks the boot mode for this backend alone, so one run can compare both."""
    if argument is not None and argument not in BOOT_MODES:
        raise ConfigError(f"--backend qemu:{argument}: after the colon give a boot mode: {', '.join(BOOT_MODES)}")


def create_backend(options: BackendOptions) -> QemuBackend:
    """Build (or reuse) the guest image, decide the accelerator, and make the default template snapshot
    now, so that the first measured boot is a restore like every other one."""
    qemu_binary()
    socat_binary()
    image = build_image(options.cache, options.image)
    # The canary boot needs no userland: the small busybox image decides the accelerator for every image.
    canary = image if image.disk is None else build_image(options.cache)
    verdict = decide_accel(options.accel, canary, options.cache / "accel-verdicts.json")
    reason = verdict.reason + (" (cached verdict)" if verdict.cached else "")
    boot_mode = options.argument or options.boot_mode
    backend = QemuBackend(image, verdict.accel, reason, boot_mode, options.cache, memory_sharing=options.memory_sharing)
    try:
        backend.template_for(
            SandboxSpec(
                id="template",
                workdir=options.cache,
                mem_mib=options.mem_mib,
                vcpus=options.vcpus,
                reclaim=backend.features.reclaim,
                shared_ram=backend.file_backed,
            )
        )
    except BootFailed as failed:
        # Nothing can be measured without the template: one line, not a traceback.
        raise EnvironmentMissing(
            f"the {image.name} template guest did not boot under {verdict.accel} ({failed.reason}); "
            "try --boot-mode cold to see a guest's console log in the run directory"
        ) from None
    return backend
