"""The `command` backend: your own stack, described by a YAML file of shell commands.

    invoke bench --backend command:examples/command-backends/bwrap.yaml

The harness runs the stack's commands and judges what comes out; it never needs to know what the
stack is (bubblewrap, gVisor, a Docker or Kubernetes runtime, a VM manager). Examples and a longer
guide: examples/command-backends/.

The file (every other key is an error):

    name: my-stack                  # required
    description: ...                # optional
    commands:                       # shell commands, each run as `sh -c`
      create: ...                   # required
      exec: ...                     # required
      stop: ...                     # required
      copy_in: ...                  # optional
      pids: ...                     # optional
    egress:
      proxy: 127.0.0.1:3128         # required: the HTTP proxy as the sandbox sees it (host:port)
      gateway: behind               # required: behind | own
    ca_bundle: /etc/ssl/certs/ca-certificates.crt   # optional: where the gateway CA goes inside
    boot_timeout_s: 30              # optional: replaces --boot-timeout for this stack
    own_kernel: false               # optional: what you claim (reported as a claim; the kernel probe checks it)
    host_alias: null                # optional: the address inside that means the host, if one exists
    resolver: null                  # optional: the DNS server the sandbox's network offers, if any

The commands' contract:

- `create` starts one sandbox. Either it returns once the sandbox is ready, or it runs on as the
  sandbox's long-lived process (a jail's parent, say); either way the harness polls `exec` with
  `echo ready` until the answer is `ready`, within the boot timeout. A create that exits non-zero is a
  failed boot. Whatever create starts in its process group (it leads a new session) belongs to the
  sandbox. Its output goes to BR_WORKDIR/create.log.
- `exec` runs $BR_COMMAND inside with `sh`, giving it this command's stdin; its stdout, stderr and exit
  code are the command's. It should kill the command inside after $BR_TIMEOUT seconds; an exec that exits
  124 or 137 (what `timeout` and a SIGKILL give) at or after that counts as timed out. The harness kills
  the exec's whole process group EXEC_GRACE_S after BR_TIMEOUT whatever the stack did (rc 137, timed out).
- `copy_in` copies the host file $BR_SRC to $BR_DEST inside. Without it, the harness pipes the file
  through `exec` (`cat > DEST`).
- `stop` stops the sandbox and removes what create made. Afterwards the harness kills everything left
  in create's process group, every exec still running, and any process that still carries this
  sandbox's BR_WORKDIR and run owner in its environment; then it removes BR_SCRATCH. If the harness
  itself is SIGKILLed, `invoke clean` kills those processes and runs the stop command (with the same
  variables) for every sandbox of a run that is gone.
- `pids` prints the host pids whose memory is the sandbox's cost, one per line. Without it (a remote
  cluster, a VM manager's daemon), host memory is n/a in the results, never 0.

Variables every command gets, on top of the harness's scrubbed environment (child_environment: no key
of the host's ever reaches a stack command):

- BR_SANDBOX_ID: the sandbox's id within the run (also a good hostname).
- BR_SANDBOX_NAME: a name unique on this host across runs, a DNS label (for a container or pod name).
- BR_WORKDIR: the host-side per-sandbox directory (absolute; also the commands' working directory).
- BR_SCRATCH: a short private host directory for unix sockets and pid files (a socket path must fit
  in 108 bytes), removed by the harness after stop and by `invoke clean` after a crash.
- BR_GATEWAY_HOST, BR_GATEWAY_PORT: the sandbox's own gateway listener on host loopback, which a
  `gateway: behind` stack must relay its proxy to. Empty with `gateway: own`, or when the run has no gateway.
- BR_PROXY: egress.proxy as given (host:port, as the sandbox sees it).
- BR_STACK_DIR: the YAML file's directory (for helper scripts shipped beside it).
- BR_ROOTFS: the harness's read-only busybox+socat jail rootfs (harness/sandbox/jail.py), for stacks
  that take a root directory. Built and set only when a command names it; empty otherwise.
- BR_COMMAND, BR_TIMEOUT (whole seconds, at least 1): for `exec` (BR_TIMEOUT also for `copy_in`).
- BR_SRC, BR_DEST: for `copy_in`.

The commands have no secrets by contract: describe() records them verbatim in results.json (never an
environment value). The backend cannot vouch for what the stack does, so FEATURES claims nothing (no
snapshot, no own kernel, no --leaky): the isolation scenario measures the stack instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import posixpath
import re
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from harness.errors import ConfigError
from harness.image.catalog import image_kind
from harness.paths import pid_records_dir
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
from harness.sandbox.jail import jail_rootfs
from harness.scratch import make_scratch_dir, remove_scratch_dir
from harness.supervisor import (
    OWNER_ENV,
    Supervisor,
    child_environment,
    owner_mark,
    pid_alive,
    process_create_time,
    run_tool,
)

FEATURES = PROCESS_FEATURES
"""Static: flags are checked against it before the file is read. The stack's own_kernel is a claim, reported
in describe(); the harness vouches for nothing it cannot see. --image picks BR_ROOTFS for a stack that names it;
a stack with a root of its own brings its own userland."""

PHASES = {"stack": "spawn of the stack's create command → the first exec of `echo ready` that answered"}
"""The one phase the harness can see: what the stack does in between is its own."""

STACK_KEYS = (
    "name",
    "description",
    "commands",
    "egress",
    "ca_bundle",
    "boot_timeout_s",
    "own_kernel",
    "host_alias",
    "resolver",
)
"""Every top-level key the file may have."""

REQUIRED_COMMANDS = ("create", "exec", "stop")
OPTIONAL_COMMANDS = ("copy_in", "pids")
COMMAND_PURPOSE = {
    "create": "the command that starts one sandbox",
    "exec": "the command that runs $BR_COMMAND inside with its stdin, stdout, stderr and exit code",
    "stop": "the command that stops the sandbox and removes what create made",
}
"""What the fix is, for a missing required command."""

EGRESS_KEYS = ("proxy", "gateway")
GATEWAY_MODES = ("behind", "own")
"""behind: the harness's gateway sits behind the stack's proxy; own: the stack's own proxy, no gateway."""

READY_COMMAND = "echo ready"
"""What the harness execs until the stack answers `ready`."""

READY_POLL_S = 0.01
"""First pause between readiness execs; it grows by half each time up to READY_POLL_MAX_S."""

READY_POLL_MAX_S = 0.25
"""Longest pause between readiness execs (a `docker exec` costs about this much anyway)."""

READY_EXEC_TIMEOUT_S = 5.0
"""A readiness exec that hangs longer than this is killed and tried again."""

EXEC_GRACE_S = 2.0
"""How long past BR_TIMEOUT the stack gets to kill the command inside and answer; then the host kills the
exec's process group (which may leave a command inside running, if the stack's exec does not forward it)."""

DRAIN_S = 0.5
"""After an exec's shell exited, how long something it left behind may keep its output open."""

COMMUNICATE_STEP_S = 0.1
"""How often a running exec is checked for its deadline and for an exited shell."""

STOP_TIMEOUT_S = 60.0
"""The stop command's time limit (removing a container or pod can be slow); then it is killed."""

STOP_GRACE_S = 2.0
"""SIGTERM to SIGKILL for what the stop command left running."""

PIDS_TIMEOUT_S = 10.0
"""The pids command's time limit."""

COPY_TIMEOUT_S = 120.0
"""copy_in's default time limit."""

TIMEOUT_EXIT_CODES = (124, 137)
"""`timeout`'s own exit code and a SIGKILLed command's: at or after BR_TIMEOUT, a timed-out exec."""

KILLED_RC = 137
"""What an exec the host had to kill reports (128 + SIGKILL), as the guest agent does."""

RECORDS_DIR_NAME = "command-sandboxes"
"""Under the pid records: one JSON file per live sandbox (its stop command and variables), so that `invoke
clean` can stop what a SIGKILLed run's stack left outside its processes (a container, a pod, a VM)."""

COMMAND_MAX_BYTES = 128 * 1024 - len("BR_COMMAND=") - 1
"""BR_COMMAND travels in the environment, where Linux takes at most 128 KiB per variable (MAX_ARG_STRLEN);
a larger command goes in through stdin (`exec sh -s`) or copy_in."""

DNS_LABEL_MAX = 63
"""BR_SANDBOX_NAME's longest (a Kubernetes pod name, a DNS label)."""


@dataclass(frozen=True)
class Stack:
    """A validated stack file."""

    path: Path
    """The file, resolved."""
    label: str
    """How the user named it (`--backend command:LABEL`), for messages."""
    sha256: str
    """Of the file's bytes, as read."""
    name: str
    """Its `name`."""
    description: str
    """Its `description` ("" without)."""
    commands: dict[str, str]
    """Shell commands by key (create, exec, stop, and copy_in, pids where given)."""
    proxy: Endpoint
    """egress.proxy: the HTTP proxy as the sandbox sees it."""
    gateway: str
    """egress.gateway: behind or own."""
    ca_bundle: str | None
    """Path inside for the gateway CA; None: no trust store installed."""
    boot_timeout_s: float | None
    """Replaces --boot-timeout for this stack; None keeps it."""
    own_kernel: bool | None
    """What the user claims; None where the file says nothing."""
    host_alias: str | None
    """The address inside that means the host; None where none exists."""
    resolver: str | None
    """The DNS server the sandbox's network offers; None where none."""

    def names(self, variable: str) -> bool:
        """A command refers to `variable` (BR_ROOTFS is built only for stacks that use it)."""
        return any(variable in command for command in self.commands.values())

    def network(self) -> GuestNetwork:
        if self.gateway == "behind":
            route = (
                f"the stack's proxy {self.proxy} → its own relay (stack {self.name!r}) → "
                "the sandbox's own gateway listener"
            )
        else:
            route = f"the stack's own proxy {self.proxy} (stack {self.name!r}); no harness gateway on the path"
        return GuestNetwork(
            egress=self.proxy,
            egress_route=route,
            agent_port=0,
            own_address="127.0.0.1",
            host_alias=self.host_alias,
            resolver=self.resolver,
        )


def _fail(label: str, message: str) -> ConfigError:
    return ConfigError(f"--backend command:{label}: {message}")


def _closest(word: str, known: tuple[str, ...]) -> str:
    from harness.config import did_you_mean  # harness.config imports the backends lazily; no cycle

    return did_you_mean(word, known)


def _reject_unknown(label: str, mapping: dict[Any, Any], known: tuple[str, ...], where: str, takes: str) -> None:
    """A key of `mapping` (at `where`, e.g. "commands."; a top-level key is shown quoted) that is not in
    `known` is a one-line error with the closest known key and what the place takes."""
    for key in mapping:
        if key not in known:
            shown = f"{where}{key}" if where else repr(key)
            raise _fail(label, f"unknown key {shown}; {_closest(str(key), known)}{takes}")


def load_stack(argument: str | None) -> Stack:
    """Read and validate a stack file; anything wrong is a one-line ConfigError naming the file, the key
    and the fix."""
    if not argument:
        raise ConfigError(
            "--backend command needs a stack file: --backend command:PATH.yaml (see examples/command-backends/)"
        )
    label = argument
    path = Path(argument).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _fail(label, "no such file; name a stack YAML (examples in examples/command-backends/)") from None
    except IsADirectoryError:
        raise _fail(label, "is a directory; name the stack's YAML file in it") from None
    except OSError as exc:
        raise _fail(label, f"cannot read it ({exc.strerror}); name a readable stack YAML") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise _fail(label, f"not valid YAML ({problem}{where}); fix the syntax") from None
    if data is None:
        raise _fail(label, "is empty; it needs name, commands (create, exec, stop) and egress")
    if not isinstance(data, dict):
        raise _fail(label, f"holds a {type(data).__name__}, not a mapping; write keys: {', '.join(STACK_KEYS)}")
    _reject_unknown(label, data, STACK_KEYS, "", f"the keys are: {', '.join(STACK_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail(label, "name is missing or empty; add `name: <what this stack is>`")
    description = data.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise _fail(label, "description must be text; quote it")
    return Stack(
        path=path.resolve(),
        label=label,
        sha256=hashlib.sha256(raw).hexdigest(),
        name=name.strip(),
        description=description.strip(),
        commands=_commands(label, data.get("commands")),
        proxy=_proxy(label, data.get("egress")),
        gateway=_gateway(label, data.get("egress")),
        ca_bundle=_ca_bundle(label, data),
        boot_timeout_s=_boot_timeout(label, data.get("boot_timeout_s")),
        own_kernel=_own_kernel(label, data.get("own_kernel")),
        host_alias=_optional_text(label, data, "host_alias"),
        resolver=_optional_text(label, data, "resolver"),
    )


def _commands(label: str, value: Any) -> dict[str, str]:
    known = REQUIRED_COMMANDS + OPTIONAL_COMMANDS
    if value is None:
        raise _fail(label, "commands is missing; add commands: with create, exec and stop")
    if not isinstance(value, dict):
        raise _fail(label, f"commands must be a mapping of {', '.join(known)} to shell commands")
    _reject_unknown(label, value, known, "commands.", f"the commands are: {', '.join(known)}")
    for key in REQUIRED_COMMANDS:
        if key not in value or value[key] is None:
            raise _fail(label, f"commands.{key} is missing; add {COMMAND_PURPOSE[key]}")
    commands = {}
    for key, command in value.items():
        if not isinstance(command, str) or not command.strip():
            raise _fail(label, f"commands.{key} must be a non-empty shell command (text), not {command!r}")
        commands[key] = command
    return commands


def _egress(label: str, value: Any) -> dict[str, Any]:
    if value is None:
        raise _fail(label, "egress is missing; add egress: {proxy: HOST:PORT, gateway: behind|own}")
    if not isinstance(value, dict):
        raise _fail(label, "egress must be a mapping: {proxy: HOST:PORT, gateway: behind|own}")
    _reject_unknown(label, value, EGRESS_KEYS, "egress.", "egress takes proxy and gateway")
    return value


def _proxy(label: str, egress: Any) -> Endpoint:
    value = _egress(label, egress).get("proxy")
    if not isinstance(value, str) or not value.strip():
        raise _fail(label, "egress.proxy is missing; add the HTTP proxy as the sandbox sees it, e.g. 127.0.0.1:3128")
    host, colon, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _fail(label, f"egress.proxy must be HOST:PORT (e.g. 127.0.0.1:3128), not {value!r}")
    return Endpoint(host, int(port))


def _gateway(label: str, egress: Any) -> str:
    value = _egress(label, egress).get("gateway")
    if value not in GATEWAY_MODES:
        raise _fail(
            label,
            f"egress.gateway must be behind (the harness's gateway behind your proxy) or own (your own proxy), "
            f"not {value!r}",
        )
    return str(value)


def _ca_bundle(label: str, data: dict[str, Any]) -> str | None:
    value = data.get("ca_bundle")
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        raise _fail(label, f"ca_bundle must be an absolute path inside the sandbox, not {value!r}")
    egress = data.get("egress")
    if isinstance(egress, dict) and egress.get("gateway") == "own":
        raise _fail(
            label,
            "ca_bundle is where the harness's gateway CA goes; with gateway: own that gateway is off the path: drop it",
        )
    return value


def _boot_timeout(label: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise _fail(label, f"boot_timeout_s must be a positive number of seconds, not {value!r}")
    return float(value)


def _own_kernel(label: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise _fail(label, f"own_kernel must be true or false (what you claim), not {value!r}")


def _optional_text(label: str, data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(label, f"{key} must be an address or a name (or null), not {value!r}")
    return value.strip()


def check_argument(argument: str | None) -> None:
    """For RunConfig.validate: the stack file parses and is complete, before anything of the run is written."""
    load_stack(argument)


def dns_label(text: str) -> str:
    """`text` as a DNS label: lowercase letters, digits and hyphens, at most DNS_LABEL_MAX characters."""
    label = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "br"
    if len(label) > DNS_LABEL_MAX:
        digest = hashlib.sha256(label.encode()).hexdigest()[:8]
        label = f"{label[: DNS_LABEL_MAX - 9].rstrip('-')}-{digest}"
    return label


def whole_seconds(timeout: float) -> int:
    """BR_TIMEOUT: the timeout rounded up, at least 1 (as the guest agent's protocol has it)."""
    return max(1, math.ceil(timeout))


def _since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 2)


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no output)"
    return lines[-1] if lines else "(no output)"


def _brief(result: ExecResult) -> str:
    """A readiness answer in a few words, for a failed boot's reason."""
    text = " ".join((result.stdout + result.stderr).decode(errors="replace").split())
    return f"rc {result.rc}{', timed out' if result.timed_out else ''}: {text[:160] or '(no output)'}"


class CommandSandbox:
    """One sandbox of a user's stack: its create process, and the commands run for it."""

    def __init__(self, spec: SandboxSpec, stack: Stack, supervisor: Supervisor, rootfs: Path | None) -> None:
        self.spec = spec
        self.id = spec.id
        self.stack = stack
        self.supervisor = supervisor
        self.boot = BootRecord()
        self.network = stack.network()
        self.ca_bundle = stack.ca_bundle
        self.workdir = spec.workdir.absolute()
        self.boot_timeout_s = stack.boot_timeout_s or spec.boot_timeout_s
        self.scratch = make_scratch_dir("br-cmd-")
        """BR_SCRATCH."""
        self.create_proc: subprocess.Popen[bytes] | None = None
        self._owner = owner_mark()
        self._lock = threading.Lock()
        self._running: set[int] = set()
        """Process groups of commands in flight (execs, pids), killed by stop()."""
        self._stopped = False
        self._started = 0.0
        behind = stack.gateway == "behind" and spec.gateway_port is not None
        self.variables = {
            "BR_SANDBOX_ID": spec.id,
            "BR_SANDBOX_NAME": dns_label(f"br-{supervisor.run_id}-{spec.id}"),
            "BR_WORKDIR": str(self.workdir),
            "BR_SCRATCH": str(self.scratch),
            "BR_GATEWAY_HOST": "127.0.0.1" if behind else "",
            "BR_GATEWAY_PORT": str(spec.gateway_port) if behind else "",
            "BR_PROXY": str(stack.proxy),
            "BR_STACK_DIR": str(stack.path.parent),
            "BR_ROOTFS": str(rootfs) if rootfs is not None else "",
        }
        """The BR_* variables every command of this sandbox gets."""

    # ---- boot ----------------------------------------------------------------------------
    def spawn(self) -> None:
        """Record the sandbox for `invoke clean`, then spawn the create command (through the supervisor's
        long-lived spawner thread: a tool it execs that dies with its parent must not die with a boot thread)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._record().write_text(
            json.dumps(
                {
                    "sandbox": self.id,
                    "stack": str(self.stack.path),
                    "stop": self.stack.commands["stop"],
                    "variables": self.variables,
                    "workdir": str(self.workdir),
                    "owner": {"pid": os.getpid(), "create_time": process_create_time(os.getpid())},
                }
            )
        )
        self._started = time.monotonic()
        with (self.workdir / "create.log").open("ab") as log:
            self.create_proc = self.supervisor.spawn(
                ["/bin/sh", "-c", self.stack.commands["create"]],
                name=f"command-create:{self.id}",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=child_environment(self.variables),
                cwd=self.workdir,
            )
        self.boot.marks_ms["create_spawned"] = _since(self._started)

    def wait_ready(self) -> None:
        """Exec `echo ready` until the stack answers; a create that fails, or no answer in time, is a failed boot."""
        assert self.create_proc is not None
        deadline = self._started + self.boot_timeout_s
        pause = READY_POLL_S
        last = "no exec answered yet"
        while True:
            status = self.create_proc.poll()
            if status is not None and "create_returned" not in self.boot.marks_ms:
                self.boot.marks_ms["create_returned"] = _since(self._started)
                if status != 0:
                    log = _last_line(self.workdir / "create.log")
                    raise BootFailed(f"the stack's create command exited with status {status}: {log}", self.boot)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BootFailed(
                    f"the stack did not answer `{READY_COMMAND}` within {self.boot_timeout_s:g} s (last: {last})",
                    self.boot,
                )
            result = self._exec(READY_COMMAND, min(READY_EXEC_TIMEOUT_S, remaining), b"", grace_s=0.0)
            if result.rc == 0 and result.text.strip() == "ready":
                ready = _since(self._started)
                if self.create_proc.poll() not in (None, 0):
                    continue  # it answered, but create failed meanwhile: the next turn reports that
                self.boot.marks_ms["ready"] = ready
                self.boot.boot_ms = ready
                self.boot.phases_ms = {"stack": ready}
                return
            last = _brief(result)
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 1.5, READY_POLL_MAX_S)

    # ---- the Sandbox protocol ------------------------------------------------------------
    def exec(self, command: str, timeout: float = 30.0, stdin: bytes = b"") -> ExecResult:
        return self._exec(command, timeout, stdin, grace_s=EXEC_GRACE_S)

    def _exec(self, command: str, timeout: float, stdin: bytes, grace_s: float) -> ExecResult:
        if len(command.encode()) > COMMAND_MAX_BYTES:
            raise ValueError(
                f"a command of {len(command.encode())} bytes does not fit in BR_COMMAND ({COMMAND_MAX_BYTES} at most); "
                "send a long script as stdin to `sh -s` instead"
            )
        extra = {"BR_COMMAND": command, "BR_TIMEOUT": str(whole_seconds(timeout))}
        return self._run("exec", extra, timeout, stdin, grace_s)

    def copy_in(self, src: Path, dest: str, timeout: float = COPY_TIMEOUT_S) -> ExecResult:
        """The host file `src` to `dest` inside: the stack's copy_in, else `cat > dest` through exec."""
        if "copy_in" not in self.stack.commands:
            parent = shlex.quote(posixpath.dirname(dest) or ".")
            return self.exec(f"mkdir -p {parent} && cat > {shlex.quote(dest)}", timeout, src.read_bytes())
        extra = {"BR_SRC": str(src.absolute()), "BR_DEST": dest, "BR_TIMEOUT": str(whole_seconds(timeout))}
        return self._run("copy_in", extra, timeout, b"", EXEC_GRACE_S)

    def pids(self) -> list[int]:
        """What the stack's pids command prints (live pids only); [] without one, which the bench reports
        as n/a."""
        if "pids" not in self.stack.commands or self._stopped:
            return []
        result = self._run("pids", {}, PIDS_TIMEOUT_S, b"", 0.0)
        if result.rc != 0:
            return []
        found = {int(token) for token in result.stdout.split() if token.isdigit()}
        return sorted(pid for pid in found if pid_alive(pid))

    def stop(self) -> None:
        """The stack's stop command, then whatever is left: create's process group, commands in flight, and
        any process that still carries this sandbox's marks. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            if self.create_proc is not None:
                result = self._run("stop", {}, STOP_TIMEOUT_S, b"", 0.0)
                with (self.workdir / "stop.log").open("ab") as log:
                    log.write(result.stdout + result.stderr)
                    if result.rc != 0:
                        note = " (timed out)" if result.timed_out else ""
                        log.write(f"stop command: rc {result.rc}{note}\n".encode())
        finally:
            with self._lock:
                groups = list(self._running)
            if self.create_proc is not None:
                groups.insert(0, self.create_proc.pid)
            for pid in groups:
                end_group(pid, STOP_GRACE_S)
            if self.create_proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.create_proc.wait(timeout=STOP_GRACE_S)  # SIGKILLed at the latest: reap it
            for pid in groups:
                self.supervisor.stop(pid, grace_s=0)  # the group has ended: this drops its record
            for process in self._strays():
                with contextlib.suppress(psutil.Error):
                    process.kill()
            remove_scratch_dir(self.scratch)
            self._record().unlink(missing_ok=True)

    def _record(self) -> Path:
        """This sandbox's entry under RECORDS_DIR_NAME, for `invoke clean`."""
        return _records_dir() / f"{hashlib.sha256(str(self.workdir).encode()).hexdigest()[:16]}.json"

    def guest_memory(self) -> dict[str, int] | None:
        return None

    def host_endpoints(self) -> dict[str, Endpoint]:
        return {}

    # ---- running the stack's commands ----------------------------------------------------
    def _run(self, kind: str, extra: dict[str, str], timeout: float, stdin: bytes, grace_s: float) -> ExecResult:
        """Run commands[kind] with the variables and `extra`, stdin in, stdout and stderr captured; its process
        group is killed at timeout + grace_s, and whatever it left in the group when it ended."""
        started = time.monotonic()
        proc = self.supervisor.spawn(
            ["/bin/sh", "-c", self.stack.commands[kind]],
            name=f"command-{kind}:{self.id}",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_environment({**self.variables, **extra}),
            cwd=self.workdir,
        )
        with self._lock:
            self._running.add(proc.pid)
        try:
            stdout, stderr, killed = _communicate(proc, stdin, started + timeout + grace_s)
        finally:
            end_group(proc.pid, STOP_GRACE_S)
            self.supervisor.stop(proc.pid, grace_s=0)
            with self._lock:
                self._running.discard(proc.pid)
        duration = time.monotonic() - started
        if killed:
            return ExecResult(KILLED_RC, stdout, stderr, duration, timed_out=True)
        rc = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        timed_out = rc in TIMEOUT_EXIT_CODES and duration >= timeout
        return ExecResult(rc, stdout, stderr, duration, timed_out=timed_out)

    def _strays(self) -> list[psutil.Process]:
        """Processes of this sandbox that escaped its process groups (a daemon that called setsid): they
        still carry its BR_WORKDIR and the run's owner mark in their environment."""
        found = []
        for process in psutil.process_iter():
            try:
                env = process.environ()
            except psutil.Error:
                continue
            if env.get("BR_WORKDIR") == str(self.workdir) and env.get(OWNER_ENV) == self._owner:
                found.append(process)
        return found


def end_group(pgid: int, grace_s: float) -> None:
    """SIGTERM what is left in process group `pgid`, SIGKILL what still runs after grace_s. Unlike the
    supervisor's kill_group it does not wait for zombies: an orphan of the group that PID 1 has not reaped
    yet (a relay whose parent, the create shell, ended first) has ended all the same."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return  # the common case: the group ended with its command
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_running(pgid):
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _group_running(pgid: int) -> bool:
    """A process of group `pgid` that is not a zombie."""
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


def _communicate(proc: subprocess.Popen[bytes], stdin: bytes, deadline: float) -> tuple[bytes, bytes, bool]:
    """stdout, stderr, and whether the deadline killed it. Once the shell has exited, a process it left
    holding its output open gets DRAIN_S, then its group is killed (the command's answer is complete)."""
    pending: bytes | None = stdin
    exited_at: float | None = None
    while True:
        step = max(0.0, min(COMMUNICATE_STEP_S, deadline - time.monotonic()))
        try:
            stdout, stderr = proc.communicate(pending, timeout=step)
            return stdout, stderr, False
        except subprocess.TimeoutExpired:
            pending = None  # what was started is kept; a retry must not send it again
        now = time.monotonic()
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        overdue = now >= deadline
        if overdue or (exited_at is not None and now - exited_at >= DRAIN_S):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                stdout, stderr = proc.communicate(timeout=DRAIN_S)
            except subprocess.TimeoutExpired:
                # Something outside the group still holds the pipes: the rest of the output is lost.
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        with contextlib.suppress(OSError):
                            stream.close()
                proc.wait()
                stdout, stderr = b"", b""
            return stdout, stderr, overdue and exited_at is None


class CommandBackend:
    """Runs each sandbox with a user's stack of shell commands."""

    accel = "none"
    features = FEATURES
    phases = PHASES

    def __init__(self, stack: Stack, rootfs: Path | None, image: str = "busybox") -> None:
        self.stack = stack
        self.rootfs = rootfs
        self.name = f"command:{stack.label}"
        self.image = image
        self.tls_profile = image_kind(image).tls_profile
        """The image's profile, also for a stack with its own root: the harness cannot tell what its clients
        send, so only --image debian asks for the strict one."""

    def boot(self, spec: SandboxSpec, supervisor: Supervisor) -> CommandSandbox:
        return start_or_stop(CommandSandbox(spec, self.stack, supervisor, self.rootfs))

    def weaken(self, engine_socket: Path) -> CommandBackend:
        raise ConfigError("the command backend has no --leaky variant (the stack is yours); run --leaky with qemu")

    def describe(self) -> dict[str, object]:
        """What the report's conditions show (isolation, version, egress: in words), and the stack itself: its
        file, sha256 and commands, never an environment value."""
        stack = self.stack
        claim = {True: "claims a kernel of its own", False: "claims no kernel of its own", None: "no kernel claim"}
        if stack.gateway == "behind":
            egress = (
                f"the stack's proxy {stack.proxy} → its own relay → the sandbox's own gateway listener "
                "(the gateway's policy and audit are on the path)"
            )
        else:
            egress = (
                f"the stack's own proxy {stack.proxy}: the harness's gateway is NOT on the path "
                "(its policy and audit see nothing)"
            )
        return {
            "isolation": (
                f"your own stack {stack.name!r}, run by its commands; it {claim[stack.own_kernel]} "
                "(a claim: the isolation scenario measures it)"
            ),
            "version": f"{stack.path.name}, sha256 {stack.sha256[:16]}",
            "egress": egress,
            "egress_mode": stack.gateway,
            "proxy": str(stack.proxy),
            "own_kernel_claimed": stack.own_kernel,
            "stack": {
                "name": stack.name,
                "description": stack.description,
                "file": str(stack.path),
                "sha256": stack.sha256,
                "commands": dict(stack.commands),
            },
            "ca_bundle": stack.ca_bundle,
            "boot_timeout_s": stack.boot_timeout_s,
            "host_alias": stack.host_alias,
            "resolver": stack.resolver,
            "host_memory": (
                "the stack's pids command names its host processes"
                if "pids" in stack.commands
                else "n/a: the stack has no pids command, so its host processes are unknown (not 0)"
            ),
            "rootfs": str(self.rootfs) if self.rootfs is not None else None,
        }


def _records_dir() -> Path:
    directory = pid_records_dir() / RECORDS_DIR_NAME
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def sweep_leftovers() -> list[str]:
    """For `invoke clean`, after it killed a gone run's processes: run the stop command of each sandbox that
    run left, with the variables it had, so a container, pod or VM its stack made is removed too."""
    done: list[str] = []
    for path in sorted(_records_dir().glob("*.json")):
        try:
            record = json.loads(path.read_text())
            owner, command, variables = record["owner"], record["stop"], dict(record["variables"])
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            done.append(f"unreadable command-sandbox record {path.name}")
            continue
        if process_create_time(owner["pid"]) == owner["create_time"]:
            continue  # its run is alive and stops it itself
        workdir = Path(record.get("workdir", "/"))
        try:
            result = run_tool(
                ["/bin/sh", "-c", command],
                env=variables,
                cwd=workdir if workdir.is_dir() else "/",
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=STOP_TIMEOUT_S,
            )
            outcome = f"exit {result.returncode}"
        except (subprocess.TimeoutExpired, OSError) as exc:
            outcome = type(exc).__name__
        path.unlink(missing_ok=True)
        done.append(
            f"ran the stop command of command sandbox {record.get('sandbox')} ({record.get('stack')}) "
            f"of a run that is gone: {outcome}"
        )
    return done


def create_backend(options: BackendOptions) -> CommandBackend:
    """Validate the stack file; stage the jail rootfs only for a stack that names BR_ROOTFS."""
    stack = load_stack(options.argument)
    rootfs = jail_rootfs(options.cache, options.image) if stack.names("BR_ROOTFS") else None
    return CommandBackend(stack, rootfs, options.image)


__all__ = [
    "FEATURES",
    "CommandBackend",
    "CommandSandbox",
    "Stack",
    "check_argument",
    "create_backend",
    "load_stack",
    "sweep_leftovers",
]
