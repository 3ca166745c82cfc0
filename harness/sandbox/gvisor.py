"""The `gvisor` backend: gVisor's runsc, a user-space kernel (the sentry) between the jail and the host's.

Each sandbox is one OCI container run by Debian's runsc (0.0~20221219), rootful, on the ptrace platform,
with no network but the sentry's own loopback (`--network=none`). Its root is the jails' shared busybox
rootfs, read-only; it gets /proc, /dev, a private /tmp, a private tmpfs for the CA bundle, the channel
directory of harness/sandbox/jail.py at CHANNEL_MOUNT, and its workspace read-write at /work: nothing
else of the host. Its host processes are the `runsc run` parent, the gofer (the sentry's file server),
the sentry, the ptrace stubs, and the host egress relay.

runsc keeps container records in a state directory (`--root`), one per harness process and named by that
process's pid and start time, so `invoke clean` can delete the containers of a run that was killed.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import psutil

from harness.errors import ConfigError, EnvironmentMissing
from harness.image.catalog import image_kind
from harness.paths import pid_records_dir
from harness.sandbox.base import PROCESS_FEATURES, BackendOptions, BootFailed, SandboxSpec, start_or_stop
from harness.sandbox.jail import (
    CHANNEL_MOUNT,
    JAIL_CA_BUNDLE,
    JAIL_INIT,
    READY_POLL_S,
    WORKSPACE_MOUNT,
    JailSandbox,
    jail_environment,
    jail_rootfs,
    running_tree,
)
from harness.scratch import scratch_dir
from harness.supervisor import (
    OWNER_ENV,
    Supervisor,
    child_environment,
    kill_group,
    owner_mark,
    process_create_time,
    run_tool,
)

FEATURES = replace(PROCESS_FEATURES, own_kernel=True)
"""The sentry is a kernel of its own (it answers `uname -r` with 4.4.0), but with no guest RAM to size,
nothing to snapshot here, and no MemTotal of its own (it reports the host's)."""

PHASES = {
    "relay": "spawn → the host egress relay's socket exists",
    "bundle": "writing the OCI bundle (config.json) and starting `runsc run`",
    "sandbox": "`runsc run` → the agent's socket exists (gofer and sentry start, the sentry boots, init runs socat)",
    "agent": "the agent socket → its first answer (one command through the agent: ~10 forks and execs under ptrace)",
}
"""Boot phases, in order."""

PLATFORM = "ptrace"
"""How the sentry intercepts its processes' system calls. This build (0.0~20221219) offers ptrace and
kvm only: it predates systrap, and on this host `--platform=kvm` hangs before the container's first
instruction (measured 2026-12-02: `runsc --platform=kvm do /bin/true` still waiting after 20 s), while
ptrace works everywhere ptrace(2) is allowed and ran `do /bin/true` in 0.18 s."""

PLATFORM_REASON = (
    "runsc 0.0~20221219 has no systrap, and its kvm platform hung where this was measured (2026-12-02); "
    "ptrace works wherever ptrace(2) is allowed"
)
"""PLATFORM's reason in one line, for results.json."""

HOST_UDS = "all"
"""`--host-uds`: the jail connects to a host socket (CHANNEL/proxy.sock, which needs "open") and creates
one the host connects to (CHANNEL/agent.sock, which needs "create"; with "open" alone it lives only in
the sentry and never appears on the host). "all" is exactly those two, and only in what is mounted.
The price: the sentry's seccomp filter lets it make host sockets (runsc warns "host UDS enabled:
syscall filters less restrictive")."""

DEBUG_LOG = True
"""runsc's own logs (info level, one file per runsc process) go to the sandbox's workdir, so a failed
boot can say what runsc said last. Within noise (2026-12-02, 2 cores, two runs of 10 boots each way:
median 363 and 342 ms with, 367 and 326 ms without); about 20 KB of text per sandbox."""

CHECK_TIMEOUT_S = 20.0
"""The start-up check (a container that runs /bin/true) gets this long; ptrace takes ~0.2 s."""

RUNSC_CALL_TIMEOUT_S = 30.0
"""Bound on one runsc housekeeping command (kill, delete, state, list)."""

STOP_GRACE_S = 3.0
"""How long `runsc run` gets to tear its container down after its init is killed (it takes ~50 ms)."""

STATE_DIR_NAME = "runsc"
"""Under the pid records: one runsc state directory (`--root`) per harness process, named `PID-START`."""

GLOG_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] ")
"""What starts each line of runsc's logs (level, date, time, pid, source line)."""

_EXIT_CLEANUP: list[int] = []
"""The pid that registered the atexit removal of its own state directory (once per process)."""


def runsc_binary() -> str:
    path = shutil.which("runsc")
    if path is None:
        raise EnvironmentMissing("runsc not found; run `apt-get install runsc`")
    return path


def state_parent() -> Path:
    return pid_records_dir() / STATE_DIR_NAME


def own_state_root() -> Path:
    """This process's runsc `--root`, named by its pid and start time (the pair no recycled pid repeats).
    runsc makes it; it goes when this process exits (or, after a SIGKILL, in `invoke clean`). It is
    never removed while the process runs: a boot beside a stop could lose it between runsc's mkdir
    and its first record."""
    root = state_parent() / f"{os.getpid()}-{process_create_time(os.getpid())!r}"
    if os.getpid() not in _EXIT_CLEANUP:
        _EXIT_CLEANUP.append(os.getpid())
        atexit.register(_remove_own_root, root, os.getpid())
    return root


def _remove_own_root(root: Path, pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child
        with contextlib.suppress(OSError):
            root.rmdir()  # only when empty: a container left running keeps its records for `invoke clean`


def container_id(spec_id: str) -> str:
    """Unique across runs on this host: the owner's pid, the sandbox id (runsc takes [A-Za-z0-9_.+-]), and
    a random suffix."""
    safe = re.sub(r"[^A-Za-z0-9_.+-]", "-", spec_id)[:40]
    return f"br{os.getpid()}-{safe}-{secrets.token_hex(3)}"


def runsc_global_flags(runsc: str, root: Path) -> list[str]:
    return [runsc, "--root", str(root), f"--platform={PLATFORM}", "--network=none", f"--host-uds={HOST_UDS}"]


def oci_config(
    rootfs: Path, args: list[str], hostname: str, channel: Path | None, workspace: Path | None
) -> dict[str, object]:
    """An OCI runtime spec: the rootfs read-only, JAIL_INIT's environment from nothing, no capabilities
    beyond runsc's defaults, and only the mounts named here (channel and workspace where given)."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    mounts: list[dict[str, object]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
        {"destination": str(Path(JAIL_CA_BUNDLE).parent), "type": "tmpfs", "source": "tmpfs"},
    ]
    for source, destination in ((channel, CHANNEL_MOUNT), (workspace, WORKSPACE_MOUNT)):
        if source is not None:
            mounts.append(
                {"destination": destination, "type": "bind", "source": str(source), "options": ["rbind", "rw"]}
            )
    return {
        "ociVersion": "1.0.0",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": [f"{name}={value}" for name, value in jail_environment(hostname).items()],
            "cwd": WORKSPACE_MOUNT if workspace is not None else "/",
            "capabilities": {kind: caps for kind in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]},
    }


def write_bundle(directory: Path, config: dict[str, object]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def delete_container(runsc: str, root: Path, cid: str) -> str | None:
    """`runsc delete --force`: kills the sentry and gofer if they still run and removes the record.
    None when done or when there was no such container; otherwise runsc's last line."""
    done = run_tool(
        [runsc, "--root", str(root), "delete", "--force", cid],
        capture_output=True,
        text=True,
        timeout=RUNSC_CALL_TIMEOUT_S,
    )
    if done.returncode == 0 or "does not exist" in done.stderr + done.stdout:
        return None
    return last_line(done.stderr + done.stdout)


def kill_survivors(processes: list[tuple[int, float]]) -> None:
    """SIGKILL whichever of these (pid, start time) pairs still runs: the net under every other way out."""
    for pid, created in processes:
        if created and process_create_time(pid) == created:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


class GvisorSandbox(JailSandbox):
    """One gVisor container, run attached: `runsc run` waits for it, so its process tree is the whole
    sandbox (the sentry leaves its session but stays its child) and it reaps its own gofer.

    `run --detach` would drop that parent: measured 2026-12-02, 10.4 of 42 MB PSS with one sandbox up,
    6.2 of 26 MB (4.8 MB USS) each with four. Not done: detached, the gofer and the sentry are orphans
    of PID 1, and where PID 1 reaps late (on this host about once a second) a killed gofer stays a
    zombie that `runsc delete` waits for: ~1 s added to every stop, and 5 s with "context deadline
    exceeded" when it lingers. Attached, a stop takes ~50-100 ms."""

    def __init__(self, spec: SandboxSpec, rootfs: Path, supervisor: Supervisor, runsc: str) -> None:
        super().__init__(spec, rootfs, supervisor, kind="gvisor")
        self.runsc = runsc
        self.root = own_state_root()
        """runsc's --root for this process's containers."""
        self.container_id = container_id(spec.id)
        self.bundle = spec.workdir / "bundle"
        self.debug_dir = spec.workdir / "runsc-logs"
        self._owned: list[tuple[int, float]] = []
        """Every host process seen as this sandbox's, with its start time: what stop() makes sure is gone."""

    def argv(self) -> list[str]:
        config = oci_config(self.rootfs, [JAIL_INIT], self.id, self.channel, self.workspace)
        write_bundle(self.bundle, config)
        argv = runsc_global_flags(self.runsc, self.root)
        if DEBUG_LOG:
            argv.append(f"--debug-log={self.debug_dir}/%COMMAND%.log")
        return [*argv, "run", "--bundle", str(self.bundle), self.container_id]

    def phases_from_marks(self) -> dict[str, float]:
        marks = self.boot.marks_ms
        return {
            "relay": marks["relay_ready"],
            "bundle": round(marks["jail_spawned"] - marks["relay_ready"], 2),
            "sandbox": round(marks["agent_socket"] - marks["jail_spawned"], 2),
            "agent": round(marks["agent_ready"] - marks["agent_socket"], 2),
        }

    def wait_ready(self) -> None:
        """JailSandbox.wait_ready, with the agent socket's appearance marked, and what runsc itself said
        last added to a failure."""
        try:
            self._wait_for_agent_socket()
            super().wait_ready()
        except BootFailed as failed:
            said = self.runsc_last_line()
            if said and said not in failed.reason:
                raise BootFailed(f"{failed.reason}; runsc said: {said}", failed.boot) from None
            raise
        self._note_owned()

    def _wait_for_agent_socket(self) -> None:
        """Until init's socat has made the agent socket (a jail that exits or hangs is left to wait_ready)."""
        assert self.proc is not None
        deadline = self._spawned_at + self.spec.boot_timeout_s
        while not self.agent_socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return
            time.sleep(READY_POLL_S)
        self.boot.marks_ms["agent_socket"] = self._since_spawn()

    def runsc_last_line(self) -> str | None:
        """What runsc's own logs said last, the container's output aside: the last FATAL ERROR of any of
        its processes, else the last line of the run's (then the sentry's, the gofer's) log."""
        texts = []
        for name in ("run.log", "boot.log", "gofer.log"):
            with contextlib.suppress(OSError):
                texts.append((self.debug_dir / name).read_text(errors="replace"))
        for text in texts:
            fatal = [line for line in text.splitlines() if "FATAL ERROR:" in line]
            if fatal:
                return fatal[-1].split("FATAL ERROR:", 1)[1].strip()
        for text in texts:
            if text.strip():
                return GLOG_PREFIX.sub("", last_line(text))
        return None

    def pids(self) -> list[int]:
        """The `runsc run` tree (gofer, sentry, ptrace stubs: the sentry leaves the parent's session but
        stays its child) and the host relay."""
        pids = super().pids()
        self._note_owned(pids)
        return pids

    def _note_owned(self, pids: list[int] | None = None) -> None:
        known = {pid for pid, _ in self._owned}
        for pid in pids if pids is not None else super().pids():
            if pid not in known:
                self._owned.append((pid, process_create_time(pid)))

    def stop(self) -> None:
        """Kill the container's init (`runsc run` then tears the container down and exits), make sure the
        record is deleted, and kill whatever of its processes still runs. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self._note_owned()
            with contextlib.suppress(subprocess.TimeoutExpired):
                killed = run_tool(
                    [self.runsc, "--root", str(self.root), "kill", self.container_id, "KILL"],
                    capture_output=True,
                    timeout=RUNSC_CALL_TIMEOUT_S,
                )
                if killed.returncode == 0:  # else no container yet: the supervisor's SIGTERM ends the start
                    self.proc.wait(timeout=STOP_GRACE_S)
        super().stop()
        deleted = self.proc is not None and delete_container(self.runsc, self.root, self.container_id) is None
        if deleted:  # a start cut short leaves runsc's lock file without a record; the id is ours alone
            for leftover in self.root.glob(f"{self.container_id}_*.lock"):
                leftover.unlink(missing_ok=True)
        kill_survivors(self._owned)


class GvisorBackend:
    """Runs each sandbox in a gVisor container."""

    name = "gvisor"
    accel = "none"
    features = FEATURES
    phases = PHASES

    def __init__(self, rootfs: Path, runsc: str, image: str = "busybox") -> None:
        self.rootfs = rootfs
        self.runsc = runsc
        self.image = image
        self.tls_profile = image_kind(image).tls_profile

    def boot(self, spec: SandboxSpec, supervisor: Supervisor) -> GvisorSandbox:
        return start_or_stop(GvisorSandbox(spec, self.rootfs, supervisor, self.runsc))

    def weaken(self, engine_socket: Path) -> GvisorBackend:
        raise ConfigError("the gvisor backend has no --leaky variant; run --leaky with --backend qemu")

    def describe(self) -> dict[str, object]:
        version = run_tool([self.runsc, "--version"], capture_output=True, text=True, timeout=10).stdout
        return {
            "version": " ".join(version.split()),
            "isolation": "gVisor: a user-space kernel (the sentry) and a file gofer, rootful, one OCI container each",
            "image": self.image,
            "tls_profile": self.tls_profile,
            "platform": PLATFORM,
            "platform_reason": PLATFORM_REASON,
            "host_uds": HOST_UDS,
            "runsc_run": "attached: `runsc run` waits for its container and reaps its gofer (its PSS counts)",
            "rootfs": str(self.rootfs),
            "egress": "the sentry's own loopback only (--network=none); a unix-socket bridge to the gateway listener",
        }


def check_runsc(runsc: str, rootfs: Path) -> None:
    """One container that runs /bin/true on the jail rootfs, with PLATFORM: a kernel or host where runsc
    cannot work fails here, in one line, before anything boots."""
    with scratch_dir("br-gvc-") as work:
        bundle = write_bundle(work / "bundle", oci_config(rootfs, ["/bin/true"], "check", None, None))
        root = work / "state"
        cid = f"br{os.getpid()}-check-{secrets.token_hex(3)}"
        argv = [*runsc_global_flags(runsc, root), "run", "--bundle", str(bundle), cid]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**child_environment(), OWNER_ENV: owner_mark()},  # invoke clean finds it if we are killed
        )
        try:
            output, _ = proc.communicate(timeout=CHECK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid, grace_s=0.5)
            proc.wait()
            delete_container(runsc, root, cid)
            raise EnvironmentMissing(
                f"runsc --platform={PLATFORM} did not run /bin/true within {CHECK_TIMEOUT_S:g} s on this kernel "
                f"({os.uname().release})"
            ) from None
        except BaseException:
            kill_group(proc.pid, grace_s=0.5)
            proc.wait()
            delete_container(runsc, root, cid)
            raise
        if proc.returncode != 0:
            delete_container(runsc, root, cid)
            raise EnvironmentMissing(
                f"runsc --platform={PLATFORM} cannot run a sandbox on this kernel ({os.uname().release}): "
                f"{last_line(output.decode(errors='replace'))}"
            )


def create_backend(options: BackendOptions) -> GvisorBackend:
    """Find runsc, stage the shared jail rootfs, and check that runsc runs a container here."""
    runsc = runsc_binary()
    rootfs = jail_rootfs(options.cache, options.image)
    check_runsc(runsc, rootfs)
    return GvisorBackend(rootfs, runsc, options.image)


def sweep_leftovers() -> list[str]:
    """Kill and delete the gVisor containers of harness processes that are gone, then remove their state
    directories; a line per thing removed (for `invoke clean`)."""
    parent = state_parent()
    removed: list[str] = []
    for root in sorted(parent.iterdir()) if parent.exists() else []:
        owner_pid, _, created = root.name.partition("-")
        with contextlib.suppress(ValueError):
            if process_create_time(int(owner_pid)) == float(created):
                continue  # its owner still runs and deletes its own containers
        held = any(root.iterdir())
        removed += _delete_all(root, owner_pid) if held else []
        shutil.rmtree(root, ignore_errors=True)
        if held:
            removed.append(f"removed gVisor state directory {root}")
    return removed


def processes_of_root(root: Path) -> list[tuple[int, float]]:
    """Every `runsc run`, gofer and sentry started with this --root, with their ptrace stubs."""
    found: list[tuple[int, float]] = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if f"--root={root}" in cmdline or ("--root", str(root)) in itertools.pairwise(cmdline):
            found += [(pid, process_create_time(pid)) for pid in running_tree(process.pid)]
    return found


def _delete_all(root: Path, owner_pid: str) -> list[str]:
    """Kill what runs under `root`, then `runsc delete --force` each container it lists."""
    kill_survivors(processes_of_root(root))
    runsc = shutil.which("runsc")
    if runsc is None:
        return []  # without runsc nothing of it can run; the directory alone is left to remove
    listing = run_tool(
        [runsc, "--root", str(root), "list", "--format=json"],
        capture_output=True,
        text=True,
        timeout=RUNSC_CALL_TIMEOUT_S,
    )
    try:
        containers = json.loads(listing.stdout or "[]") or []
    except json.JSONDecodeError:
        containers = []
    removed = []
    for container in containers:
        cid = str(container.get("id", ""))
        if cid:
            error = delete_container(runsc, root, cid)
            said = f"; runsc said: {error}" if error else ""
            removed.append(f"deleted gVisor container {cid} of a run that is gone (pid {owner_pid}){said}")
    return removed


__all__ = ["FEATURES", "PHASES", "BootFailed", "GvisorBackend", "create_backend", "sweep_leftovers"]
