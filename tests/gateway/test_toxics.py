"""Toxics measured on real connections through a real gateway process, and the loop breaker's
threshold switched at run time. Each toxic is switched on through the control API, its effect
timed or counted on a raw socket, and switched off again."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from harness.gateway.process import GatewayProcess
from harness.gateway.toxics import Link, Toxic, ToxicError, ToxicRegistry

from .conftest import connect, connect_tunnel, http_get, parse_reply

pytestmark = pytest.mark.timeout(60)

FORWARD_HOST = "pypi.org"  # plain http, forwarded by the gateway (h11 on both sides)
TUNNEL = "pypi.org:80"  # a blind CONNECT tunnel (no credential, no method/path rule)
LATENCY_MS = 300
# Loopback round trips through the gateway take a few ms; the toxic's delay must dominate.
BASELINE_MAX_S = 0.25


@pytest.fixture(scope="module")
def gw(make_gateway: object) -> GatewayProcess:
    return make_gateway()  # type: ignore[operator, no-any-return]


@pytest.fixture(scope="module")
def port(gw: GatewayProcess) -> int:
    return gw.add_sandbox("sb-tox")


@pytest.fixture(autouse=True)
def no_toxics_after(gw: GatewayProcess) -> Iterator[None]:
    yield
    gw.clear_toxics()


def timed_get(port: int, path: str = "/x", host: str = FORWARD_HOST) -> tuple[float, int, bytes]:
    started = time.monotonic()
    reply = http_get(port, f"http://{host}{path}")
    return time.monotonic() - started, reply.status, reply.body


def tunnel_get(port: int, path: str, authority: str = TUNNEL) -> tuple[socket.socket, list[bytes]]:
    """CONNECT, then a plain GET inside the tunnel; returns the socket and nothing read yet."""
    sock, answer = connect_tunnel(port, authority, authority)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    host = authority.split(":")[0]
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    return sock, []


def read_chunks(sock: socket.socket) -> list[bytes]:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return chunks
        chunks.append(chunk)


# ---- byte-level toxics -------------------------------------------------------------------------
def test_latency_adds_at_least_its_delay_forwarded_and_tunnelled(gw: GatewayProcess, port: int) -> None:
    base, status, _ = timed_get(port)
    assert status == 200 and base < BASELINE_MAX_S
    gw.add_toxic({"name": "lat", "type": "latency", "attributes": {"latency": LATENCY_MS}})
    slow, status, _ = timed_get(port)
    assert status == 200 and slow >= LATENCY_MS / 1000
    started = time.monotonic()
    sock, _ = tunnel_get(port, "/y")
    with sock:
        data = b"".join(read_chunks(sock))
    assert data.startswith(b"HTTP/1.1 200") and time.monotonic() - started >= LATENCY_MS / 1000
    assert gw.remove_toxic("lat")
    fast, _, _ = timed_get(port)
    assert fast < BASELINE_MAX_S  # removed at run time: the very next request is fast again


def test_latency_on_the_upstream_stream(gw: GatewayProcess, port: int) -> None:
    gw.add_toxic({"type": "latency", "stream": "upstream", "attributes": {"latency": LATENCY_MS}})
    elapsed, status, _ = timed_get(port)
    assert status == 200 and elapsed >= LATENCY_MS / 1000


def test_bandwidth_paces_the_download(gw: GatewayProcess, port: int) -> None:
    rate_kb, size = 100, 40 * 1024
    gw.add_toxic({"type": "bandwidth", "attributes": {"rate": rate_kb}})
    elapsed, status, body = timed_get(port, f"/bytes/{size}")
    assert status == 200 and len(body) == size
    # 40 KiB at 100 KiB/s is 0.4 s; allow for the first slice leaving at once.
    assert elapsed >= 0.9 * size / (rate_kb * 1024) - 0.1


def test_limit_data_cuts_at_the_byte_count(gw: GatewayProcess, port: int) -> None:
    limit = 1000
    gw.add_toxic({"type": "limit_data", "attributes": {"bytes": limit}})
    sock, _ = tunnel_get(port, "/bytes/100000")
    with sock:
        data = b"".join(read_chunks(sock))
    assert len(data) == limit


def test_reset_peer_resets(gw: GatewayProcess, port: int) -> None:
    gw.add_toxic({"type": "reset_peer", "attributes": {"timeout": 0}})
    with connect(port) as sock:
        sock.sendall(f"GET http://{FORWARD_HOST}/x HTTP/1.1\r\nHost: {FORWARD_HOST}\r\n\r\n".encode())
        with pytest.raises(ConnectionResetError):
            read_chunks(sock)
    records = [r for r in gw.audit_records() if r.get("decision") == "error" and r.get("host") == FORWARD_HOST]
    assert records  # the broken exchange is in the audit log


def test_timeout_holds_then_closes(gw: GatewayProcess, port: int) -> None:
    hold_ms = 500
    gw.add_toxic({"type": "timeout", "attributes": {"timeout": hold_ms}})
    started = time.monotonic()
    sock, _ = tunnel_get(port, "/x")
    with sock:
        data = b"".join(read_chunks(sock))
    assert data == b"" and time.monotonic() - started >= hold_ms / 1000


def test_slow_close_delays_the_close(gw: GatewayProcess, port: int) -> None:
    delay_ms = 400
    gw.add_toxic({"type": "slow_close", "attributes": {"delay": delay_ms}})
    sock, _ = tunnel_get(port, "/x")
    with sock:
        # The whole response, however many reads it takes (head and body may come apart), then the close.
        first = sock.recv(65536)
        head, _, body = first.partition(b"\r\n\r\n")
        length = int(
            next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        )
        while len(body) < length:
            body += sock.recv(65536)
        got_data = time.monotonic()
        rest = read_chunks(sock)
    assert first.startswith(b"HTTP/1.1 200") and rest == []
    assert time.monotonic() - got_data >= 0.9 * delay_ms / 1000


def test_slicer_cuts_into_small_delayed_pieces(gw: GatewayProcess, port: int) -> None:
    size, average, delay_us = 8000, 1000, 20_000
    gw.add_toxic({"type": "slicer", "attributes": {"average_size": average, "size_variation": 0, "delay": delay_us}})
    started = time.monotonic()
    sock, _ = tunnel_get(port, f"/bytes/{size}")
    with sock:
        chunks = read_chunks(sock)
    total = sum(len(c) for c in chunks)
    assert total > size and max(len(c) for c in chunks) <= average
    assert time.monotonic() - started >= (total // average - 1) * delay_us / 1e6


# ---- scope, toxicity, HTTP-level toxics --------------------------------------------------------
def test_scope_and_toxicity(gw: GatewayProcess, port: int) -> None:
    other = gw.add_sandbox("sb-other")
    gw.add_toxic({"name": "other-sb", "type": "latency", "sandbox": "sb-other", "attributes": {"latency": 400}})
    gw.add_toxic({"name": "other-up", "type": "latency", "upstream": "github.com", "attributes": {"latency": 400}})
    gw.add_toxic({"name": "never", "type": "reset_peer", "toxicity": 0.0})
    assert timed_get(port)[0] < BASELINE_MAX_S  # neither this sandbox nor this upstream
    assert timed_get(other)[0] >= 0.4  # the scoped sandbox is hit
    applied = gw.toxics()["applied"]
    assert applied.get("other-sb", 0) >= 1 and "never" not in applied and "other-up" not in applied


def test_http_status_429_with_retry_after(gw: GatewayProcess, port: int) -> None:
    gw.add_toxic(
        {
            "name": "ratelimit",
            "type": "http_status",
            "upstream": FORWARD_HOST,
            "attributes": {"status": 429, "retry_after": 7},
        }
    )
    reply = http_get(port, f"http://{FORWARD_HOST}/v1/messages")
    assert reply.status == 429 and reply.headers["retry-after"] == "7"
    last = gw.audit_records()[-1]
    assert last["status"] == 429 and last["reason"] == "toxic:ratelimit" and last["decision"] == "error"
    sock, answer = connect_tunnel(port, TUNNEL, TUNNEL)  # a blind tunnel gets it on its CONNECT
    sock.close()
    assert parse_reply(answer).status == 429


def test_gateway_down_refuses_then_comes_back_on_the_same_port(gw: GatewayProcess, port: int) -> None:
    gw.add_toxic({"name": "down", "type": "down", "sandbox": "sb-tox"})
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    gw.remove_toxic("down")
    assert timed_get(port)[1] == 200


def test_sigusr1_clears_every_toxic(gw: GatewayProcess, port: int) -> None:
    gw.add_toxic({"type": "latency", "attributes": {"latency": 1000}})
    os.kill(gw.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while gw.toxics()["active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gw.toxics()["active"] == []


def test_bad_toxics_are_refused(gw: GatewayProcess) -> None:
    for bad in (
        {"type": "nope"},
        {"type": "latency", "stream": "sideways"},
        {"type": "latency", "toxicity": 2},
        {"type": "latency", "attributes": {"rate": 1}},
        {"type": "down", "upstream": "x"},
    ):
        with pytest.raises(RuntimeError):
            gw.add_toxic(bad)
    with pytest.raises(ToxicError):
        Toxic.from_dict({"type": "limit_data", "attributes": {"bytes": -1}})


def test_link_plan_units() -> None:
    """The pure part: limit_data counts from when it is switched on; slicer and bandwidth pace."""
    reg = ToxicRegistry()

    class End:
        def abort_with_reset(self) -> None: ...

        def close(self) -> None: ...

    up, down = reg.links("sb", "h", 80, [End()])
    assert down.plan(b"x" * 500).pieces == [(0.0, b"x" * 500)]
    reg.add(Toxic.from_dict({"type": "limit_data", "attributes": {"bytes": 700}}))
    plan = down.plan(b"x" * 500)
    assert plan.then is None and len(plan.pieces[0][1]) == 500
    plan = down.plan(b"x" * 500)
    assert plan.then == "close" and len(plan.pieces[0][1]) == 200
    assert isinstance(up, Link) and up.plan(b"abc").pieces == [(0.0, b"abc")]  # other direction untouched
    reg.clear()
    reg.add(Toxic.from_dict({"type": "bandwidth", "attributes": {"rate": 10}}))
    pieces = down.plan(b"y" * 4096).pieces
    assert sum(len(p) for _, p in pieces) == 4096 and abs(sum(d for d, _ in pieces) - 0.4) < 1e-6


# ---- the loop breaker's threshold, switched at run time --------------------------------------
@pytest.mark.parametrize("threshold", [2, 5])
def test_loop_breaker_threshold(gw: GatewayProcess, port: int, threshold: int) -> None:
    gw.set_deny(deny_mode="403", loop_breaker=True, loop_threshold=threshold, loop_window_s=60)
    path = f"/loop-{threshold}"
    statuses = [http_get(port, f"http://example.com{path}").status for _ in range(threshold + 3)]
    assert statuses == [403] * threshold + [429] * 3
    trips = [r for r in gw.audit_records() if r["event"] == "retry_loop_detected" and r["path"] == path]
    assert len(trips) == 1
    gw.set_deny(loop_breaker=False)
    assert {http_get(port, f"http://example.com{path}-off").status for _ in range(threshold + 3)} == {403}
    gw.set_deny(deny_mode="403-explained", loop_breaker=True, loop_threshold=50)


def test_set_deny_switches_the_loop_answer(gw: GatewayProcess, port: int) -> None:
    """429 <-> 200-terminal at run time, keeping the other settings; a bad value changes nothing."""
    reply = gw.set_deny(
        deny_mode="403", loop_breaker=True, loop_threshold=2, loop_window_s=60, loop_answer="200-terminal"
    )
    assert reply["loop_answer"] == "200-terminal"
    statuses = [http_get(port, "http://example.com/switch-200").status for _ in range(4)]
    assert statuses == [403, 403, 200, 200]
    trips = [r for r in gw.audit_records() if r["event"] == "retry_loop_detected" and r["path"] == "/switch-200"]
    assert [(r["status"], r["decision"]) for r in trips] == [(200, "deny")]
    with pytest.raises(RuntimeError, match="loop_answer"):
        gw.set_deny(deny_mode="reset", loop_answer="200")
    # Unset settings stay: still 403 and 200-terminal (the refused call changed nothing).
    assert gw.set_deny(loop_threshold=2)["loop_answer"] == "200-terminal"
    statuses = [http_get(port, "http://example.com/switch-again").status for _ in range(3)]
    assert statuses == [403, 403, 200]
    assert gw.set_deny(loop_answer="429")["loop_answer"] == "429"
    statuses = [http_get(port, "http://example.com/switch-429").status for _ in range(3)]
    assert statuses == [403, 403, 429]
    gw.set_deny(deny_mode="403-explained", loop_breaker=True, loop_threshold=50)
