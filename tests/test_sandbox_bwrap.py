"""The bwrap backend: a real bubblewrap jail on the shared busybox rootfs, reached only through its
channel directory; what it isolates, what it does not (the host's kernel), and that stop leaves nothing."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from harness.errors import EnvironmentMissing
from harness.paths import cache_dir
from harness.sandbox import BackendOptions, create_backend
from harness.sandbox.base import SandboxSpec
from harness.sandbox.bwrap import BwrapBackend, BwrapSandbox
from harness.supervisor import Supervisor, pid_alive
from tests.conftest import HOST_SECRET, HOST_SECRET_ENV


@pytest.fixture(scope="module")
def backend() -> BwrapBackend:
    made = create_backend("bwrap", BackendOptions(cache=cache_dir()))
    assert isinstance(made, BwrapBackend)
    return made


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"upstream saw {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def listener() -> Iterator[int]:
    """A loopback HTTP server standing in for the sandbox's gateway listener."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def sandbox(
    backend: BwrapBackend, supervisor: Supervisor, tmp_path: Path, listener: int, monkeypatch: pytest.MonkeyPatch
) -> Iterator[BwrapSandbox]:
    monkeypatch.setenv(HOST_SECRET_ENV, HOST_SECRET)
    booted = backend.boot(SandboxSpec(id="bw0", workdir=tmp_path / "bw0", gateway_port=listener), supervisor)
    yield booted
    booted.stop()


def test_exec_keeps_the_agent_contract(sandbox: BwrapSandbox) -> None:
    result = sandbox.exec("cat; echo out; echo err >&2; exit 3", stdin=b"in\n", timeout=10)
    assert (result.rc, result.stdout, result.stderr) == (3, b"in\nout\n", b"err\n")
    slow = sandbox.exec("sleep 30", timeout=1)
    assert slow.timed_out and slow.duration_s < 10
    assert sandbox.boot.boot_ms is not None and set(sandbox.boot.phases_ms) == {"relay", "jail"}


def test_the_jail_sees_its_own_root_workspace_and_nothing_of_the_hosts(sandbox: BwrapSandbox) -> None:
    text = sandbox.exec(
        "hostname; id -u; touch /etc/x 2>/dev/null && echo etc-writable; echo w > /work/f && cat /work/f; "
        "ls /home 2>&1; env; ls /proc | grep -c '^[0-9]'",
        timeout=10,
    ).text
    lines = text.splitlines()
    assert lines[0] == "bw0"
    assert "etc-writable" not in text and "w" in lines
    assert HOST_SECRET not in text and "BLASTRADIUS_OWNER" not in text
    assert (sandbox.workspace / "f").read_text() == "w\n"
    assert int(lines[-1]) < 20  # a pid namespace of its own: a handful of processes, not the host's


def test_egress_goes_only_through_the_channel(sandbox: BwrapSandbox, listener: int) -> None:
    proxied = sandbox.exec("timeout 5 wget -q -O - http://deb.debian.org/x", timeout=10)
    assert proxied.rc == 0 and proxied.text == "upstream saw http://deb.debian.org/x", proxied.stderr
    direct = sandbox.exec(f"nc -w 2 127.0.0.1 {listener} </dev/null; echo rc=$?", timeout=10)
    assert "rc=1" in direct.text  # the listener on host loopback is not the jail's loopback
    nets = sandbox.exec("ls /sys/class/net 2>/dev/null || cat /proc/net/dev", timeout=10).text
    assert "eth0" not in nets


def test_the_kernel_is_the_hosts(sandbox: BwrapSandbox) -> None:
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert sandbox.exec("cat /proc/sys/kernel/random/boot_id", timeout=10).text.strip() == boot_id


def test_stop_leaves_no_process(backend: BwrapBackend, supervisor: Supervisor, tmp_path: Path) -> None:
    booted = backend.boot(SandboxSpec(id="bw1", workdir=tmp_path / "bw1"), supervisor)
    booted.exec("sleep 300 >/dev/null 2>&1 &", timeout=5)
    pids = booted.pids()
    assert len(pids) >= 3
    tree = []
    for pid in pids:  # a process of the exec that launched the sleeper may end while we look: skip it
        with contextlib.suppress(psutil.NoSuchProcess):
            tree += [p.pid for p in psutil.Process(pid).children(recursive=True)]
    booted.stop()
    assert not [pid for pid in {*pids, *tree} if pid_alive(pid)]
    assert not booted.channel.exists()


def test_a_missing_bwrap_is_one_line_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(EnvironmentMissing, match=r"apt-get install bubblewrap"):
        create_backend("bwrap", BackendOptions(cache=cache_dir()))
