"""The embedded default backend: a QEMU `microvm` guest per sandbox, booted from the harness's image."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from harness.errors import EnvironmentMissing
from harness.image import GuestImage
from harness.sandbox.agent import AgentUnavailable, agent_exec
from harness.sandbox.base import BackendOptions, BootFailed, BootRecord, ExecResult, SandboxSpec
from harness.supervisor import Supervisor

QEMU_BINARY = "qemu-system-x86_64"
"""The VMM; Debian package qemu-system-x86."""

MACHINE = "microvm,pit=on,pic=on,rtc=on"
"""Under TCG the kernel stalls calibrating the TSC without the PIT (ENVIRONMENT.md)."""

KERNEL_CMDLINE = (
    "console=ttyS0 quiet loglevel=0 panic=-1 tsc=reliable no_timer_check cryptomgr.notests "
    "random.trust_cpu=on i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd 8250.nr_uarts=1 pci=off"
)
"""Measured to cut guest time to init from ~1.2 s to ~0.9 s under TCG."""

TCG_TB_SIZE_MIB = 64
"""Translation-block cache; QEMU's default (1 GiB) lets RSS grow with code translated."""

GUEST_AGENT_PORT = 7000
"""Port the guest agent listens on inside the guest; reached through a slirp hostfwd."""

GATEWAY_GUEST_ADDR = "10.0.2.100:3128"
"""Where the guest sees its gateway; slirp relays each connection to the host listener."""

READY_POLL_S = 0.02
"""Pause between agent probes while a guest boots."""

READY_PROBE_TIMEOUT_S = 0.5
"""One readiness probe's socket wait; slirp drops SYNs to a guest whose MAC it has not yet learnt,
so a long wait on an early probe would measure slirp's retransmit timer, not the guest."""

STOP_GRACE_S = 2.0
"""QEMU exits on SIGTERM at once; this bounds a wedged one."""

COLD_PHASES = [("kernel_start", "vmm"), ("init", "kernel"), ("network", "userspace"), ("agent_ready", "agent")]
"""(mark, phase ending at it) for a cold boot."""

RESTORE_PHASES = [("agent_ready", "restore"), ("identity", "identity")]
"""(mark, phase ending at it) for a snapshot restore."""

RESEED_BYTES = 64
"""Host randomness written into each restored clone's entropy pool."""

MEMINFO_RE = re.compile(rb"^(MemTotal|MemFree|MemAvailable):\s+(\d+) kB", re.M)

PORT_CLASH_ATTEMPTS = 3
"""Spawns tried when another process takes the agent port between our bind test and QEMU's bind."""

PR_SET_THP_DISABLE = 41
"""prctl option; inherited across fork and execve."""


def host_tsc_khz() -> int | None:
    """The host TSC rate, which a TCG guest's rdtsc runs at; None if it is not constant."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    if not mhz or not flags or "constant_tsc" not in flags.group(1).split():
        return None
    return round(float(mhz.group(1)) * 1000)


def tcg_cmdline() -> str:
    """Under TCG on a busy host the kernel's PIT calibration of the TSC fails and boot hangs
    (seen in 3 of 10 boots two at a time); handing it the host's TSC rate skips that calibration."""
    khz = host_tsc_khz()
    return f" tsc_early_khz={khz}" if khz else ""


def qemu_binary() -> str:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise EnvironmentMissing(f"{QEMU_BINARY} not found; run `apt-get install qemu-system-x86`")
    return path


def qemu_version() -> str:
    out = subprocess.run([qemu_binary(), "--version"], capture_output=True, text=True, timeout=10).stdout
    return out.splitlines()[0] if out else "unknown"


def free_port() -> int:
    """An ephemeral loopback port; QEMU binds it a moment later (a clash is retried, see QemuBackend.boot)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_libc = ctypes.CDLL(None, use_errno=True)


def disable_transparent_hugepages() -> None:
    """Runs in the QEMU child before exec. QEMU madvises guest RAM for huge pages, so a guest's
    scattered pages (above all after a snapshot restore) would cost 2 MiB each instead of 4 KiB."""
    _libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)


def socat_binary() -> str:
    path = shutil.which("socat")
    if path is None:
        raise EnvironmentMissing("socat not found; run `apt-get install socat` (it relays guest egress)")
    return path


class Microvm:
    """One QEMU microvm: spawn, wait for its agent, exec commands, kill."""

    def __init__(
        self,
        spec: SandboxSpec,
        image: GuestImage,
        supervisor: Supervisor,
        extra_cmdline: str = "",
        extra_args: tuple[str, ...] = (),
        restore_from: Path | None = None,
    ) -> None:
        self.spec = spec
        self.restored = restore_from is not None
        if restore_from is not None:
            extra_args = (*extra_args, "-incoming", f"exec:cat {restore_from}")
        self.extra_cmdline = extra_cmdline
        self.extra_args = extra_args
        self.id = spec.id
        self.image = image
        self.supervisor = supervisor
        self.boot = BootRecord()
        self.agent_port = free_port()
        self.guest_meminfo: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._spawned_at = 0.0
        self._console_lines: list[str] = []
        self._console_thread: threading.Thread | None = None
        spec.workdir.mkdir(parents=True, exist_ok=True)
        self.console_log = spec.workdir / "console.log"
        self.qemu_log = spec.workdir / "qemu.log"

    def argv(self) -> list[str]:
        """The full QEMU command line for this guest."""
        spec = self.spec
        gateway_port = spec.gateway_port if spec.gateway_port is not None else free_port()
        # slirp runs the cmd: once per guest connection; a tcp: target would be one shared stream.
        relay = f"{socat_binary()} - TCP:127.0.0.1:{gateway_port}"
        guest_ip, guest_port = GATEWAY_GUEST_ADDR.split(":")
        netdev = (
            f"user,id=n0,restrict=on,"
            f"guestfwd=tcp:{guest_ip}:{guest_port}-cmd:{relay},"
            f"hostfwd=tcp:127.0.0.1:{self.agent_port}-:{GUEST_AGENT_PORT}"
        )
        accel = (
            ["-accel", "kvm", "-cpu", "host"] if spec.accel == "kvm" else ["-accel", f"tcg,tb-size={TCG_TB_SIZE_MIB}"]
        )
        return [
            qemu_binary(),
            "-name",
            f"blastradius-{self.supervisor.run_id}-{spec.id}",
            "-M",
            MACHINE,
            *accel,
            "-m",
            str(spec.mem_mib),
            "-smp",
            str(spec.vcpus),
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
            *self.kernel_args(),
            "-netdev",
            netdev,
            "-device",
            "virtio-net-device,netdev=n0",
            "-device",
            f"virtio-balloon-device,free-page-reporting={'on' if spec.free_page_reporting else 'off'}",
            *self.extra_args,
        ]

    def kernel_args(self) -> list[str]:
        """A restored guest's kernel is already in its RAM; passing -kernel again would only make QEMU
        hold another copy of the 14 MB bzImage for the firmware that never runs."""
        if self.restored:
            return []
        return ["-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd), "-append", self.cmdline()]

    def cmdline(self) -> str:
        """Kernel command line: tuned defaults, TCG's TSC hint, the sandbox id, extras last."""
        tcg = tcg_cmdline() if self.spec.accel == "tcg" else ""
        return f"{KERNEL_CMDLINE}{tcg} br.id={self.spec.id} {self.extra_cmdline}".strip()

    def _mark(self, name: str, at: float | None = None) -> float:
        ms = ((at if at is not None else time.monotonic()) - self._spawned_at) * 1000.0
        self.boot.marks_ms.setdefault(name, round(ms, 2))
        return ms

    def _read_console(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.console_log.open("wb") as log:
            for raw in iter(self.proc.stdout.readline, b""):
                now = time.monotonic()
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace").strip()
                self._mark("first_serial", now)
                if line.startswith(("BR-INIT ", "BR-NET ")):
                    name = "init" if line.startswith("BR-INIT") else "network"
                    self._mark(name, now)
                    if name == "init":
                        uptime_s = float(line.split()[1])
                        self._mark("kernel_start", now - uptime_s)
                self._console_lines.append(line)
                del self._console_lines[:-50]

    def spawn(self) -> None:
        """Start QEMU; returns at once."""
        self._spawned_at = time.monotonic()
        with self.qemu_log.open("wb") as stderr:
            self.proc = self.supervisor.spawn(
                self.argv(),
                name=f"qemu:{self.id}",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                preexec_fn=disable_transparent_hugepages,
            )
        self._console_thread = threading.Thread(target=self._read_console, name=f"console-{self.id}", daemon=True)
        self._console_thread.start()

    def _failure(self, reason: str) -> BootFailed:
        tail = self.qemu_log.read_text(errors="replace").strip().splitlines()[-1:] if self.qemu_log.exists() else []
        if tail:
            reason = f"{reason}: {tail[0]}"
        return BootFailed(reason, self.boot)

    def wait_ready(self) -> None:
        """Poll the agent until it answers, QEMU dies, or the boot timeout passes."""
        assert self.proc is not None
        deadline = self._spawned_at + self.spec.boot_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise self._failure(f"qemu exited with status {self.proc.returncode} before the agent answered")
            if time.monotonic() > deadline:
                raise self._failure(f"agent did not answer within {self.spec.boot_timeout_s:g} s")
            try:
                result = agent_exec(
                    self.agent_port, "cat /proc/meminfo", timeout=5, transport_timeout=READY_PROBE_TIMEOUT_S
                )
            except AgentUnavailable:
                time.sleep(READY_POLL_S)
                continue
            ready_ms = self._mark("agent_ready")
            self.guest_meminfo = {k.decode(): int(v) * 1024 for k, v in MEMINFO_RE.findall(result.stdout)}
            self.boot.boot_ms = round(ready_ms, 2)
            self.boot.phases_ms = self._phases()
            return

    def _phases(self) -> dict[str, float]:
        """Consecutive phases between the marks that were seen; they sum to boot_ms."""
        phases: dict[str, float] = {}
        previous = 0.0
        for mark, phase in RESTORE_PHASES if self.restored else COLD_PHASES:
            if mark in self.boot.marks_ms:
                phases[phase] = round(self.boot.marks_ms[mark] - previous, 2)
                previous = self.boot.marks_ms[mark]
        return phases

    def reidentify(self) -> None:
        """A restored clone still carries the template's name and RNG state: rename it, mix in host randomness."""
        result = self.exec(f"hostname {self.id} && cat > /dev/urandom", stdin=os.urandom(RESEED_BYTES), timeout=10)
        if result.rc != 0:
            raise BootFailed(f"re-identifying the restored guest failed: {result.stderr!r}", self.boot)
        self.boot.boot_ms = round(self._mark("identity"), 2)
        self.boot.phases_ms = self._phases()

    def exec(self, command: str, timeout: float = 30.0, stdin: bytes = b"") -> ExecResult:
        return agent_exec(self.agent_port, command, timeout=timeout, stdin=stdin)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def stop(self) -> None:
        if self.proc is None:
            return
        self.supervisor.stop(self.proc.pid, grace_s=STOP_GRACE_S)
        if self._console_thread is not None:
            self._console_thread.join(timeout=2)

    def console_tail(self) -> list[str]:
        return list(self._console_lines)


class QemuBackend:
    """Boots Microvms from one guest image under one accelerator, cold or from template snapshots."""

    name = "qemu"

    def __init__(
        self,
        image: GuestImage,
        accel: str,
        accel_reason: str = "",
        boot_mode: str = "snapshot",
        cache: Path | None = None,
    ) -> None:
        self.image = image
        self.accel = accel
        self.accel_reason = accel_reason
        self.boot_mode = boot_mode
        """snapshot: restore each sandbox from a template booted with the same device set; cold: boot it."""
        self.cache = cache
        self._templates: dict[tuple[int, int, bool], Path] = {}
        self._template_lock = threading.Lock()

    def template_for(self, spec: SandboxSpec) -> Path | None:
        """The snapshot a sandbox of this shape restores from, made on first use; None when booting cold.

        A restore needs the same RAM size and devices as its template, so there is one per shape."""
        if self.boot_mode != "snapshot":
            return None
        from harness.sandbox.snapshot import make_template, snapshot_path

        assert self.cache is not None, "snapshot boots need a cache directory"
        shape = (spec.mem_mib, spec.vcpus, spec.free_page_reporting)
        with self._template_lock:
            if shape not in self._templates:
                path = snapshot_path(self.cache, self.image, self.accel, spec, qemu_version())
                self._templates[shape] = make_template(path, self.image, spec)
            return self._templates[shape]

    def boot(self, spec: SandboxSpec, supervisor: Supervisor) -> Microvm:
        template = self.template_for(spec)
        for attempt in range(1, PORT_CLASH_ATTEMPTS + 1):
            vm = Microvm(spec, self.image, supervisor, restore_from=template)
            vm.spawn()
            try:
                vm.wait_ready()
                if vm.restored:
                    vm.reidentify()
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

    def describe(self) -> dict[str, object]:
        return {
            "vmm": qemu_version(),
            "machine": MACHINE,
            "accel": self.accel,
            "accel_reason": self.accel_reason,
            "boot_mode": self.boot_mode,
            "snapshot_bytes": {
                f"{mem}MiB/{cpus}cpu/fpr={'on' if fpr else 'off'}": path.stat().st_size
                for (mem, cpus, fpr), path in self._templates.items()
            },
            "tcg_tb_size_mib": TCG_TB_SIZE_MIB if self.accel == "tcg" else None,
            "kernel_cmdline": KERNEL_CMDLINE + (tcg_cmdline() if self.accel == "tcg" else ""),
            "kernel_release": self.image.kernel_release,
            "initramfs_bytes": self.image.initrd.stat().st_size,
            "image_digest": self.image.digest,
            "guest_modules": list(self.image.modules),
        }


def create_backend(options: BackendOptions) -> QemuBackend:
    """Build (or reuse) the guest image, decide the accelerator, and make the default template snapshot
    now, so that the first measured boot is a restore like every other one."""
    from harness.image import build_image
    from harness.sandbox.accel import decide_accel

    qemu_binary()
    socat_binary()
    image = build_image(options.cache)
    verdict = decide_accel(options.accel, image, options.cache / "accel-verdicts.json")
    reason = verdict.reason + (" (cached verdict)" if verdict.cached else "")
    backend = QemuBackend(image, verdict.accel, reason, options.boot_mode, options.cache)
    backend.template_for(
        SandboxSpec(
            id="template", workdir=options.cache, accel=verdict.accel, mem_mib=options.mem_mib, vcpus=options.vcpus
        )
    )
    return backend
