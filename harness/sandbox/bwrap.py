"""The `bwrap` backend: bubblewrap the way sandbox-runtime uses it, the host's kernel behind namespaces.

Every namespace is unshared (user, pid, net, ipc, uts, cgroup), so the only network is loopback;
the jail's egress is the unix-socket bridge of harness/sandbox/jail.py. The root is the jails' own
busybox rootfs, read-only (never the host's /), with a private /tmp, a private tmpfs for the CA
bundle, and the sandbox's workspace bound read-write at /work: nothing else of the host's home.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from harness.errors import ConfigError, EnvironmentMissing
from harness.image.catalog import image_kind
from harness.sandbox.base import PROCESS_FEATURES, BackendOptions, BootFailed, SandboxSpec, start_or_stop
from harness.sandbox.jail import (
    CHANNEL_MOUNT,
    JAIL_CA_BUNDLE,
    JAIL_INIT,
    WORKSPACE_MOUNT,
    JailSandbox,
    jail_environment,
    jail_rootfs,
)
from harness.supervisor import Supervisor, run_tool

FEATURES = PROCESS_FEATURES
"""Namespaces on the host's kernel: nothing to snapshot, no guest memory, no kernel of its own."""

PHASES = {
    "relay": "spawn → the host egress relay's socket exists",
    "jail": "bwrap start → the agent's first answer from inside (namespaces, mounts, init)",
}
"""Boot phases, in order."""


def bwrap_binary() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise EnvironmentMissing("bwrap not found; run `apt-get install bubblewrap`")
    return path


def bwrap_argv(bwrap: str, rootfs: Path, channel: Path, workspace: Path, sandbox_id: str) -> list[str]:
    """The jail: every namespace unshared, the rootfs read-only, writable only /tmp, the CA tmpfs and /work."""
    argv = [
        bwrap,
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        # The jail's init is its PID 1, not a bwrap reaper: a bwrap inside would show the host's paths in its
        # command line and its environment (the harness's owner mark) to every process of the jail.
        "--as-pid-1",
        "--ro-bind", str(rootfs), "/",
        "--proc", "/proc",
        "--dev", "/dev",
        "--tmpfs", "/tmp",
        "--tmpfs", str(Path(JAIL_CA_BUNDLE).parent),
        "--bind", str(channel), CHANNEL_MOUNT,
        "--bind", str(workspace), WORKSPACE_MOUNT,
        "--chdir", WORKSPACE_MOUNT,
        "--hostname", sandbox_id,
        "--clearenv",
    ]  # fmt: skip
    for name, value in jail_environment(sandbox_id).items():
        argv += ["--setenv", name, value]
    return [*argv, JAIL_INIT]


class BwrapSandbox(JailSandbox):
    """One bubblewrap jail."""

    def __init__(self, spec: SandboxSpec, rootfs: Path, supervisor: Supervisor, bwrap: str) -> None:
        super().__init__(spec, rootfs, supervisor, kind="bwrap")
        self.bwrap = bwrap

    def argv(self) -> list[str]:
        return bwrap_argv(self.bwrap, self.rootfs, self.channel, self.workspace, self.id)


class BwrapBackend:
    """Runs each sandbox in a bubblewrap jail."""

    name = "bwrap"
    accel = "none"
    features = FEATURES
    phases = PHASES

    def __init__(self, rootfs: Path, bwrap: str, image: str = "busybox") -> None:
        self.rootfs = rootfs
        self.bwrap = bwrap
        self.image = image
        self.tls_profile = image_kind(image).tls_profile

    def boot(self, spec: SandboxSpec, supervisor: Supervisor) -> BwrapSandbox:
        return start_or_stop(BwrapSandbox(spec, self.rootfs, supervisor, self.bwrap))

    def weaken(self, engine_socket: Path) -> BwrapBackend:
        raise ConfigError("the bwrap backend has no --leaky variant; run --leaky with --backend qemu")

    def describe(self) -> dict[str, object]:
        version = run_tool([self.bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        return {
            "version": version,
            "isolation": "Linux namespaces (user, pid, net, ipc, uts, cgroup) on the host's kernel",
            "image": self.image,
            "tls_profile": self.tls_profile,
            "rootfs": str(self.rootfs),
            "egress": "loopback only; a unix-socket bridge to the sandbox's gateway listener",
        }


def check_bwrap(bwrap: str, rootfs: Path) -> None:
    """One jail that runs `true`: a kernel that forbids unprivileged namespaces fails here, in one line."""
    probe = run_tool(
        [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", str(rootfs), "/", "/bin/true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no message"])[-1]
        raise EnvironmentMissing(f"bwrap cannot create a jail on this host ({reason}); check user namespaces")


def create_backend(options: BackendOptions) -> BwrapBackend:
    """Stage the shared jail rootfs and check that bwrap works here."""
    bwrap = bwrap_binary()
    rootfs = jail_rootfs(options.cache, options.image)
    check_bwrap(bwrap, rootfs)
    return BwrapBackend(rootfs, bwrap, options.image)


__all__ = ["FEATURES", "BootFailed", "BwrapBackend", "create_backend"]
