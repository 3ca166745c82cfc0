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
from typing import Any

from harness.errors import EnvironmentMissing
from harness.image import GuestImage
from harness.sandbox.agent import GUEST_AGENT_PORT, AgentUnavailable, agent_exec, free_port
from harness.sandbox.base import BootFailed, BootRecord, Endpoint, ExecResult, GuestNetwork, SandboxSpec
from harness.sandbox.qemu.qmp import Qmp, QmpError
from harness.scratch import make_scratch_dir, remove_scratch_dir
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
"""One readiness probe's socket wait during a cold boot; slirp drops SYNs to a guest whose MAC it has
not yet learnt, so a long wait on an early probe would measure slirp's retransmit timer, not the guest."""

RESTORED_PROBE_TIMEOUT_S = 3.0
"""The same for a restored clone, probed only once QEMU says it runs: its network is up, and its first
answer takes ~250-400 ms under TCG (every path translated afresh). A 0.5 s wait gave up on one in two
of them, and the retry queued behind the abandoned request: ~500 ms lost per clone (measured here)."""

ROOT_DISK_PROBE_TIMEOUT_S = 15.0
"""The same for an image with a root disk (debian) once its own init runs, or restored: its network is up, and
its first answer runs a dynamically linked userland that TCG translates afresh (~1 s cold, ~4 s for a clone on
a busy host, measured here); an abandoned probe would only queue the next one behind it."""

STOP_GRACE_S = 2.0
"""QEMU exits on SIGTERM at once; this bounds a wedged one."""

COLD_PHASES = [
    ("kernel_start", "vmm"),
    ("init", "kernel"),
    ("network", "userspace"),
    ("root", "switch_root"),
    ("agent_ready", "agent"),
]
"""(mark, phase ending at it) for a cold boot; an image without a root disk has no `root` mark."""

CONSOLE_MARKS = {"BR-INIT": "init", "BR-NET": "network", "BR-ROOT": "root"}
"""What the guest's init scripts print on the serial line (with the guest uptime), and the mark each sets."""

RESTORE_PHASES = [("qmp", "qemu_start"), ("running", "state_load"), ("agent_ready", "first_answer")]
"""(mark, phase ending at it) for a snapshot restore."""

PHASES = {
    "vmm": "spawn → kernel start (VMM set-up, firmware, kernel decompression)",
    "kernel": "kernel start → /init (guest uptime at init)",
    "userspace": "/init → network up (modules, mounts, interfaces)",
    "switch_root": "network up → the image's own init on its root disk (mount the disk and overlay, switch_root); "
    "debian image only",
    "agent": "network up (or the image's own init) → first answer from the guest agent",
    "qemu_start": "spawn → QEMU's QMP greeting (QEMU set up, no guest state yet)",
    "state_load": "QMP greeting → the guest running (QMP RESUME event): capabilities, migrate-incoming, the "
    "vmstate read, and the resume, which QEMU 7.2 does in the step that ends the load",
    "first_answer": "guest running → first answer of its agent, the request that also renames the clone and "
    "mixes host randomness into its entropy pool",
}
"""Every phase a QEMU boot records (cold: the first four; snapshot: the last three), with its meaning."""

QMP_SOCKET_NAME = "qmp.sock"
"""A clone's QMP socket, in a short scratch directory (a run directory's path can pass the 108-byte
limit of a unix socket's name)."""

QMP_SOCKET_POLL_S = 0.005
"""Pause between looks for a clone's QMP socket while QEMU starts."""

MIGRATION_DONE = ("completed", "failed", "cancelled")
"""Final states of QEMU's MIGRATION event."""

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
class RamFile:
    """Guest RAM backed by a file (QEMU memory-backend-file) instead of anonymous memory."""

    path: Path
    """The file: a template's staging file, or the published template RAM a clone maps."""
    shared: bool
    """True (share=on): the guest's writes go to the file (a template); False (share=off): a private,
    copy-on-write mapping whose writes stay in the clone."""


@dataclass(frozen=True)
class Snapshot:
    """What a clone resumes from: a template's vmstate, and its RAM file where the RAM is not in it."""

    vmstate: Path
    """Device state, and the guest's RAM too unless `ram_file` is set."""
    ram_file: Path | None = None
    """The template's RAM (migrated with x-ignore-shared, so the vmstate holds device state only)."""


@dataclass(frozen=True)
class Exposure:
    """How much of the host a guest's network reaches: restricted by default, loosened only for --leaky."""

    restricted: bool = True
    """slirp restrict=on: no way out but the guestfwd relays and the agent's hostfwd."""
    engine_socket: Path | None = None
    """A host engine socket forwarded to ENGINE_GUEST_ADDR inside (leaky only)."""


RESTRICTED = Exposure()
"""Every sandbox's network unless weakened."""


def _event_instant(event: dict[str, Any]) -> float:
    """A QMP event's timestamp (wall clock) on this process's monotonic clock."""
    stamp = event["timestamp"]
    wall = stamp["seconds"] + stamp["microseconds"] / 1e6
    return wall + (time.monotonic() - time.time())


class Microvm:
    """One QEMU microvm: spawn, wait for its agent, exec commands, kill."""

    ca_bundle = GUEST_CA_BUNDLE

    def __init__(
        self,
        spec: SandboxSpec,
        image: GuestImage,
        supervisor: Supervisor,
        accel: str,
        restore_from: Snapshot | None = None,
        extra_cmdline: str = "",
        qmp_socket: Path | None = None,
        exposure: Exposure = RESTRICTED,
        extra_args: tuple[str, ...] = (),
        ram_file: RamFile | None = None,
    ) -> None:
        self.spec = spec
        self.accel = accel
        """kvm or tcg."""
        self.restore_from = restore_from
        """The template snapshot it resumes, or None for a cold boot."""
        self.restored = restore_from is not None
        self.ram_file = (
            RamFile(restore_from.ram_file, shared=False)
            if restore_from is not None and restore_from.ram_file is not None
            else ram_file
        )
        """Its RAM's file, where it has one: a clone of a file-backed template maps the template's privately."""
        if self.ram_file is not None and spec.reclaim:
            # QEMU 7.2 punches holes into a file-backed RAM block on any discard, even under a private
            # mapping: one clone's free page reporting would shrink the template every clone maps.
            raise ValueError("file-backed guest RAM needs free page reporting off (spec.reclaim=False)")
        self.extra_cmdline = extra_cmdline
        self.qmp_socket = qmp_socket
        """A QMP control socket (the template migrates itself into a snapshot through it, a clone restores)."""
        self._qmp_dir: Path | None = None
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
        # A clone waits for its state (-incoming defer) until wait_ready hands it over QMP, which times
        # the restore by QEMU's own events and sets the capabilities a file-backed template needs.
        restore = ["-incoming", "defer"] if self.restored else []
        qmp = ["-qmp", f"unix:{self.qmp_socket},server=on,wait=off"] if self.qmp_socket is not None else []
        machine, memory = MACHINE, []
        if self.ram_file is not None:
            machine += ",memory-backend=mem"
            share = "on" if self.ram_file.shared else "off"
            memory = [
                "-object",
                f"memory-backend-file,id=mem,size={spec.mem_mib}M,mem-path={self.ram_file.path},share={share}",
            ]
        return [
            qemu_binary(),
            "-name",
            f"blastradius-{self.supervisor.run_id}-{spec.id}",
            "-M",
            machine,
            *memory,
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
            *self.disk_args(),
            "-device",
            f"virtio-balloon-device,free-page-reporting={'on' if spec.reclaim else 'off'}",
            *qmp,
            *restore,
            *self.extra_args,
        ]

    def disk_args(self) -> list[str]:
        """The image's read-only root disk, where it has one; a clone gets the same device as its template."""
        if self.image.disk is None:
            return []
        return [
            "-drive",
            f"file={self.image.disk},format=raw,if=none,id=root,readonly=on",
            "-device",
            "virtio-blk-device,drive=root",
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
                marker = line.split(" ", 1)[0]
                if marker in CONSOLE_MARKS and " " in line:
                    name = CONSOLE_MARKS[marker]
                    self._mark(name, now)
                    if name == "init":
                        uptime_s = float(line.split()[1])
                        self._mark("kernel_start", now - uptime_s)
                self._console_lines.append(line)
                del self._console_lines[:-50]

    def spawn(self) -> None:
        """Start QEMU; returns at once."""
        if self.restored and self.qmp_socket is None:
            self._qmp_dir = make_scratch_dir("br-qmp-")
            self.qmp_socket = self._qmp_dir / QMP_SOCKET_NAME
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
        if self.restored:
            self._resume(deadline)
        while True:
            if self.proc.poll() is not None:
                raise self._failure(f"qemu exited with status {self.proc.returncode} before the agent answered")
            if time.monotonic() > deadline:
                raise self._failure(f"agent did not answer within {self.spec.boot_timeout_s:g} s")
            try:
                result = self._probe(deadline - time.monotonic())
            except AgentUnavailable:
                time.sleep(READY_POLL_S)
                continue
            ready_ms = self._mark("agent_ready")
            if result.rc != 0:
                raise BootFailed(f"the first request to the guest agent failed: {result.stderr[-200:]!r}", self.boot)
            self.guest_meminfo = {k.decode(): int(v) * 1024 for k, v in MEMINFO_RE.findall(result.stdout)}
            self.boot.boot_ms = round(ready_ms, 2)
            self.boot.phases_ms = self._phases()
            return

    def _resume(self, deadline: float) -> None:
        """Hand a clone waiting in `-incoming defer` its vmstate over QMP and wait until it runs, marking
        QMP's greeting, the end of the load and the resume by QEMU's own event timestamps."""
        assert self.restore_from is not None and self.qmp_socket is not None
        capabilities = [{"capability": "events", "state": True}]
        if self.ram_file is not None:
            # The template's RAM blocks were share=on and left out of the vmstate; the clone maps the file.
            capabilities.append({"capability": "x-ignore-shared", "state": True})
        if not self.restore_from.vmstate.exists():  # QEMU 7.2 would wait on an empty stream until the deadline
            raise self._failure(f"the template snapshot {self.restore_from.vmstate} is gone")
        while not self.qmp_socket.exists():  # a QEMU that dies on start must not be waited for until the deadline
            if self.proc is not None and self.proc.poll() is not None:
                raise self._failure(f"qemu exited with status {self.proc.returncode} before its QMP socket")
            if time.monotonic() > deadline:
                raise self._failure(f"QEMU set up no QMP socket within {self.spec.boot_timeout_s:g} s")
            time.sleep(QMP_SOCKET_POLL_S)
        try:
            with Qmp(self.qmp_socket, timeout_s=max(deadline - time.monotonic(), 0.1)) as qmp:
                self._mark("qmp")
                qmp.execute("migrate-set-capabilities", capabilities=capabilities)
                qmp.execute("migrate-incoming", uri=f"exec:cat {self.restore_from.vmstate}")
                while (loaded := qmp.wait_event(("MIGRATION",), deadline - time.monotonic()))["data"][
                    "status"
                ] not in MIGRATION_DONE:
                    pass
                if loaded["data"]["status"] != "completed":
                    raise self._failure(f"restoring the template snapshot ended {loaded['data']['status']}")
                self._mark("migration_completed", _event_instant(loaded))
                self._mark("running", _event_instant(qmp.wait_event(("RESUME",), deadline - time.monotonic())))
        except (OSError, TimeoutError, ValueError, QmpError) as exc:
            if self.proc is not None and self.proc.poll() is not None:
                raise self._failure(f"qemu exited with status {self.proc.returncode} while restoring") from None
            raise self._failure(f"restoring the template snapshot over QMP failed ({exc})") from None

    def _phases(self) -> dict[str, float]:
        """Consecutive phases between the marks that were seen; they sum to boot_ms."""
        phases: dict[str, float] = {}
        previous = 0.0
        for mark, phase in RESTORE_PHASES if self.restored else COLD_PHASES:
            if mark in self.boot.marks_ms:
                phases[phase] = round(self.boot.marks_ms[mark] - previous, 2)
                previous = self.boot.marks_ms[mark]
        return phases

    def _probe(self, left_s: float) -> ExecResult:
        """One readiness request: the guest's meminfo; a restored clone, which still carries the template's
        name and RNG state, is renamed and given host randomness in the same request (one agent round
        trip costs ~100-200 ms under TCG, so not two). Never waits past the boot's deadline (`left_s`)."""
        if self.image.disk is not None and (self.restored or "root" in self.boot.marks_ms):
            wait_s = ROOT_DISK_PROBE_TIMEOUT_S
        else:
            wait_s = RESTORED_PROBE_TIMEOUT_S if self.restored else READY_PROBE_TIMEOUT_S
        wait = max(min(wait_s, left_s), 0.01)
        if not self.restored:
            return agent_exec(self.agent_port, "cat /proc/meminfo", timeout=5, transport_timeout=wait)
        return agent_exec(
            self.agent_port,
            # echo is a shell builtin: under TCG each exec a clone is spared in its first request is ~10-30 ms.
            f"echo {self.id} > /proc/sys/kernel/hostname && cat > /dev/urandom && cat /proc/meminfo",
            timeout=10,
            stdin=os.urandom(RESEED_BYTES),
            transport_timeout=wait,
        )

    def exec(self, command: str, timeout: float = 30.0, stdin: bytes = b"") -> ExecResult:
        return agent_exec(self.agent_port, command, timeout=timeout, stdin=stdin)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def stop(self) -> None:
        if self.proc is not None:
            self.supervisor.stop(self.proc.pid, grace_s=STOP_GRACE_S)
            if self._console_thread is not None:
                self._console_thread.join(timeout=2)
        if self._qmp_dir is not None:
            remove_scratch_dir(self._qmp_dir)

    def console_tail(self) -> list[str]:
        return list(self._console_lines)

    def guest_memory(self) -> dict[str, int] | None:
        return dict(self.guest_meminfo) or None

    def host_endpoints(self) -> dict[str, Endpoint]:
        return {"agent": Endpoint("127.0.0.1", self.agent_port)}
