"""Peer proxies the gateway is compared with: squid, tinyproxy and mitmproxy, each our OWN
instance on an ephemeral loopback port, with its config, pid file and logs in the run dir.

Nothing here touches a system instance (Debian's squid package starts one on install): every
peer gets an explicit config file, its own pid file and port, and runs in the foreground
under the Supervisor. A peer whose binary is missing is reported `skipped` with the command
that installs it, never silently dropped.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from harness.scratch import make_scratch_dir, remove_scratch_dir
from harness.supervisor import Supervisor, child_environment, run_tool

LOOPBACK = "127.0.0.1"
BLOCKED_HOST = "blocked.test"
"""The host every proxy in the bench denies (the `blocked` traffic)."""
READY_TIMEOUT_S = 20.0
READY_POLL_S = 0.05
SQUID_USER = "proxy"
"""Debian's squid drops root privileges to this user; its files in the run dir must be writable by it."""
MITMDUMP_FALLBACKS = ("/opt/mitmproxy-venv/bin/mitmdump",)
"""mitmproxy's pins (h11, cryptography) clash with ours, so it lives in its own venv."""
MITMDUMP_ENV = "BLASTRADIUS_MITMDUMP"

INSTALL = {
    "squid": "apt-get install -y squid",
    "tinyproxy": "apt-get install -y tinyproxy",
    "mitmproxy": "python3 -m venv /opt/mitmproxy-venv && /opt/mitmproxy-venv/bin/pip install 'mitmproxy==11.0.2'",
}
PEERS = tuple(INSTALL)


class PeerError(RuntimeError):
    pass


class PeerMissing(PeerError):
    def __init__(self, name: str) -> None:
        super().__init__(f"{name} is not installed; install it with: {INSTALL[name]}")
        self.name = name
        self.install = INSTALL[name]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerError(f"exited with {proc.returncode}: {_tail(log)}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(READY_POLL_S)
    raise PeerError(f"not listening on {LOOPBACK}:{port} after {timeout_s}s: {_tail(log)}")


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def binary(name: str) -> str | None:
    """The executable for a peer, or None when it is not installed."""
    if name == "squid":
        return shutil.which("squid") or next((p for p in ("/usr/sbin/squid",) if os.access(p, os.X_OK)), None)
    if name == "tinyproxy":
        return shutil.which("tinyproxy") or next(
            (p for p in ("/usr/bin/tinyproxy", "/usr/sbin/tinyproxy") if os.access(p, os.X_OK)), None
        )
    if name == "mitmproxy":
        override = os.environ.get(MITMDUMP_ENV)
        if override:
            return override if os.access(override, os.X_OK) else None
        return shutil.which("mitmdump") or next((p for p in MITMDUMP_FALLBACKS if os.access(p, os.X_OK)), None)
    raise ValueError(f"unknown peer {name!r}")


def version(name: str) -> str | None:
    exe = binary(name)
    if exe is None:
        return None
    flag = {"squid": "-v", "tinyproxy": "-v", "mitmproxy": "--version"}[name]
    try:
        out = run_tool([exe, flag], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


@dataclass
class Peer:
    """One running peer proxy."""

    name: str
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]
    supervisor: Supervisor
    ca_file: Path | None = None
    """The CA clients must trust when the peer intercepts TLS (mitmproxy), else None."""
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    on_stop: list[Callable[[], None]] = field(default_factory=list)
    """Run after the process is gone (e.g. copy logs back into the run dir)."""

    def stop(self) -> None:
        self.supervisor.stop(self.proc.pid)
        for hook in self.on_stop:
            hook()
        self.on_stop.clear()


def chown_for(user: str, path: Path) -> None:
    """Give `path` and everything under it to `user` (when we are root and the user exists)."""
    if os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return
    for item in [path, *path.rglob("*")]:
        os.chown(item, entry.pw_uid, entry.pw_gid)


def squid_base(files: Path, port: int) -> str:
    """The lines every squid of ours starts with: its port on loopback, its files in `files`, no cache and no
    side services (ICP, HTCP, SNMP, pinger)."""
    return f"""\
http_port {LOOPBACK}:{port}
pid_filename {files}/squid.pid
cache_log {files}/cache.log
access_log stdio:{files}/access.log
cache_store_log none
coredump_dir {files}
netdb_filename none
cache deny all
cache_mem 8 MB
pinger_enable off
icp_port 0
htcp_port 0
snmp_port 0
shutdown_lifetime 0 seconds
"""


def squid_config(workdir: Path, port: int) -> str:
    # A minimal forward proxy: loopback clients only, every port allowed (like the gateway's 127.0.0.1 rule),
    # the bench's blocked host denied. dstdomain -n: match the name only; without it squid reverse-resolves
    # IP destinations (every CONNECT 127.0.0.1:port here) and stalls on DNS, which is unreachable on purpose.
    return (
        squid_base(workdir, port)
        + f"""\
dns_nameservers {LOOPBACK}
hosts_file none
visible_hostname blastradius-bench
acl clients src 127.0.0.0/8
acl blocked dstdomain -n .{BLOCKED_HOST}
http_access deny blocked
http_access allow clients
http_access deny all
"""
    )


def start_squid(workdir: Path, supervisor: Supervisor) -> Peer:
    return launch_squid(workdir, supervisor, squid_config)


def launch_squid(
    workdir: Path,
    supervisor: Supervisor,
    config: Callable[[Path, int], str],
    prepare: Callable[[Path], None] | None = None,
    argv_prefix: list[str] | None = None,
) -> Peer:
    """Our own squid on a free loopback port from `config(live_dir, port)`; `prepare(live_dir)` writes any
    further file squid reads (a hosts file) before the live dir is given to the squid user."""
    exe = binary("squid")
    if exe is None:
        raise PeerMissing("squid")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # Run as root, squid drops to the `proxy` user before opening its logs, and a run dir below a
    # private directory (pytest's, a home) is not reachable for that user. So squid's live files go
    # to a fresh directory of its own under the system temp dir, copied into the run dir on stop.
    live = make_scratch_dir("br-squid-")
    os.chmod(live, 0o755)
    conf = workdir / "squid.conf"
    conf.write_text(config(live, port))
    if prepare is not None:
        prepare(live)
    chown_for(SQUID_USER, live)
    log = workdir / "squid.out"

    def collect() -> None:
        for name in ("cache.log", "access.log"):
            if (live / name).exists():
                shutil.copyfile(live / name, workdir / name)
        remove_scratch_dir(live)

    # -N: foreground, no kid processes (one process to supervise and to sample), -f: our config only.
    with open(log, "ab") as out:
        proc = supervisor.spawn(
            [*(argv_prefix or []), exe, "-N", "-f", str(conf)],
            f"squid:{port}",
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    peer = Peer("squid", port, workdir, proc, supervisor, on_stop=[collect])
    _await(peer, log)
    return peer


def tinyproxy_config(workdir: Path, port: int) -> str:
    # No ConnectPort line: CONNECT to every port (as squid and the gateway's rule here allow).
    return f"""\
Port {port}
Listen {LOOPBACK}
Timeout 60
MaxClients 1024
LogFile "{workdir}/tinyproxy.log"
LogLevel Warning
PidFile "{workdir}/tinyproxy.pid"
Allow 127.0.0.0/8
Filter "{workdir}/filter"
FilterDefaultDeny No
DisableViaHeader Yes
"""


def start_tinyproxy(workdir: Path, supervisor: Supervisor) -> Peer:
    exe = binary("tinyproxy")
    if exe is None:
        raise PeerMissing("tinyproxy")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (workdir / "filter").write_text(f"{BLOCKED_HOST}\n")
    conf = workdir / "tinyproxy.conf"
    conf.write_text(tinyproxy_config(workdir, port))
    # -d: foreground; -c: our config only.
    return launch_peer("tinyproxy", [exe, "-d", "-c", str(conf)], port, workdir, supervisor)


def start_mitmproxy(workdir: Path, supervisor: Supervisor, upstream_ca: Path | None) -> Peer:
    exe = binary("mitmproxy")
    if exe is None:
        raise PeerMissing("mitmproxy")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    confdir = workdir / "confdir"
    confdir.mkdir(exist_ok=True)
    argv = [
        exe,
        "--listen-host",
        LOOPBACK,
        "--listen-port",
        str(port),
        "--set",
        f"confdir={confdir}",
        "--set",
        f"block_list=:~d {BLOCKED_HOST}:403",
        "--set",
        "flow_detail=0",
        "--set",
        "termlog_verbosity=warn",
    ]
    if upstream_ca is not None:
        argv += ["--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}"]
    return launch_peer(
        "mitmproxy",
        argv,
        port,
        workdir,
        supervisor,
        log_name="mitmdump.out",
        ca_file=confdir / "mitmproxy-ca-cert.pem",
        notes=["mitmproxy intercepts TLS (its default): it decrypts and re-encrypts every model request."],
    )


def launch_peer(
    name: str,
    argv: list[str],
    port: int,
    workdir: Path,
    supervisor: Supervisor,
    log_name: str = "",
    ca_file: Path | None = None,
    notes: list[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Peer:
    """Spawn a peer's argv under the supervisor (output to `log_name` in workdir) and wait until it listens on
    `port`; a peer that never listens is stopped and raises PeerError with its log's tail."""
    log = workdir / (log_name or f"{name}.out")
    with open(log, "ab") as out:
        proc = supervisor.spawn(
            argv,
            f"{name}:{port}",
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_environment(env),
        )
    peer = Peer(name, port, workdir, proc, supervisor, ca_file=ca_file, notes=list(notes or []))
    _await(peer, log)
    return peer


def _await(peer: Peer, log: Path) -> None:
    try:
        wait_listening(peer.port, peer.proc, log)
    except BaseException:
        peer.stop()
        raise


def start_peer(name: str, workdir: Path, supervisor: Supervisor, upstream_ca: Path | None = None) -> Peer:
    if name == "squid":
        return start_squid(workdir, supervisor)
    if name == "tinyproxy":
        return start_tinyproxy(workdir, supervisor)
    if name == "mitmproxy":
        return start_mitmproxy(workdir, supervisor, upstream_ca)
    raise ValueError(f"unknown peer {name!r}; choose one of {', '.join(PEERS)}")
