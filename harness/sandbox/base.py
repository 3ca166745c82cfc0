"""The small protocol every sandbox backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from harness.supervisor import Supervisor

BOOT_MODES = ("snapshot", "cold")
"""snapshot: restore a booted template (default, where the backend can); cold: boot from scratch every time."""


@dataclass(frozen=True)
class SandboxSpec:
    """What the harness asks a backend to boot."""

    id: str
    """Unique within a run; also the guest hostname."""
    workdir: Path
    """Host-side directory for this sandbox's logs and sockets; never shared into the guest."""
    gateway_port: int | None = None
    """Host loopback port of this sandbox's gateway listener (the guest's only egress)."""
    mem_mib: int = 128
    """Guest RAM."""
    vcpus: int = 1
    """Guest vCPUs."""
    accel: str = "tcg"
    """kvm or tcg, decided by the accel probe."""
    boot_timeout_s: float = 60.0
    """A guest whose agent has not answered by then is a failed boot."""
    free_page_reporting: bool = True
    """virtio-balloon free page reporting: the guest hands freed RAM back to the host (ram-pressure turns it
    off to measure the difference; a snapshot template is made with it on, so restore only with it on)."""


@dataclass(frozen=True)
class BackendOptions:
    """Settings a backend is created with, from flags and invoke.yaml."""

    cache: Path
    """Host cache for images and verdicts."""
    accel: str = "auto"
    """auto, kvm or tcg (backends without a hypervisor ignore it)."""
    mem_mib: int = 128
    """Guest RAM per sandbox."""
    vcpus: int = 1
    """vCPUs per sandbox."""
    boot_mode: str = "snapshot"
    """snapshot (restore a booted template) or cold (boot the kernel each time), where the backend can."""


@dataclass
class ExecResult:
    """The outcome of one command run inside a sandbox."""

    rc: int
    """Exit code; 137 (SIGKILL) with timed_out=True when the guest-side timeout killed it."""
    stdout: bytes
    """Everything the command wrote to stdout."""
    stderr: bytes
    """Everything the command wrote to stderr."""
    duration_s: float
    """Host wall time from connect to the last byte."""
    timed_out: bool = False
    """True when the command ran past its timeout."""

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


@dataclass
class BootRecord:
    """Timestamps of one boot, all in ms since spawn on the host's monotonic clock."""

    phases_ms: dict[str, float] = field(default_factory=dict)
    """Named phase durations that add up to boot_ms."""
    marks_ms: dict[str, float] = field(default_factory=dict)
    """Named instants (first serial output, kernel start, init, network up, agent ready)."""
    boot_ms: float | None = None
    """Spawn to agent ready; None if the boot failed."""


@runtime_checkable
class Sandbox(Protocol):
    """One booted sandbox."""

    id: str
    boot: BootRecord

    def exec(self, command: str, timeout: float = 30.0, stdin: bytes = b"") -> ExecResult:
        """Run a shell command inside; the timeout is enforced on both sides."""
        ...

    def stop(self) -> None:
        """Stop the sandbox and reap every host process it owns. Idempotent."""
        ...

    def pids(self) -> list[int]:
        """Host pids whose memory is this sandbox's cost (the VMM, helpers)."""
        ...


class Backend(Protocol):
    """A way to run sandboxes: one module under harness/sandbox/ per backend."""

    name: str
    """Backend name used on the command line."""
    accel: str
    """kvm, tcg, or "none" for backends without a hypervisor."""

    def boot(self, spec: SandboxSpec, supervisor: Supervisor) -> Sandbox:
        """Start a sandbox and return once its agent answers; raise BootFailed otherwise."""
        ...

    def describe(self) -> dict[str, object]:
        """Versions and settings that belong in results.json (binary versions, accel, image)."""
        ...


class BootFailed(Exception):
    """A sandbox did not come up; carries the phases reached so far."""

    def __init__(self, reason: str, boot: BootRecord) -> None:
        super().__init__(reason)
        self.reason = reason
        self.boot = boot
