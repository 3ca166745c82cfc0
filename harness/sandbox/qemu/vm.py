"""One QEMU `microvm` guest: its command line, its network as the guest sees it, spawn, readiness, exec, stop."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from harness.errors import EnvironmentMissing
from harness.image import GuestImage
from harness.sandbox.agent import GUEST_AGENT_PORT, AgentUnavailable, agent_exec, free_port
from harness.sandbox.base import BootFailed, BootRecord, Endpoint, ExecResult, GuestNetwork, SandboxSpec
from harness.supervisor import Supervisor, run_tool

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

GUEST_NETWORK = GuestNetwork(
    egress=Endpoint("10.0.2.100", 3128),
    egress_route="QEMU user networking (slirp, restrict=on) guestfwd: one socat per guest connection to the "
    "sandbox's own gateway listener on host loopback",
    agent_port=GUEST_AGENT_PORT,
    own_address="10.0.2.15",
    host_alias="10.0.2.2",
    resolver="10.0.2.3",
)
"""slirp's fixed layout: the guest's address, the host alias, slirp's DNS and the gateway's guestfwd address."""

GUEST_PREFIX_LEN = 24
"""slirp's network is 10.0.2.0/24."""

ENGINE_GUEST_ADDR = Endpoint("10.0.2.50", 2375)
"""Where a weakened guest finds the forwarded engine socket (a guestfwd must lie inside slirp's /24)."""

GUEST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
"""Where OpenSSL-style clients in the guest look for trusted CAs (the initramfs is writable)."""

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

PHASES = {
    "vmm": "spawn → kernel start (VMM set-up, firmware, kernel decompression)",
    "kernel": "kernel start → /init (guest uptime at init)",
    "userspace": "/init → network up (modules, mounts, interfaces)",
    "agent": "network up → first answer from the guest agent",
    "restore": "spawn → first agent answer of a guest restored from the template snapshot",
    "identity": "rename the clone and mix host randomness into its entropy pool",
}
"""Every phase a QEMU boot records (cold: the first four; snapshot: the last two), with its meaning."""

RESEED_BYTES = 64
"""Host randomness written into each restored clone's entropy pool."""

MEMINFO_RE = re.compile(rb"^(MemTotal|MemFree|MemAvailable):\s+(\d+) kB", re.M)

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
    out = run_tool([qemu_binary(), "--version"], capture_output=True, text=True, timeout=10).stdout
    return out.splitlines()[0] if out else "unknown"


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


@dataclass(frozen=True)
class Exposure:
    """How much of the host a guest's network reaches: restricted by default, loosened only for --leaky."""

    restricted: bool = True
    """slirp restrict=on: no way out but the guestfwd relays and the agent's hostfwd."""
    engine_socket: Path | None = None
    """A host engine socket forwarded to ENGINE_GUEST_ADDR inside (leaky only)."""


RESTRICTED = Exposure()
"""Every sandbox's network unless weakened."""


class Microvm:
    """One QEMU microvm: spawn, wait for its agent, exec commands, kill."""

    ca_bundle = GUEST_CA_BUNDLE

    def __init__(
        self,
        spec: SandboxSpec,
        image: GuestImage,
        supervisor: Supervisor,
        accel: str,
        restore_from: Path | None = None,
        extra_cmdline: str = "",
        qmp_socket: Path | None = None,
        exposure: Exposure = RESTRICTED,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.spec = spec
        self.accel = accel
        """kvm or tcg."""
        self.restore_from = restore_from
        """The template snapshot it resumes, or None for a cold boot."""
        self.restored = restore_from is not None
        self.extra_cmdline = extra_cmdline
        self.qmp_socket = qmp_socket
        """A QMP control socket (the template needs one to migrate itself into a snapshot)."""
        self.exposure = exposure
        self.extra_args = extra_args
        """Appended to QEMU's argv (tests freeze a guest with -S)."""
        self.network = (
            GUEST_NETWORK if exposure.engine_socket is None else replace(GUEST_NETWORK, engine=ENGINE_GUEST_ADDR)
        )
        self.id = spec.id
        self.image = image
        self.supervisor = supervisor
        self.boot = BootRecord()
        self.agent_port = free_port()
        """Host loopback port forwarded to the guest agent."""
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
        forwards = {GUEST_NETWORK.egress: f"{socat_binary()} - TCP:127.0.0.1:{gateway_port}"}
        if self.exposure.engine_socket is not None:
            forwards[ENGINE_GUEST_ADDR] = f"{socat_binary()} - UNIX-CONNECT:{self.exposure.engine_socket}"
        netdev = ",".join(
            [
                "user",
                "id=n0",
                f"restrict={'on' if self.exposure.restricted else 'off'}",
                *(f"guestfwd=tcp:{where}-cmd:{relay}" for where, relay in forwards.items()),
                f"hostfwd=tcp:127.0.0.1:{self.agent_port}-:{GUEST_NETWORK.agent_port}",
            ]
        )
        accel = (
            ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else ["-accel", f"tcg,tb-size={TCG_TB_SIZE_MIB}"]
        )
        restore = ["-incoming", f"exec:cat {self.restore_from}"] if self.restore_from is not None else []
        qmp = ["-qmp", f"unix:{self.qmp_socket},server=on,wait=off"] if self.qmp_socket is not None else []
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
            f"virtio-balloon-device,free-page-reporting={'on' if spec.reclaim else 'off'}",
            *qmp,
            *restore,
            *self.extra_args,
        ]

    def kernel_args(self) -> list[str]:
        """A restored guest's kernel is already in its RAM; passing -kernel again would only make QEMU
        hold another copy of the 14 MB bzImage for the firmware that never runs."""
        if self.restored:
            return []
        return ["-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd), "-append", self.cmdline()]

    def cmdline(self) -> str:
        """Kernel command line: tuned defaults, TCG's TSC hint, the guest's network (the image itself
        knows no address), the sandbox id, extras last."""
        tcg = tcg_cmdline() if self.accel == "tcg" else ""
        net = GUEST_NETWORK
        network = f"br.egress={net.egress} br.addr={net.own_address}/{GUEST_PREFIX_LEN} br.gw={net.host_alias}"
        return f"{KERNEL_CMDLINE}{tcg} {network} br.id={self.spec.id} {self.extra_cmdline}".strip()

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

    def guest_memory(self) -> dict[str, int] | None:
        return dict(self.guest_meminfo) or None

    def host_endpoints(self) -> dict[str, Endpoint]:
        return {"agent": Endpoint("127.0.0.1", self.agent_port)}
