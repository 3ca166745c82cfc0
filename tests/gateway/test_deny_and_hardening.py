"""Deny modes, the retry-loop breaker, DNS, hardening limits and process lifecycle."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness.gateway.audit import summarise
from harness.gateway.config import Limits
from harness.gateway.dns import QTYPE_A, RCODE_OK, RCODE_REFUSED
from harness.gateway.process import GatewayConfig, GatewayError, GatewayProcess
from harness.load.measure import measure_overhead

from .conftest import connect, connect_tunnel, http_get, parse_reply, recv_all, send_raw, tls_request
from .test_units import dns_query

pytestmark = pytest.mark.timeout(60)


# ---- deny modes ------------------------------------------------------------------------------
def test_deny_mode_403_is_docker_compatible(make_gateway: object) -> None:
    gw = make_gateway(deny_mode="403")  # type: ignore[operator]
    port = gw.add_sandbox("sb")
    reply = http_get(port, "http://example.com/")
    assert reply.status == 403
    assert reply.body.startswith(b"Blocked by network policy: domain example.com:80")
    assert b"default-deny" in reply.body
    assert "x-blastradius-decision" not in reply.headers
    sock, answer = connect_tunnel(port, "example.com:443")
    sock.close()
    assert b"domain example.com:443" in parse_reply(answer).body
    assert {r["deny_mode"] for r in gw.audit_records()} == {"403"}


def test_deny_mode_403_explained_is_machine_readable(gateway: GatewayProcess, port: int) -> None:
    reply = http_get(port, "http://example.com/x")
    assert reply.status == 403
    assert reply.headers["x-blastradius-decision"] == "deny; rule=default-deny; host=example.com; port=80"
    assert reply.headers["x-proxy-error"] == "blocked-by-allowlist"
    body = reply.json()
    assert body["error"] == "blocked_by_policy"
    assert body["retryable"] is False and body["host"] == "example.com" and body["port"] == 80


def test_deny_mode_reset_sends_rst(make_gateway: object) -> None:
    gw = make_gateway(deny_mode="reset")  # type: ignore[operator]
    port = gw.add_sandbox("sb")
    for request in (
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    ):
        with connect(port) as sock:
            sock.sendall(request)
            with pytest.raises(ConnectionResetError):
                sock.recv(65536)
    records = gw.audit_records()
    assert [r["deny_mode"] for r in records] == ["reset", "reset"]
    assert all(r["status"] is None for r in records)


def test_denied_request_keeps_connection_alive(gateway: GatewayProcess, port: int) -> None:
    with connect(port) as sock:
        sock.sendall(b"GET http://example.com/k1 HTTP/1.1\r\nHost: example.com\r\n\r\n")
        first = b""
        while b"\n}" not in first and not first.endswith(b"}\n"):
            first += sock.recv(65536)
        sock.sendall(b"GET http://pypi.org/k2 HTTP/1.1\r\nHost: pypi.org\r\nConnection: close\r\n\r\n")
        second = recv_all(sock)
    assert parse_reply(first).status == 403
    assert parse_reply(second).status == 200


# ---- loop breaker ----------------------------------------------------------------------------
def test_retry_loop_breaker(make_gateway: object) -> None:
    gw = make_gateway(loop_threshold=3, loop_window_s=30.0)  # type: ignore[operator]
    port = gw.add_sandbox("sb-loop")
    other = gw.add_sandbox("sb-other")
    statuses = [http_get(port, "http://example.com/retry").status for _ in range(6)]
    assert statuses == [403, 403, 403, 429, 429, 429]
    last = http_get(port, "http://example.com/retry")
    assert last.json()["error"] == "retry_loop_detected"
    assert "permanent" in str(last.json()["message"])
    # Keyed per sandbox and per request: others are unaffected.
    assert http_get(port, "http://example.com/different").status == 403
    assert http_get(other, "http://example.com/retry").status == 403
    # CONNECT loops trip too.
    for _ in range(3):
        sock, _ = connect_tunnel(port, "example.com:443")
        sock.close()
    sock, answer = connect_tunnel(port, "example.com:443")
    sock.close()
    assert parse_reply(answer).status == 429
    events = [r for r in gw.audit_records() if r["event"] == "retry_loop_detected"]
    assert [(e["sandbox"], e["host"], e["method"]) for e in events] == [
        ("sb-loop", "example.com", "GET"),
        ("sb-loop", "example.com", "CONNECT"),
    ]
    assert gw.stats()["loop_trips"] == 2


def test_loop_breaker_can_be_disabled(make_gateway: object) -> None:
    gw = make_gateway(loop_breaker=False, loop_threshold=1)  # type: ignore[operator]
    port = gw.add_sandbox("sb")
    assert {http_get(port, "http://example.com/").status for _ in range(4)} == {403}


TERMINAL_POLICY = """
name: terminal
deny_mode: 403-explained
loop_breaker: {threshold: 2, window_s: 30, answer: 200-terminal}
rules:
  - allow: pypi.org
    ports: [80]
"""


def test_loop_breaker_200_terminal_from_policy(make_gateway: object, tmp_path: Path) -> None:
    """answer: 200-terminal in the policy YAML: the looping request gets 200 with the same
    permanent-block explanation; audited as a deny, with status 200."""
    policy = tmp_path / "terminal.yaml"
    policy.write_text(TERMINAL_POLICY)
    gw = make_gateway(policy=policy, deny_mode=None)  # type: ignore[operator]
    port = gw.add_sandbox("sb-term")
    statuses = [http_get(port, "http://example.com/term").status for _ in range(4)]
    assert statuses == [403, 403, 200, 200]
    reply = http_get(port, "http://example.com/term")
    assert reply.status == 200
    assert reply.headers["x-proxy-error"] == "retry-loop-detected"
    assert reply.headers["x-blastradius-decision"] == (
        "deny; rule=default-deny; host=example.com; port=80; loop=1; permanent"
    )
    body = reply.json()
    assert (body["error"], body["permanent"], body["retryable"]) == ("retry_loop_detected", True, False)
    assert "stop retrying" in str(body["message"])
    # Keep-alive survives the 200: an allowed request on the same connection still goes through.
    with connect(port) as sock:
        reader = sock.makefile("rb")
        for url, host, want in (
            ("http://example.com/term", "example.com", 200),
            ("http://pypi.org/after", "pypi.org", 200),
        ):
            sock.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            status = int(reader.readline().split()[1])
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            assert status == want
    # A CONNECT loop still gets 429: a 200 would mean "tunnel open".
    for _ in range(2):
        sock, _ = connect_tunnel(port, "example.com:443")
        sock.close()
    sock, answer = connect_tunnel(port, "example.com:443")
    sock.close()
    assert parse_reply(answer).status == 429
    records = [r for r in gw.audit_records() if r["sandbox"] == "sb-term" and r["host"] == "example.com"]
    trip = [r for r in records if r["event"] == "retry_loop_detected"]
    assert [(r["method"], r["status"], r["decision"]) for r in trip] == [("GET", 200, "deny"), ("CONNECT", 429, "deny")]
    term = [r for r in records if r["event"] == "request" and r["path"] == "/term"]
    assert [r["status"] for r in term] == [403, 403, 200, 200, 200, 200]
    assert {(r["decision"], r["deny_mode"], r["rule"]) for r in term} == {("deny", "403-explained", "default-deny")}
    assert gw.stats()["loop_trips"] == 2


# ---- DNS -------------------------------------------------------------------------------------
def _udp_dns(port: int, name: str) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(dns_query(name), ("127.0.0.1", port))
        return sock.recv(4096)


def _tcp_dns(port: int, name: str) -> bytes:
    query = dns_query(name)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(struct.pack("!H", len(query)) + query)
        size = struct.unpack("!H", sock.recv(2))[0]
        data = b""
        while len(data) < size:
            data += sock.recv(size - len(data))
        return data


def test_policy_gated_dns(make_gateway: object) -> None:
    gw = make_gateway(dns=True)  # type: ignore[operator]
    gw.add_sandbox("sb-dns")
    port = gw.dns_port("sb-dns")
    assert port is not None
    for ask in (_udp_dns, _tcp_dns):
        allowed = ask(port, "api.anthropic.com")
        assert struct.unpack("!H", allowed[2:4])[0] & 0xF == RCODE_OK
        assert struct.unpack("!H", allowed[6:8])[0] == 1  # one answer
        assert allowed.endswith(bytes([127, 0, 0, 1]))  # the host-side override address
        blocked = ask(port, "example.com")
        assert struct.unpack("!H", blocked[2:4])[0] & 0xF == RCODE_REFUSED
        assert struct.unpack("!H", blocked[6:8])[0] == 0
    dns_events = [r for r in gw.audit_records() if r["event"] == "dns"]
    assert {(r["host"], r["decision"]) for r in dns_events} == {
        ("api.anthropic.com", "allow"),
        ("example.com", "deny"),
    }
    assert QTYPE_A == 1


def test_no_dns_by_default(gateway: GatewayProcess) -> None:
    gateway.add_sandbox("sb-nodns")
    assert gateway.dns_port("sb-nodns") is None


# ---- hardening -------------------------------------------------------------------------------
SMALL_LIMITS = Limits(
    max_header_bytes=4096,
    max_request_line=1024,
    max_header_count=20,
    header_timeout_s=1.0,
    idle_timeout_s=2.0,
    max_connections_per_sandbox=5,
)


@pytest.fixture(scope="module")
def hardened(make_gateway: object) -> tuple[GatewayProcess, int]:
    gw = make_gateway(limits=SMALL_LIMITS)  # type: ignore[operator]
    return gw, gw.add_sandbox("sb-hard")


def _status(data: bytes) -> int:
    return parse_reply(data).status


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400),
        (b"GET http://pypi.org/ HTTP/1.1\r\nHost pypi.org\r\n\r\n", 400),
        (b"GET http://pypi.org/ HTTP/9.9\r\nHost: pypi.org\r\n\r\n", 505),
        (b"GET http://pypi.org/" + b"a" * 2000 + b" HTTP/1.1\r\nHost: pypi.org\r\n\r\n", 414),
        (b"GET http://pypi.org/ HTTP/1.1\r\nHost: pypi.org\r\n" + b"X-A: b\r\n" * 30 + b"\r\n", 431),
        (b"GET http://pypi.org/ HTTP/1.1\r\nHost: pypi.org\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n", 431),
        (b"GET http://pypi.org/ HTTP/1.1\r\nHost: pypi.org\r\nContent-Length: -1\r\n\r\n", 400),
        (
            b"GET http://pypi.org/ HTTP/1.1\r\nHost: pypi.org\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
        ),
        (b"CONNECT example.com:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 400),
    ],
)
def test_malformed_input_gets_400_family_and_close(
    hardened: tuple[GatewayProcess, int], payload: bytes, status: int
) -> None:
    _gw, port = hardened
    data = send_raw(port, payload)  # send_raw reads to EOF: the gateway closed the connection
    assert _status(data) == status


def test_slowloris_head_times_out(hardened: tuple[GatewayProcess, int]) -> None:
    _gw, port = hardened
    with connect(port) as sock:
        t0 = time.monotonic()
        sock.sendall(b"GET http://pypi.org/ HTTP/1.1\r\n")
        for _ in range(10):
            time.sleep(0.3)
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
        data = recv_all(sock)
        elapsed = time.monotonic() - t0
    assert _status(data) == 408
    assert elapsed < SMALL_LIMITS.header_timeout_s + 2.5


def test_idle_connection_is_closed(hardened: tuple[GatewayProcess, int]) -> None:
    _gw, port = hardened
    with connect(port) as sock:
        t0 = time.monotonic()
        assert recv_all(sock) == b""
        assert time.monotonic() - t0 < SMALL_LIMITS.idle_timeout_s + 2.0


def test_connection_limit_per_sandbox(hardened: tuple[GatewayProcess, int]) -> None:
    gw, port = hardened
    holders = [connect(port) for _ in range(SMALL_LIMITS.max_connections_per_sandbox)]
    try:
        time.sleep(0.2)
        assert _status(send_raw(port, b"")) == 503
    finally:
        for sock in holders:
            sock.close()
    deadline = time.monotonic() + 5
    while gw.stats()["sandboxes"]["sb-hard"]["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http_get(port, "http://pypi.org/").status == 200


def test_random_garbage_never_kills_the_gateway(hardened: tuple[GatewayProcess, int]) -> None:
    gw, port = hardened
    rng = random.Random(1234)
    for _ in range(40):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 600)))
        if rng.random() < 0.5:
            blob = b"GET http://pypi.org/ HTTP/1.1\r\n" + blob + b"\r\n\r\n"
        with contextlib.suppress(OSError):
            send_raw(port, blob, half_close=True)
    assert gw.running
    assert gw.health()["ok"]
    assert http_get(port, "http://pypi.org/alive").status == 200
    assert gw.stats().get("errors", 0) == 0  # no unexpected exception in any session


# ---- process lifecycle -----------------------------------------------------------------------
def test_stop_is_idempotent_and_leaves_no_process(make_gateway: object) -> None:
    gw = make_gateway()  # type: ignore[operator]
    pid = gw.pid
    assert psutil.pid_exists(pid)
    assert os.getpgid(pid) == pid  # its own process group
    gw.stop()
    gw.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(GatewayError):
        gw.add_sandbox("late")


def test_context_manager_and_own_state_dir(ca_dir: Path, test_policy_file: Path) -> None:
    with GatewayProcess(GatewayConfig(policy=test_policy_file, ca_dir=ca_dir)) as gw:
        state = gw.config.state_dir
        assert state is not None and state.exists()
        port = gw.add_sandbox("cm")
        assert http_get(port, "http://example.com/").status == 403
        pem = gw.ca_cert_pem()
        assert pem.startswith(b"-----BEGIN CERTIFICATE-----") and b"PRIVATE" not in pem
        pid = gw.pid
    assert not psutil.pid_exists(pid)
    assert not state.exists()


def test_bad_policy_fails_fast_with_the_reason(tmp_path: Path, ca_dir: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - allow: 'a.*.com'\n")
    gw = GatewayProcess(GatewayConfig(policy=bad, ca_dir=ca_dir, state_dir=tmp_path / "s"))
    with pytest.raises(GatewayError, match="wildcards"):
        gw.start()
    gw.stop()


def test_control_reports_stats(gateway: GatewayProcess, port: int) -> None:
    http_get(port, "http://example.com/stats")  # a denied request of its own: no reliance on earlier tests
    stats = gateway.stats()
    assert stats["connections"] > 0 and stats["denied"] > 0
    assert json.dumps(stats)
    assert gateway.health()["sandboxes"]


def test_audit_summary_per_sandbox(gateway: GatewayProcess, port: int) -> None:
    http_get(port, "http://example.com/summary")
    call = b"GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n"
    assert tls_request(port, "api.anthropic.com:443", gateway.ca_cert_pem(), call).status == 200
    table = summarise(gateway.audit_path)
    assert table["sb-main"]["deny"] >= 1
    assert table["sb-main"]["allow"] >= 1
    assert table["sb-main"]["credential_injections"] >= 1


def test_measure_overhead_smoke(tmp_path: Path, ca_dir: Path) -> None:
    result = measure_overhead(requests=30, tunnel_mb=8, ca_dir=ca_dir)
    for key in ("http_absolute_form", "connect_tunnel", "intercepted_tls_with_credential"):
        assert result[key]["gateway"]["n"] == 30
        assert result[key]["added_p50_ms"] < 20.0  # loose: CI machines are noisy; bench reports real numbers
    assert result["tunnel_throughput"]["gateway_MBps"] > 10.0
    assert result["gateway_errors"] == 0


def test_gateway_exits_when_its_parent_is_killed(tmp_path: Path, ca_dir: Path, test_policy_file: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from harness.gateway.process import GatewayConfig, GatewayProcess\n"
        f"gw = GatewayProcess(GatewayConfig(policy=Path({str(test_policy_file)!r}),"
        f" ca_dir=Path({str(ca_dir)!r}), state_dir=Path({str(tmp_path / 'state')!r}))).start()\n"
        "print(gw.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, cwd=str(Path(__file__).resolve().parents[2])
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert psutil.pid_exists(child)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and time.monotonic() < deadline:
        try:
            if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    alive = psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE
    if alive:
        os.killpg(child, 9)
    assert not alive


def test_slow_upstream_gets_504(make_gateway: object) -> None:
    gw = make_gateway(limits=Limits(upstream_response_timeout_s=0.5))  # type: ignore[operator]
    port = gw.add_sandbox("sb-slow")
    t0 = time.monotonic()
    assert http_get(port, "http://pypi.org/sleep/3").status == 504
    assert time.monotonic() - t0 < 2.5
    [record] = [r for r in gw.audit_records() if r["event"] == "request"]
    assert record["decision"] == "error" and record["status"] == 504


def test_a_gateway_whose_parent_died_before_it_looked_exits(
    tmp_path: Path, ca_dir: Path, test_policy_file: Path
) -> None:
    """A SIGKILL of the harness during the gateway's start: by the time it looks, its parent is init (or a
    subreaper), which it must not take for the harness that started it."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    state = tmp_path / "state"
    state.mkdir()
    config = GatewayConfig(policy=test_policy_file, ca_dir=ca_dir, state_dir=state, parent_pid=gone.pid)
    (state / "config.json").write_text(config.to_json())
    orphan = subprocess.Popen(
        [sys.executable, "-m", "harness.gateway", "--config", str(state / "config.json")],
        cwd=str(Path(__file__).resolve().parents[2]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert orphan.wait(timeout=20) == 0
    finally:
        orphan.kill()
