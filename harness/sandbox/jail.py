"""What the jail backends share (bwrap, gvisor, and the command backend's bubblewrap example): a read-only
busybox rootfs with socat in it, and a channel directory of unix sockets that is a jail's only way out
and the harness's only way in.

A jail has no network but loopback. Inside, its init (harness/image/guest/br-jail-init) relays the
egress address (JAIL_EGRESS) to CHANNEL_MOUNT/proxy.sock, and serves the guest agent on
CHANNEL_MOUNT/agent.sock. On the host, a socat relay (`HostBridge`) answers proxy.sock and connects to
the sandbox's own gateway listener, so the gateway still knows which sandbox is talking by the
listener it came in on. The channel directory is a short scratch directory, because a unix socket's
path must fit in 108 bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import time
from abc import ABC, abstractmethod
from pathlib import Path

import psutil

from harness.errors import EnvironmentMissing
from harness.image.catalog import DEBIAN, image_kind
from harness.image.debian import build_debian
from harness.image.initramfs import busybox_binary, guest_file
from harness.paths import cached_dir
from harness.sandbox.agent import AgentUnavailable, agent_exec
from harness.sandbox.base import BootFailed, BootRecord, Endpoint, ExecResult, GuestNetwork, SandboxSpec
from harness.scratch import make_scratch_dir, remove_scratch_dir
from harness.supervisor import Supervisor, run_tool

ROOTFS_FORMAT = 1
"""Bumped when the rootfs layout changes in a way the content hash would not see."""

JAIL_EGRESS = Endpoint("127.0.0.1", 3128)
"""The proxy address inside every jail: its init relays it to the host's proxy socket."""

CHANNEL_MOUNT = "/run/br"
"""Where the channel directory appears inside."""

PROXY_SOCKET = "proxy.sock"
"""In the channel directory: the host's relay to the sandbox's gateway listener."""

AGENT_SOCKET = "agent.sock"
"""In the channel directory: the guest agent, created from inside."""

JAIL_INIT = "/sbin/br-jail-init"
"""The command a jail starts with."""

JAIL_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
"""Inside: a private tmpfs at /etc/ssl/certs takes the gateway's CA (the rootfs itself is read-only)."""

WORKSPACE_MOUNT = "/work"
"""Inside: the sandbox's workspace, the one host directory it may write (the agent's working directory)."""

JAIL_PATH = "/sbin:/bin:/usr/bin"
"""PATH inside."""

READY_POLL_S = 0.005
"""Pause between agent probes while a jail starts."""

BRIDGE_READY_S = 5.0
"""How long the host relay gets to create its socket."""

EMPTY_MOUNT_POINTS = ("proc", "dev", "sys", "tmp", "run/br", "work", "root", "etc/ssl/certs")
"""Directories a jail mounts over; they must exist in the read-only rootfs."""


def socat_binary() -> Path:
    path = shutil.which("socat")
    if path is None:
        raise EnvironmentMissing("socat not found; run `apt-get install socat` (it relays a jail's egress)")
    return Path(path)


def shared_libraries(binary: Path) -> list[Path]:
    """Every library `ldd` lists for binary, the dynamic loader included (resolved to real files)."""
    listing = run_tool(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    paths = re.findall(r"(/\S+) \(0x", listing)
    return [Path(p) for p in paths]


def jail_rootfs(cache: Path, image: str = "busybox") -> Path:
    """The jails' root, made once per content and shared read-only by every jail (never the host's own /):
    for busybox, its applets, socat with its libraries, the agent and the jail init; for debian, the
    debian image's own root (harness.image.debian), which carries the same agent and init."""
    if image_kind(image) is DEBIAN:
        return build_debian(cache).rootfs
    busybox = busybox_binary()
    socat = socat_binary()
    libraries = shared_libraries(socat)
    files = {name: guest_file(name) for name in ("br-agent", "br-jail-init", "profile", "hosts")}
    digest = hashlib.sha256(f"format={ROOTFS_FORMAT};egress={JAIL_EGRESS}".encode())
    for path in (busybox, socat, *libraries):
        digest.update(str(path).encode() + hashlib.sha256(path.read_bytes()).digest())
    for name, content in sorted(files.items()):
        digest.update(name.encode() + content)
    key = digest.hexdigest()[:16]
    return cached_dir(
        cache / "jail-rootfs" / key, lambda staging: _fill_rootfs(staging, busybox, socat, libraries, files)
    )


def _fill_rootfs(staging: Path, busybox: Path, socat: Path, libraries: list[Path], files: dict[str, bytes]) -> None:
    for directory in ("bin", "sbin", "usr/bin", "etc", *EMPTY_MOUNT_POINTS):
        (staging / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, staging / "bin" / "busybox")
    applets = run_tool([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox" and not (staging / "bin" / applet).exists():
            os.symlink("busybox", staging / "bin" / applet)
    shutil.copy2(socat, staging / "usr" / "bin" / "socat")
    for library in libraries:
        target = staging / str(library).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(library.resolve(), target)
    for name, target, mode in (
        ("br-agent", "sbin/br-agent", 0o755),
        ("br-jail-init", "sbin/br-jail-init", 0o755),
        ("profile", "etc/profile", 0o644),
        ("hosts", "etc/hosts", 0o644),
    ):
        (staging / target).write_bytes(files[name])
        (staging / target).chmod(mode)
    (staging / "etc" / "br-egress").write_text(f"{JAIL_EGRESS}\n")
    (staging / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    (staging / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (staging / "etc" / "resolv.conf").write_text("# a jail has no resolver: its only way out is the proxy\n")


def jail_network() -> GuestNetwork:
    """Every jail's network from inside: loopback only, egress relayed through the channel directory."""
    return GuestNetwork(
        egress=JAIL_EGRESS,
        egress_route=(
            f"a relay inside on {JAIL_EGRESS} → unix socket {CHANNEL_MOUNT}/{PROXY_SOCKET} (bind-mounted) → "
            "host socat → the sandbox's own gateway listener"
        ),
        agent_port=None,
        own_address="127.0.0.1",
        host_alias=None,
        resolver=None,
        agent_socket=f"{CHANNEL_MOUNT}/{AGENT_SOCKET}",
    )


def jail_environment(sandbox_id: str) -> dict[str, str]:
    """A jail's starting environment: built from nothing (never the host's)."""
    return {"PATH": JAIL_PATH, "HOME": "/root", "HOSTNAME": sandbox_id, "LANG": "C.UTF-8"}


class HostBridge:
    """The host half of a jail's egress: socat on CHANNEL/proxy.sock, connecting to a gateway listener."""

    def __init__(self, channel: Path, gateway_port: int | None) -> None:
        self.socket = channel / PROXY_SOCKET
        self.gateway_port = gateway_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, supervisor: Supervisor, name: str, log: Path) -> None:
        if self.gateway_port is None:
            # No gateway: the mount point must still exist, and a connect to it must fail.
            self.socket.touch()
            return
        argv = [
            str(socat_binary()),
            f"UNIX-LISTEN:{self.socket},fork,mode=0666,unlink-early",
            f"TCP:127.0.0.1:{self.gateway_port}",
        ]
        with log.open("ab") as out:
            self.proc = supervisor.spawn(argv, name=name, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = time.monotonic() + BRIDGE_READY_S
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise EnvironmentMissing(f"the host egress relay did not start; see {log}")
            time.sleep(READY_POLL_S)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def stop(self, supervisor: Supervisor) -> None:
        if self.proc is not None:
            supervisor.stop(self.proc.pid)


def running_tree(pid: int) -> list[int]:
    """pid and its descendants that are not zombies: processes whose memory is still a cost."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    pids = []
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.status() != psutil.STATUS_ZOMBIE:
                pids.append(process.pid)
    return pids


class JailSandbox(ABC):
    """One jailed sandbox: a jail process (bwrap or runsc) started on JAIL_INIT, and its host bridge.

    A backend subclasses it with `argv()`, the command that starts the jail, and may add to `stop()`."""

    network = jail_network()
    ca_bundle: str | None = JAIL_CA_BUNDLE

    def __init__(self, spec: SandboxSpec, rootfs: Path, supervisor: Supervisor, kind: str) -> None:
        self.spec = spec
        self.id = spec.id
        self.rootfs = rootfs
        self.supervisor = supervisor
        self.kind = kind
        self.boot = BootRecord()
        self.workdir = spec.workdir
        self.workspace = spec.workdir / "workspace"
        """Host side of WORKSPACE_MOUNT."""
        self.channel = make_scratch_dir("br-ch-")
        """Host side of CHANNEL_MOUNT: the proxy socket and the agent socket."""
        self.bridge = HostBridge(self.channel, spec.gateway_port)
        self.proc: subprocess.Popen[bytes] | None = None
        self._spawned_at = 0.0

    @property
    def agent_socket(self) -> Path:
        return self.channel / AGENT_SOCKET

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.kind}.log"

    @abstractmethod
    def argv(self) -> list[str]:
        """The command that starts the jail on JAIL_INIT (each jail backend gives its own)."""

    def spawn(self) -> None:
        self.workspace.mkdir(parents=True, exist_ok=True)
        self._spawned_at = time.monotonic()
        self.bridge.start(self.supervisor, f"egress-relay:{self.id}", self.workdir / "relay.log")
        self.boot.marks_ms["relay_ready"] = self._since_spawn()
        with self.log.open("ab") as log:
            self.proc = self.supervisor.spawn(
                self.argv(),
                name=f"{self.kind}:{self.id}",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.workdir,
            )
        self.boot.marks_ms["jail_spawned"] = self._since_spawn()

    def _since_spawn(self) -> float:
        return round((time.monotonic() - self._spawned_at) * 1000, 2)

    def wait_ready(self) -> None:
        """Until the agent answers from inside; a jail that exits or says nothing is a failed boot."""
        assert self.proc is not None
        deadline = self._spawned_at + self.spec.boot_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise BootFailed(
                    f"{self.kind} exited with status {self.proc.returncode}: {self.last_log_line()}", self.boot
                )
            if time.monotonic() > deadline:
                raise BootFailed(f"agent did not answer within {self.spec.boot_timeout_s:g} s", self.boot)
            if not self.agent_socket.exists():
                time.sleep(READY_POLL_S)
                continue
            try:
                result = agent_exec(self.agent_socket, "echo ready", timeout=5, transport_timeout=2.0)
            except AgentUnavailable:
                time.sleep(READY_POLL_S)
                continue
            if result.text.strip() != "ready":  # an empty answer is a failed boot, not a ready one
                raise BootFailed(f"the agent answered {result.text[:80]!r} instead of 'ready'", self.boot)
            self.boot.marks_ms["agent_ready"] = self._since_spawn()
            self.boot.boot_ms = self.boot.marks_ms["agent_ready"]
            self.boot.phases_ms = self.phases_from_marks()
            return

    def phases_from_marks(self) -> dict[str, float]:
        """Phase durations that add up to boot_ms: relay start, then the jail up to the agent's answer."""
        marks = self.boot.marks_ms
        return {"relay": marks["relay_ready"], "jail": round(marks["agent_ready"] - marks["relay_ready"], 2)}

    def last_log_line(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(no output)"

    def exec(self, command: str, timeout: float = 30.0, stdin: bytes = b"") -> ExecResult:
        return agent_exec(self.agent_socket, command, timeout=timeout, stdin=stdin)

    def pids(self) -> list[int]:
        """The jail's process tree and the host relay: all of it is this sandbox's cost."""
        jail = running_tree(self.proc.pid) if self.proc is not None and self.proc.poll() is None else []
        return jail + self.bridge.pids()

    def stop(self) -> None:
        if self.proc is not None:
            self.supervisor.stop(self.proc.pid)
        self.bridge.stop(self.supervisor)
        remove_scratch_dir(self.channel)

    def guest_memory(self) -> dict[str, int] | None:
        return None

    def host_endpoints(self) -> dict[str, Endpoint]:
        return {}

    def host_paths(self) -> dict[str, Path]:
        """Host paths that lead into this jail (its channel directory and sockets, its workspace): what a
        peer must not see. A jail has no TCP address on the host; these are its doors."""
        return {
            "channel directory": self.channel,
            "agent socket": self.agent_socket,
            "proxy socket": self.bridge.socket,
            "workspace": self.workspace,
        }
