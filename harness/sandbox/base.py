"""The protocol every sandbox backend implements, and the records it hands its callers.

Callers (fleet, bench, scenarios, report) use only what is here: a new backend is one module
(or package) under harness/sandbox/ that exposes `create_backend(options) -> Backend` and a
module-level `FEATURES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from harness.image.catalog import IMAGES
from harness.supervisor import Supervisor

BOOT_MODES = ("snapshot", "cold")
"""snapshot: restore a booted template (default, where the backend can); cold: boot from scratch every time."""

MEMORY_SHARING = ("off", "file", "ksm", "file+ksm")
"""How sandboxes share host memory: off (each clone holds its own copy of the template's RAM); file (the
template's RAM is a file every clone maps privately, copy-on-write); ksm (Linux KSM merges identical
pages while the run lasts); file+ksm (both)."""


@dataclass(frozen=True)
class Endpoint:
    """A TCP address."""

    host: str
    """IP address or name."""
    port: int
    """TCP port."""

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class GuestNetwork:
    """A sandbox's network as its own processes see it, and how its egress reaches the host."""

    egress: Endpoint
    """The HTTP proxy the sandbox's tools use: its only way out, relayed to its own gateway listener."""
    egress_route: str
    """How a connection to `egress` reaches the gateway listener on the host, in words (for the report)."""
    agent_port: int | None
    """Port the guest agent listens on, from inside the sandbox; None where it listens on a unix socket."""
    own_address: str
    """The sandbox's own address, where its agent answers from inside."""
    host_alias: str | None
    """The address inside that means the host (its loopback) if isolation were broken; None when none exists."""
    resolver: str | None
    """The DNS server the network itself offers (which must not answer a blocked name); None when none."""
    engine: Endpoint | None = None
    """Where a weakened (--leaky) sandbox reaches the host's forwarded container-engine socket."""
    agent_socket: str | None = None
    """Path inside of the unix socket the guest agent listens on (a jail's channel); None where it has a port."""


@dataclass(frozen=True)
class Features:
    """What a backend can do, so callers ask instead of assuming."""

    snapshot: bool
    """Boots can restore a booted template (--boot-mode snapshot)."""
    reclaim: bool
    """The guest can hand freed memory back to the host (virtio-balloon free page reporting)."""
    own_kernel: bool
    """The sandbox runs a kernel of its own, not the host's."""
    weaken: bool
    """`Backend.weaken` can really loosen the set-up for `isolation --leaky`."""
    guest_memory: bool
    """`Sandbox.guest_memory()` reports the guest's own MemTotal and MemFree."""
    min_mem_mib: int | None
    """Smallest guest RAM it boots with; None where guest RAM is not a setting."""
    memory_sharing: tuple[str, ...] = ("off",)
    """The --memory-sharing modes it implements (of MEMORY_SHARING)."""
    images: tuple[str, ...] = ("busybox",)
    """The guest images (--image, harness.image.catalog) it runs."""


PROCESS_FEATURES = Features(
    snapshot=False,
    reclaim=False,
    own_kernel=False,
    weaken=False,
    guest_memory=False,
    min_mem_mib=None,
    images=tuple(IMAGES),
)
"""A sandbox that is host processes on the host's kernel (a jail, a plain process, a user's stack): nothing to
snapshot, no guest memory of its own, nothing to weaken; it runs either image's userland."""


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
    """Guest RAM, where the backend has such a setting."""
    vcpus: int = 1
    """Guest vCPUs, where the backend has such a setting."""
    boot_timeout_s: float = 60.0
    """A sandbox whose agent has not answered by then is a failed boot."""
    reclaim: bool = True
    """Hand freed guest memory back to the host, where the backend can (ram-pressure turns it off to
    measure the difference)."""
    shared_ram: bool = False
    """Map the template's RAM from a file every clone of it shares copy-on-write, where the backend can
    (--memory-sharing file); needs reclaim off."""
    user_home: Path | None = None
    """The home a careless user would expose (the isolation scenario's honeytoken home): a backend
    without isolation runs in it; an isolating one never sees it."""
    user_env: Mapping[str, str] = field(default_factory=dict)
    """Variables a careless user's shell would export (honeytoken keys only, never the host's own):
    a backend without isolation exports them; an isolating one never sees them."""


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
    argument: str | None = None
    """What follows the colon in `--backend MODULE:ARGUMENT` (the command backend's YAML file); None without."""
    memory_sharing: str = "off"
    """How its sandboxes share host memory (MEMORY_SHARING), where the backend can."""
    image: str = "busybox"
    """The guest image its sandboxes run (harness.image.catalog)."""


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
    """Named phase durations (names from `Backend.phases`) that add up to boot_ms."""
    marks_ms: dict[str, float] = field(default_factory=dict)
    """Named instants (first serial output, kernel start, init, network up, agent ready)."""
    boot_ms: float | None = None
    """Spawn to agent ready; None if the boot failed."""


@runtime_checkable
class Sandbox(Protocol):
    """One booted sandbox."""

    id: str
    """The spec's id."""
    boot: BootRecord
    """How its boot went."""
    network: GuestNetwork
    """Its network as seen from inside."""
    ca_bundle: str | None
    """Path inside where the gateway's CA certificate goes for the sandbox's TLS clients; None: no trust store."""

    def exec(self, command: str, timeout: float = 30.0, stdin: bytes = b"") -> ExecResult:
        """Run a shell command inside; the timeout is enforced on both sides."""
        ...

    def stop(self) -> None:
        """Stop the sandbox and reap every host process it owns. Idempotent."""
        ...

    def pids(self) -> list[int]:
        """Host pids whose memory is this sandbox's cost (the VMM, helpers)."""
        ...

    def guest_memory(self) -> dict[str, int] | None:
        """The guest's own MemTotal and MemFree in bytes, read at boot; None where there is no guest memory."""
        ...

    def host_endpoints(self) -> dict[str, Endpoint]:
        """Host-side addresses that lead into this sandbox (its agent's forward): what a peer must not reach."""
        ...


class Backend(Protocol):
    """A way to run sandboxes: one module under harness/sandbox/ per backend."""

    name: str
    """Backend name used on the command line."""
    accel: str
    """kvm, tcg, or "none" for backends without a hypervisor."""
    features: Features
    """What it can do."""
    phases: dict[str, str]
    """Every boot phase it records, in order, with what it means (recorded in results.json for the report)."""
    tls_profile: str
    """The gateway's guest-facing TLS profile its sandboxes' listeners get, from their image's clients."""

    def boot(self, spec: SandboxSpec, supervisor: Supervisor) -> Sandbox:
        """Start a sandbox and return once its agent answers; raise BootFailed otherwise."""
        ...

    def weaken(self, engine_socket: Path) -> Backend:
        """A variant whose sandboxes are really less isolated (isolation --leaky): an open network, the
        host's engine socket forwarded in. Raises ConfigError where `features.weaken` is False."""
        ...

    def describe(self) -> dict[str, object]:
        """Versions and settings that belong in results.json (binary versions, accel, image)."""
        ...


class Starting(Protocol):
    """A sandbox on its way up: its process started by `spawn`, its agent awaited by `wait_ready`."""

    def spawn(self) -> None: ...
    def wait_ready(self) -> None: ...
    def stop(self) -> None: ...


StartingT = TypeVar("StartingT", bound=Starting)


def start_or_stop(sandbox: StartingT) -> StartingT:
    """Spawn `sandbox` and wait for its agent; on any failure, an interruption included, stop it first, so a
    half-started sandbox leaves nothing running. What every backend's `boot` does."""
    try:
        sandbox.spawn()
        sandbox.wait_ready()
    except BaseException:
        sandbox.stop()
        raise
    return sandbox


class BootFailed(Exception):
    """A sandbox did not come up; carries the phases reached so far."""

    def __init__(self, reason: str, boot: BootRecord) -> None:
        super().__init__(reason)
        self.reason = reason
        self.boot = boot


@dataclass
class SandboxRecord:
    """One sandbox's boot and what it cost: an entry of results.json["sandboxes"], filled in as the run goes
    (by the fleet at boot, by the bench with host memory) and turned into JSON only when results are saved."""

    id: str
    """The sandbox's id."""
    round: int = 0
    """Bench round it booted in (negative: a warm-up round); 0 in a scenario."""
    ok: bool = False
    """It booted and its agent answered."""
    error: str | None = None
    """Why the boot failed; None when it did not."""
    boot_ms: float | None = None
    """Spawn to agent ready."""
    phases_ms: dict[str, float] = field(default_factory=dict)
    """Boot phase durations, named by the backend's `phases` (reached so far, for a failed boot)."""
    marks_ms: dict[str, float] = field(default_factory=dict)
    """Named instants of the boot."""
    provision_ms: float | None = None
    """Time after agent-ready spent installing the gateway CA."""
    host_rss_bytes: int | None = None
    """Host RSS of its processes with the round idle (the bench measures it)."""
    host_pss_bytes: int | None = None
    """Host PSS of its processes with the round idle: its fair share of shared pages."""
    host_uss_bytes: int | None = None
    """Host USS of its processes with the round idle: what stopping it would free."""
    host_shared_pss_bytes: int | None = None
    """The part of its PSS that is its share of files every sandbox maps (a template's RAM); 0 where none."""
    guest_mem_total_bytes: int | None = None
    """MemTotal inside, where the backend reports guest memory."""
    guest_mem_free_bytes: int | None = None
    """MemFree inside at boot, where the backend reports guest memory."""

    def to_json(self) -> dict[str, object]:
        """The results.json entry (keys are the field names)."""
        return dict(vars(self))
