"""The `host` backend: no isolation at all, the negative control of every comparison.

A "sandbox" is the shared guest agent (harness/image/guest/br-agent) served by socat on a host
loopback port, running commands as a plain process of the invoking user, with busybox's applets
first on PATH so that probes and clients run as they do in a guest. Its environment is built from
nothing: a careless user's (the spec's user_env, a honeytoken key in the isolation scenario), never
the host's own. Its HOME is the spec's user_home (the isolation scenario's honeytoken home).
Everything an agent inside could do to the host, it can: that is the point.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

from harness.errors import ConfigError, EnvironmentMissing
from harness.image.catalog import image_kind
from harness.image.initramfs import busybox_binary, guest_file
from harness.paths import cached_dir
from harness.sandbox.agent import AgentUnavailable, agent_exec, free_port
from harness.sandbox.base import (
    PROCESS_FEATURES,
    BackendOptions,
    BootFailed,
    BootRecord,
    Endpoint,
    ExecResult,
    GuestNetwork,
    SandboxSpec,
    start_or_stop,
)
from harness.supervisor import Supervisor, run_tool

FEATURES = PROCESS_FEATURES
"""A plain process: nothing to snapshot, no guest memory, no kernel of its own, nothing left to weaken. Its
userland is the host's: --image busybox puts busybox's applets first on PATH, --image debian leaves the host's
own Debian tools (curl, dig, python3) first."""

PHASES = {"agent": "spawn of the agent listener → its first answer (a plain host process)"}
"""The only phase a host 'boot' has."""

USERLAND_FORMAT = 1
"""Bumped when the userland directory's layout changes."""

READY_POLL_S = 0.01
"""Pause between agent probes while the listener starts."""

STOP_GRACE_S = 2.0
"""socat exits on SIGTERM at once; this bounds a wedged command."""

CA_BUNDLE_NAME = "ca-certificates.crt"
"""The sandbox's own trust store, in its workdir (the host's /etc/ssl is never written)."""

PR_SET_CHILD_SUBREAPER = 36
"""prctl option: orphans of the listener's commands stay its descendants, so stop() finds them."""

_libc = ctypes.CDLL(None, use_errno=True)


def socat_binary() -> str:
    path = shutil.which("socat")
    if path is None:
        raise EnvironmentMissing("socat not found; run `apt-get install socat` (it serves the host agent)")
    return path


def userland(cache: Path) -> Path:
    """A bin/ of busybox applet links and the guest agent, made once per busybox and agent version."""
    busybox = busybox_binary()
    agent = guest_file("br-agent")
    key = hashlib.sha256(f"{USERLAND_FORMAT}".encode() + busybox.read_bytes() + agent).hexdigest()[:16]

    def fill(staging: Path) -> None:
        (staging / "bin").mkdir()
        applets = run_tool([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
        for applet in applets:
            os.symlink(busybox, staging / "bin" / applet)
        (staging / "br-agent").write_bytes(agent)

    return cached_dir(cache / "host-userland" / key, fill)


def become_subreaper() -> None:
    """Runs in the listener before exec."""
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _running(process: psutil.Process) -> bool:
    """Not gone and not a zombie waiting for its parent: a process whose memory is still a cost."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class HostProcess:
    """One 'sandbox' that is a plain host process: the guest agent behind socat on host loopback."""

    def __init__(
        self, spec: SandboxSpec, userland_dir: Path, supervisor: Supervisor, busybox_first: bool = True
    ) -> None:
        self.spec = spec
        self.id = spec.id
        self.supervisor = supervisor
        self.userland = userland_dir
        self.applets = [str(userland_dir / "bin")] if busybox_first else []
        """PATH entries before the host's own: busybox's applets, unless the host's tools stand in for debian."""
        self.boot = BootRecord()
        self.agent_port = free_port()
        """Host loopback port of the agent listener."""
        egress_port = spec.gateway_port if spec.gateway_port is not None else free_port()
        self.network = GuestNetwork(
            egress=Endpoint("127.0.0.1", egress_port),
            egress_route="none: a plain host process; HTTP_PROXY names its gateway listener, nothing enforces it",
            agent_port=self.agent_port,
            own_address="127.0.0.1",
            host_alias="127.0.0.1",
            resolver=None,
        )
        self.workdir = spec.workdir
        self.home = spec.user_home or spec.workdir / "home"
        self.ca_bundle = str(spec.workdir / CA_BUNDLE_NAME)
        self.proc: subprocess.Popen[bytes] | None = None
        self._spawned_at = 0.0

    def environment(self) -> dict[str, str]:
        """What a careless user's shell would have: built from nothing, never copied from the host's."""
        proxy = f"http://{self.network.egress}"
        return {
            "PATH": ":".join([*self.applets, "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]),
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "HTTP_PROXY": proxy,
            "HTTPS_PROXY": proxy,
            "http_proxy": proxy,
            "https_proxy": proxy,
            "NO_PROXY": "localhost,127.0.0.1",
            "SSL_CERT_FILE": self.ca_bundle,
            "REQUESTS_CA_BUNDLE": self.ca_bundle,
            "PIP_CERT": self.ca_bundle,
            "BR_PROFILE": "/dev/null",
            "BR_WORKDIR": str(self.workdir / "work"),
            "BR_TMP": str(self.workdir / "tmp"),
            **self.spec.user_env,
        }

    def argv(self) -> list[str]:
        # -t: after the client half-closes, wait for the command's whole answer (socat's default is 0.5 s).
        agent = f"{busybox_binary()} sh {self.userland / 'br-agent'}"
        return [
            socat_binary(),
            "-t",
            "86400",
            f"TCP-LISTEN:{self.agent_port},bind=127.0.0.1,reuseaddr,fork",
            f"EXEC:{shlex.quote(agent)}",
        ]

    def spawn(self) -> None:
        for directory in (self.workdir / "work", self.workdir / "tmp", self.home):
            directory.mkdir(parents=True, exist_ok=True)
        self._spawned_at = time.monotonic()
        with (self.workdir / "agent.log").open("wb") as log:
            self.proc = self.supervisor.spawn(
                self.argv(),
                name=f"host-agent:{self.id}",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.environment(),
                cwd=self.workdir / "work",
                preexec_fn=become_subreaper,
            )

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = self._spawned_at + self.spec.boot_timeout_s
        while True:
            if self.proc.poll() is not None:
                log = (self.workdir / "agent.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise BootFailed(f"the agent listener exited with status {self.proc.returncode}: {log}", self.boot)
            if time.monotonic() > deadline:
                raise BootFailed(f"agent did not answer within {self.spec.boot_timeout_s:g} s", self.boot)
            try:
                agent_exec(self.agent_port, "true", timeout=5, transport_timeout=1.0)
            except AgentUnavailable:
                time.sleep(READY_POLL_S)
                continue
            ready_ms = round((time.monotonic() - self._spawned_at) * 1000, 2)
            self.boot.marks_ms["agent_ready"] = ready_ms
            self.boot.phases_ms = {"agent": ready_ms}
            self.boot.boot_ms = ready_ms
            return

    def exec(self, command: str, timeout: float = 30.0, stdin: bytes = b"") -> ExecResult:
        return agent_exec(self.agent_port, command, timeout=timeout, stdin=stdin)

    def pids(self) -> list[int]:
        """The listener and every command it is running: all of it is this sandbox's cost."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [self.proc.pid, *(child.pid for child in children if _running(child))]

    def stop(self) -> None:
        if self.proc is None:
            return
        # Commands run in sessions of their own (the agent's setsid), so the listener's group is not enough.
        for pid in self.pids()[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.supervisor.stop(self.proc.pid, grace_s=STOP_GRACE_S)

    def guest_memory(self) -> dict[str, int] | None:
        return None

    def host_endpoints(self) -> dict[str, Endpoint]:
        return {"agent": Endpoint("127.0.0.1", self.agent_port)}


class HostBackend:
    """Runs each sandbox as a plain host process: the negative control."""

    name = "host"
    accel = "none"
    features = FEATURES
    phases = PHASES

    def __init__(self, userland_dir: Path, image: str = "busybox") -> None:
        self.userland = userland_dir
        self.image = image
        self.tls_profile = image_kind(image).tls_profile

    def boot(self, spec: SandboxSpec, supervisor: Supervisor) -> HostProcess:
        return start_or_stop(HostProcess(spec, self.userland, supervisor, busybox_first=self.image == "busybox"))

    def weaken(self, engine_socket: Path) -> HostBackend:
        raise ConfigError("the host backend has no isolation to weaken; run --leaky with --backend qemu")

    def describe(self) -> dict[str, object]:
        version = run_tool([socat_binary(), "-V"], capture_output=True, text=True, timeout=10).stdout
        return {
            "isolation": "none: plain host processes of the invoking user (the negative control)",
            "agent_listener": next((line for line in version.splitlines() if "socat version" in line), "socat"),
            "image": f"{self.image}: "
            + ("busybox applets first on PATH" if self.image == "busybox" else "the host's own tools"),
            "tls_profile": self.tls_profile,
            "userland": str(self.userland),
        }


def create_backend(options: BackendOptions) -> HostBackend:
    """Stage the busybox userland; nothing else to prepare."""
    socat_binary()
    return HostBackend(userland(options.cache), options.image)
