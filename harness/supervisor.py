"""One owner for every process the harness starts, so every exit path cleans up the same way.

Each child runs in its own session (process group) and is recorded on disk with its start time,
so `invoke clean` can reap what a SIGKILLed run left behind without touching recycled pids.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from harness.paths import pid_records_dir

TERMINATE_GRACE_S = 2.0
"""How long a process group gets after SIGTERM before SIGKILL."""

CHILD_ENV_ALLOWED = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TERM",
    "TZ",
    "TMPDIR",
    "XDG_CACHE_HOME",
    "XDG_RUNTIME_DIR",
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "BLASTRADIUS_CACHE",
)
"""What a child inherits of the harness's environment: nothing that could be a key. Only the gateway
needs keys, and it is handed them by name; a backend adds what its tools need (e.g. KUBECONFIG)."""


OWNER_ENV = "BLASTRADIUS_OWNER"
"""Every supervised child carries its run's owner (pid:start time) in its environment, and what it starts
inherits it: `invoke clean` finds a SIGKILLed run's processes even where their pid record was never
written (a kill between a spawn and its record)."""


def owner_mark() -> str:
    """This process as OWNER_ENV names it."""
    return f"{os.getpid()}:{process_create_time(os.getpid())!r}"


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A scrubbed environment for a child: the allowed variables of ours, plus `extra`."""
    return {**{name: os.environ[name] for name in CHILD_ENV_ALLOWED if name in os.environ}, **(extra or {})}


def run_tool(
    argv: list[str], env: Mapping[str, str] | None = None, **run_kwargs: Any
) -> subprocess.CompletedProcess[Any]:
    """A short-lived helper command (a version probe, cpio, apt-get): subprocess.run with a scrubbed
    environment, plus `env` for what that tool needs."""
    return subprocess.run(argv, env=child_environment(env), **run_kwargs)


class Interrupted(BaseException):
    """Raised in the main thread on SIGTERM (SIGINT raises KeyboardInterrupt).

    A BaseException, like KeyboardInterrupt: an `except Exception` that records a failed step (a
    probe, a proxy target, a load thread) must never turn a cancelled run into a result."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class ProcessRecord:
    """What `invoke clean` needs to find a leftover process again."""

    pid: int
    """Process id, also its process-group id (each child leads its own session)."""
    create_time: float
    """psutil create_time, to tell our process from a recycled pid."""
    name: str
    """Human label, e.g. qemu:r0-sb1."""


def process_create_time(pid: int) -> float:
    """psutil's start time of `pid`, 0.0 when it is gone: with the pid, it names one process for good."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def pid_alive(pid: int) -> bool:
    """True while a process with this pid runs (one we may not signal counts as alive). A zombie has
    ended and holds no memory; only its parent can reap it, and where an orphan's new parent is a
    container's PID 1 that never reaps, it stays a zombie for good."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_group(pid: int, grace_s: float = TERMINATE_GRACE_S) -> bool:
    """SIGTERM the process group led by pid, then SIGKILL it. True if anything was signalled."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    return True


class Supervisor:
    """Starts, records and stops the harness's child processes."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.record_path: Path = pid_records_dir() / f"{run_id}.json"
        self._lock = threading.Lock()
        self._live: dict[int, ProcessRecord] = {}
        self._popens: dict[int, subprocess.Popen[bytes]] = {}
        self._spawner: ThreadPoolExecutor | None = None

    def spawn(self, argv: list[str], name: str, **popen_kwargs: object) -> subprocess.Popen[bytes]:
        """Start argv in a new session and record it before returning. Its environment is scrubbed
        (child_environment) unless the caller hands it one of its own.

        Every child is forked by one long-lived spawner thread, whoever asks: a child that dies with its
        parent (bwrap --die-with-parent, PR_SET_PDEATHSIG) dies when the parent *thread* ends, and boots
        run on short-lived pool threads."""
        env = popen_kwargs.get("env")
        popen_kwargs["env"] = {**(env if isinstance(env, Mapping) else child_environment()), OWNER_ENV: owner_mark()}
        with self._lock:
            if self._spawner is None:
                self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"spawner-{self.run_id}")
            spawner = self._spawner
        proc: subprocess.Popen[bytes] = spawner.submit(
            subprocess.Popen,
            argv,
            start_new_session=True,
            **popen_kwargs,  # type: ignore[arg-type]
        ).result()
        self.adopt(proc.pid, name)
        with self._lock:
            self._popens[proc.pid] = proc
        return proc

    def adopt(self, pid: int, name: str) -> None:
        """Take ownership of a process group started elsewhere (e.g. by a library)."""
        with self._lock:
            self._live[pid] = ProcessRecord(pid=pid, create_time=process_create_time(pid), name=name)
            self._write()

    def stop(self, pid: int, grace_s: float = TERMINATE_GRACE_S) -> None:
        """Stop one process group and forget it."""
        kill_group(pid, grace_s)
        with self._lock:
            proc = self._popens.pop(pid, None)
            self._live.pop(pid, None)
            self._write()
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)

    def live(self) -> list[ProcessRecord]:
        with self._lock:
            return list(self._live.values())

    def shutdown(self) -> list[ProcessRecord]:
        """Stop everything still recorded; return what had to be stopped."""
        leftovers = self.live()
        for record in leftovers:
            self.stop(record.pid)
        with self._lock:
            spawner, self._spawner = self._spawner, None
        if spawner is not None:
            spawner.shutdown(wait=True)
        with contextlib.suppress(FileNotFoundError):
            self.record_path.unlink()
        return leftovers

    def _write(self) -> None:
        payload = {
            "run_id": self.run_id,
            "owner": {"pid": os.getpid(), "create_time": process_create_time(os.getpid())},
            "processes": [asdict(r) for r in self._live.values()],
        }
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload))
        tmp.replace(self.record_path)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGTERM (and SIGHUP) into an exception in the main thread, so cleanup runs one path."""

    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def signals_deferred() -> Iterator[list[int]]:
    """For a run's last steps (stop children, save, render the report): SIGTERM, SIGHUP and SIGINT are
    noted, not acted on, so those steps finish whole; the caller raises for them afterwards."""
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def interruption(signum: int) -> BaseException:
    """What a signal becomes in the main thread: KeyboardInterrupt for SIGINT, Interrupted otherwise."""
    return KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signum)


def reap_leftovers() -> list[str]:
    """Kill processes recorded by runs whose owner is gone; return a line per thing removed."""
    removed: list[str] = []
    for path in sorted(pid_records_dir().glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            path.unlink(missing_ok=True)
            removed.append(f"unreadable pid record {path.name}")
            continue
        owner = payload.get("owner", {})
        if owner and process_create_time(owner.get("pid", -1)) == owner.get("create_time"):
            continue  # that run is still alive; it owns its processes
        for record in payload.get("processes", []):
            if process_create_time(record["pid"]) == record["create_time"] and kill_group(record["pid"]):
                removed.append(f"killed {record['name']} (pid {record['pid']}) from run {payload['run_id']}")
        path.unlink(missing_ok=True)
        removed.append(f"removed pid record of run {payload.get('run_id', path.stem)}")
    return removed + _reap_orphans_by_owner_mark()


def _reap_orphans_by_owner_mark() -> list[str]:
    """Kill processes whose OWNER_ENV names an owner that is gone (whether or not a record names them)."""
    removed: list[str] = []
    for process in psutil.process_iter():
        try:
            mark = process.environ().get(OWNER_ENV)
            if not mark or process.status() == psutil.STATUS_ZOMBIE:
                continue
            owner_pid, _, created = mark.partition(":")
            if process_create_time(int(owner_pid)) == float(created):
                continue  # its run is still alive
            name = " ".join(process.cmdline()[:2])
            process.kill()
            removed.append(f"killed {name} (pid {process.pid}) of a run that is gone (pid {owner_pid})")
        except (psutil.Error, ValueError):
            continue
    return removed
