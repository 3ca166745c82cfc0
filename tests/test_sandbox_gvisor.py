"""The `gvisor` backend against the backend contract: real runsc containers (ptrace platform), a real
gateway, a throwaway loopback HTTP server standing in for a gateway listener, and `invoke clean`'s sweep
after a SIGKILLed owner. Nothing of runsc is mocked."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from harness.bench import GUEST_SAMPLE_HOST, GUEST_SAMPLE_URL
from harness.errors import EnvironmentMissing
from harness.fleet import open_fleet
from harness.gateway.process import GatewayConfig
from harness.load.guest import sample_in_guest
from harness.metrics.memory import process_memory
from harness.paths import cache_dir
from harness.sandbox import BackendOptions, SandboxSpec, backend_features, create_backend, describe_backend
from harness.sandbox.base import BootFailed
from harness.sandbox.gvisor import FEATURES, PHASES, GvisorBackend, GvisorSandbox, sweep_leftovers
from harness.sandbox.jail import CHANNEL_MOUNT
from harness.scratch import remove_scratch_dir
from harness.standins.upstream import UpstreamServer
from harness.supervisor import Supervisor, pid_alive
from tests.conftest import REPO, invoke_cmd

pytestmark = pytest.mark.gvisor

needs_runsc = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed (apt-get install runsc)")


class Recorder(BaseHTTPRequestHandler):
    """Answers every GET with a marker and remembers the request line: a stand-in gateway listener."""

    seen: list[str]

    def do_GET(self) -> None:
        self.seen.append(self.requestline)
        body = b"gateway-stand-in says hello\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def listener() -> Iterator[tuple[int, list[str]]]:
    """A loopback HTTP server on the host: where the sandbox's egress relay must lead, and what its own
    loopback must not reach."""
    seen: list[str] = []
    handler = type("Handler", (Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def backend() -> GvisorBackend:
    if shutil.which("runsc") is None:
        pytest.skip("runsc is not installed (apt-get install runsc)")
    made = create_backend("gvisor", BackendOptions(cache=cache_dir()))
    assert isinstance(made, GvisorBackend)
    return made


@pytest.fixture(scope="module")
def sandbox(
    backend: GvisorBackend, listener: tuple[int, list[str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GvisorSandbox]:
    """One container shared by the read-only tests, its egress relayed to the stand-in listener."""
    with Supervisor(f"test-gvisor-{os.getpid()}-{secrets.token_hex(2)}") as supervisor:
        booted = backend.boot(
            SandboxSpec(id="gv0", workdir=tmp_path_factory.mktemp("gv0"), gateway_port=listener[0]), supervisor
        )
        yield booted
        booted.stop()


def runsc_list(root: Path) -> list[str]:
    """Container ids runsc has records of under --root."""
    out = subprocess.run(
        ["runsc", "--root", str(root), "list", "--quiet"], capture_output=True, text=True, timeout=30
    ).stdout
    return out.split()


def processes_naming(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line mentions text."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] != psutil.STATUS_ZOMBIE and text in " ".join(process.info["cmdline"] or []):
            found.append(process.pid)
    return found


def test_backend_declares_what_it_can_do(backend: GvisorBackend) -> None:
    assert backend_features("gvisor") == backend.features == FEATURES
    assert FEATURES.own_kernel and not FEATURES.snapshot and not FEATURES.weaken and backend.accel == "none"
    described = describe_backend(backend)
    assert described["platform"] == "ptrace" and "systrap" in str(described["platform_reason"])
    assert str(described["version"]).startswith("runsc version ") and "attached" in str(described["runsc_run"])
    assert list(described["phases"]) == list(PHASES) == ["relay", "bundle", "sandbox", "agent"]  # type: ignore[arg-type]


def test_boot_records_phases_that_add_up(sandbox: GvisorSandbox) -> None:
    boot = sandbox.boot
    assert boot.boot_ms is not None and list(boot.phases_ms) == list(PHASES)
    assert abs(sum(boot.phases_ms.values()) - boot.boot_ms) < 0.1
    assert all(value >= 0 for value in boot.phases_ms.values())


def test_exec_keeps_the_contract(sandbox: GvisorSandbox) -> None:
    result = sandbox.exec("cat; echo to-stderr >&2; exit 3", stdin=b"from stdin\n")
    assert (result.rc, result.stdout, result.stderr, result.timed_out) == (3, b"from stdin\n", b"to-stderr\n", False)
    slow = sandbox.exec("sleep 30; echo late", timeout=1)
    assert slow.timed_out and slow.rc == 137 and b"late" not in slow.stdout and slow.duration_s < 10
    assert sandbox.exec("pwd; hostname").text.split() == ["/work", "gv0"]


def test_the_kernel_is_gvisors_not_the_hosts(sandbox: GvisorSandbox) -> None:
    assert sandbox.exec("uname -r").text.strip() == "4.4.0" != os.uname().release
    assert sandbox.exec("test -e /proc/sys/kernel/random/boot_id").rc != 0
    assert "Starting gVisor" in sandbox.exec("dmesg").text


def test_egress_goes_through_the_channel_to_the_listener_only(
    sandbox: GvisorSandbox, listener: tuple[int, list[str]]
) -> None:
    port, seen = listener
    url = f"http://egress-probe.test/{secrets.token_hex(4)}"
    proxied = sandbox.exec(f"http_proxy=http://{sandbox.network.egress} timeout 10 wget -Y on -q -O - {url}")
    assert proxied.rc == 0 and proxied.text == "gateway-stand-in says hello\n", proxied
    assert f"GET {url} HTTP/1.1" in seen  # absolute-form: it arrived as a proxy request
    # The same listener straight over the loopback: inside, 127.0.0.1 is the sentry's own.
    direct = sandbox.exec(f"timeout 5 wget -Y off -q -O - http://127.0.0.1:{port}/direct; echo rc=$?")
    assert "rc=0" not in direct.text and not [line for line in seen if "/direct" in line]
    assert sandbox.exec(f"timeout 5 nc 127.0.0.1 {port} </dev/null; echo rc=$?").text.strip() != "rc=0"
    assert sandbox.exec(f"ls {CHANNEL_MOUNT}").text.split() == ["agent.sock", "proxy.sock"]


def test_workspace_is_writable_and_nothing_else_of_the_host(sandbox: GvisorSandbox) -> None:
    token = secrets.token_hex(6)
    assert sandbox.exec(f"echo {token} > /work/note && cat /work/note").text.strip() == token
    assert (sandbox.workspace / "note").read_text().strip() == token
    for path in ("/bin/new", "/etc/new", "/sbin/br-agent"):
        assert sandbox.exec(f"echo x > {path}").rc != 0, path  # the shared rootfs is read-only
    assert not (sandbox.rootfs / "bin" / "new").exists()
    assert sandbox.exec("echo x > /tmp/t && echo x > /etc/ssl/certs/t && echo ok").text.strip() == "ok"
    for host_path in (REPO, sandbox.rootfs, sandbox.workdir):
        assert sandbox.exec(f"test -e {host_path}").rc != 0, host_path
    assert sandbox.exec("ls -A /root").text == ""  # the host's /root is not the sandbox's
    env = sandbox.exec("env").text
    assert "BLASTRADIUS" not in env and "PYTHONPATH" not in env and "HOSTNAME=gv0" in env


def test_pids_are_every_host_process_of_the_sandbox(sandbox: GvisorSandbox) -> None:
    pids = sandbox.pids()
    names = {pid: psutil.Process(pid).cmdline() for pid in pids}
    heads = [cmdline[0] if cmdline else "" for cmdline in names.values()]
    assert any(h.endswith("runsc") for h in heads) and "runsc-gofer" in heads and "runsc-sandbox" in heads
    sentry = next(pid for pid, cmdline in names.items() if cmdline and cmdline[0] == "runsc-sandbox")
    stubs = [p.pid for p in psutil.Process(sentry).children(recursive=True)]
    assert stubs and set(stubs) <= set(pids)  # the ptrace stubs
    assert sandbox.bridge.pids() and set(sandbox.bridge.pids()) <= set(pids)  # the host egress relay
    # Nothing of the container is missed: every process naming it is counted.
    assert set(processes_naming(sandbox.container_id)) <= set(pids)
    pss = sum(process_memory(pid).get("pss", 0) for pid in pids)
    assert 10 * 2**20 < pss < 200 * 2**20, pss


def test_two_sandboxes_behind_a_real_gateway(backend: GvisorBackend, tmp_path: Path) -> None:
    upstream = UpstreamServer(names=(GUEST_SAMPLE_HOST,)).start()
    config = GatewayConfig(
        policy="balanced",
        audit_path=tmp_path / "audit.jsonl",
        state_dir=tmp_path / "gateway",
        upstream_overrides=upstream.overrides(),
        upstream_ca_file=upstream.ca_file,
    )
    request = (
        f"GET http://{GUEST_SAMPLE_HOST}/bytes/64 HTTP/1.1\r\nHost: {GUEST_SAMPLE_HOST}\r\nConnection: close\r\n\r\n"
    )
    try:
        with (
            Supervisor(f"test-gvisor-fleet-{os.getpid()}") as supervisor,
            open_fleet(backend, supervisor, tmp_path, SandboxSpec(id="", workdir=tmp_path), config) as fleet,
        ):
            for name in ("gva", "gvb"):
                box = fleet.boot(name)
                answer = box.exec(f"nc {box.network.egress.host} {box.network.egress.port}", stdin=request.encode())
                assert answer.text.startswith("HTTP/1.1 200"), answer
                assert "BEGIN CERTIFICATE" in box.exec(f"cat {box.ca_bundle}").text  # the fleet installed its CA
            # The bench's in-sandbox latency: gVisor refuses adjtimex, so the file-mtime clock takes over.
            timed = sample_in_guest(box, GUEST_SAMPLE_URL, n=3)
            assert (timed["ok"], timed["clock"], timed["failures"]) == (3, "file-mtime", {}), timed
            assert timed["latency_ms"]["p50"] > 0
    finally:
        upstream.stop()
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    requests = [(entry["sandbox"], entry["status"]) for entry in audit if entry.get("event") == "request"]
    assert requests == [("gva", 200), ("gvb", 200), *[("gvb", 200)] * 3]  # each known by its own listener


def test_stop_leaves_no_process_and_no_record(backend: GvisorBackend, tmp_path: Path) -> None:
    with Supervisor(f"test-gvisor-stop-{os.getpid()}") as supervisor:
        box = backend.boot(SandboxSpec(id="gv-stop", workdir=tmp_path), supervisor)
        box.exec("(setsid sleep 300 </dev/null >/dev/null 2>&1 &); echo started")
        pids = box.pids()
        assert box.container_id in runsc_list(box.root)
        box.stop()
        box.stop()  # idempotent
        assert [p for p in pids if pid_alive(p)] == [] and box.pids() == []
        assert processes_naming(box.container_id) == [] and box.container_id not in runsc_list(box.root)
        assert not box.channel.exists()


def test_a_failed_boot_says_why_in_one_line_and_leaves_nothing(backend: GvisorBackend, tmp_path: Path) -> None:
    empty_root = tmp_path / "no-init"
    empty_root.mkdir()
    broken = GvisorBackend(empty_root, backend.runsc)
    with Supervisor(f"test-gvisor-fail-{os.getpid()}") as supervisor, pytest.raises(BootFailed) as failed:
        broken.boot(SandboxSpec(id="gv-fail", workdir=tmp_path / "gv-fail", boot_timeout_s=20), supervisor)
    reason = str(failed.value)
    assert "\n" not in reason and "br-jail-init" in reason and "gvisor exited with status" in reason, reason
    assert processes_naming(f"br{os.getpid()}-gv-fail-") == []


@needs_runsc
def test_sweep_deletes_the_containers_of_a_killed_run(tmp_path: Path) -> None:
    script = (
        "import json, os, sys, time\n"
        "from pathlib import Path\n"
        "from harness.paths import cache_dir\n"
        "from harness.sandbox import BackendOptions, SandboxSpec, create_backend\n"
        "from harness.supervisor import Supervisor\n"
        "sup = Supervisor(f'test-gvisor-orphan-{os.getpid()}')\n"
        "box = create_backend('gvisor', BackendOptions(cache=cache_dir())).boot("
        "SandboxSpec(id='orphan', workdir=Path(sys.argv[1])), sup)\n"
        "print(json.dumps({'root': str(box.root), 'id': box.container_id, 'pids': box.pids(),"
        " 'relay': box.bridge.pids(), 'channel': str(box.channel), 'record': str(sup.record_path)}), flush=True)\n"
        "time.sleep(300)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "orphan")], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None
        booted = json.loads(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    root, cid = Path(booted["root"]), booted["id"]
    try:
        container = [p for p in booted["pids"] if p not in booted["relay"]]
        assert all(pid_alive(p) for p in container)  # the owner is gone; its container is not
        removed = sweep_leftovers()
        assert any(cid in line for line in removed) and any(str(root) in line for line in removed), removed
        time.sleep(0.2)
        assert [p for p in container if pid_alive(p)] == [] and processes_naming(cid) == []
        assert not root.exists()
        assert runsc_list(root) == []
    finally:
        for pid in booted["relay"]:  # the relay is a supervised process: reap_leftovers' part of `invoke clean`
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        Path(booted["record"]).unlink(missing_ok=True)
        remove_scratch_dir(Path(booted["channel"]))
        shutil.rmtree(root, ignore_errors=True)  # `runsc list` made it again


def test_missing_runsc_is_one_line_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "runsc" else real_which(name, *a, **k))
    with pytest.raises(EnvironmentMissing, match=r"^runsc not found; run `apt-get install runsc`$"):
        create_backend("gvisor", BackendOptions(cache=cache_dir()))


def test_the_cli_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # the venv only: no runsc
    result = subprocess.run(
        invoke_cmd("bench", "--backend", "gvisor", "--out", str(tmp_path / "x")),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "error:" in line]
    assert errors == ["error: runsc not found; run `apt-get install runsc`"], result.stdout + result.stderr
