"""Gateway overhead on loopback, measured side by side with direct connections in one run.

    from harness.load.measure import measure_overhead
    result = measure_overhead(requests=1000, tunnel_mb=256)

Latency: sequential requests on one keep-alive connection (direct vs through the gateway),
for plain http (absolute-form), a blind CONNECT tunnel, and intercepted TLS with credential
injection. Throughput: one large download through a blind tunnel vs direct. The upstream is
the in-process loopback stand-in; the gateway is its own process, as in production.
"""

from __future__ import annotations

import socket
import ssl
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.gateway.config import GatewayConfig
from harness.gateway.credentials import SENTINEL, CredentialSpec
from harness.gateway.process import GatewayProcess
from harness.scratch import scratch_dir
from harness.standins.upstream import DEFAULT_NAMES, UpstreamServer

BENCH_HOST = "bench.test"
BENCH_KEY = "sk-bench-0123456789abcdef"
RECV_BUF = 1024 * 1024
SOCKET_TIMEOUT_S = 30.0
WARMUP_REQUESTS = 20
BENCH_POLICY = f"""
name: bench
deny_mode: 403-explained
rules:
  - allow: {BENCH_HOST}
    ports: [80, 443]
  - allow: api.anthropic.com
"""


class _Client:
    """A minimal blocking HTTP/1.1 client: enough to time requests without library overhead."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket) -> None:
        self.sock = sock
        self.buf = bytearray(RECV_BUF)
        self.pending = b""

    def request(self, raw: bytes) -> tuple[int, int]:
        self.sock.sendall(raw)
        data = self.pending
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before response head")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value)
        got = len(rest)
        view = memoryview(self.buf)
        while got < length:
            n = self.sock.recv_into(view, min(RECV_BUF, length - got))
            if not n:
                raise ConnectionError("closed mid-body")
            got += n
        self.pending = rest[length:] if len(rest) > length else b""
        return status, length


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _tunnel(proxy_port: int, authority: str) -> socket.socket:
    sock = _connect(proxy_port)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("proxy closed the CONNECT")
        answer += chunk
    if not answer.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"CONNECT refused: {answer[:80]!r}")
    return sock


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered), 4),
        "p90_ms": round(pick(0.90), 4),
        "p99_ms": round(pick(0.99), 4),
        "mean_ms": round(statistics.fmean(ordered), 4),
    }


def _time_requests(client: _Client, raw: bytes, n: int) -> list[float]:
    for _ in range(WARMUP_REQUESTS):
        client.request(raw)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        status, _ = client.request(raw)
        samples.append((time.perf_counter() - t0) * 1000.0)
        if status != 200:
            raise RuntimeError(f"unexpected status {status}")
    return samples


def _pair(direct: list[float], proxied: list[float]) -> dict[str, Any]:
    d, p = _percentiles(direct), _percentiles(proxied)
    return {
        "direct": d,
        "gateway": p,
        "added_p50_ms": round(p["p50_ms"] - d["p50_ms"], 4),
        "added_p99_ms": round(p["p99_ms"] - d["p99_ms"], 4),
    }


def _throughput(make_sock: Callable[[], socket.socket], size: int) -> float:
    with make_sock() as sock:
        client = _Client(sock)
        raw = f"GET /bytes/{size} HTTP/1.1\r\nHost: {BENCH_HOST}\r\n\r\n".encode()
        client.request(f"GET /bytes/{RECV_BUF} HTTP/1.1\r\nHost: {BENCH_HOST}\r\n\r\n".encode())
        t0 = time.perf_counter()
        _, length = client.request(raw)
        elapsed = time.perf_counter() - t0
    return round(length / elapsed / 1e6, 1)


def measure_overhead(
    requests: int = 500,
    tunnel_mb: int = 256,
    state_dir: Path | None = None,
    ca_dir: Path | None = None,
) -> dict[str, Any]:
    """Added latency (ms) and tunnel throughput (MB/s) of the gateway vs direct, on loopback."""
    with scratch_dir("br-measure-") as tmp:
        policy = tmp / "bench.yaml"
        policy.write_text(BENCH_POLICY)
        upstream = UpstreamServer(
            names=(*DEFAULT_NAMES, BENCH_HOST), expected={"api.anthropic.com": ("x-api-key", BENCH_KEY)}
        ).start()
        cfg = GatewayConfig(
            policy=policy,
            state_dir=state_dir or tmp / "state",
            ca_dir=ca_dir or tmp / "ca",
            credentials=[CredentialSpec("anthropic", "api.anthropic.com", "x-api-key", env="BR_BENCH_KEY")],
            upstream_overrides=upstream.overrides(),
            upstream_ca_file=upstream.ca_file,
            extra_env={"BR_BENCH_KEY": BENCH_KEY},
        )
        try:
            with GatewayProcess(cfg) as gw:
                port = gw.add_sandbox("measure")
                return _run(gw, port, upstream, requests, tunnel_mb * 1024 * 1024)
        finally:
            upstream.stop()


def _run(gw: GatewayProcess, port: int, upstream: UpstreamServer, n: int, size: int) -> dict[str, Any]:
    small = f"GET /status/200 HTTP/1.1\r\nHost: {BENCH_HOST}\r\n\r\n".encode()
    absolute = f"GET http://{BENCH_HOST}/status/200 HTTP/1.1\r\nHost: {BENCH_HOST}\r\n\r\n".encode()
    result: dict[str, Any] = {"requests": n, "tunnel_bytes": size}

    with _connect(upstream.http_port) as direct, _connect(port) as proxied:
        result["http_absolute_form"] = _pair(
            _time_requests(_Client(direct), small, n), _time_requests(_Client(proxied), absolute, n)
        )
    with _connect(upstream.http_port) as direct, _tunnel(port, f"{BENCH_HOST}:80") as tunnel:
        result["connect_tunnel"] = _pair(
            _time_requests(_Client(direct), small, n), _time_requests(_Client(tunnel), small, n)
        )

    api = f"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nx-api-key: {SENTINEL}\r\n"
    api_direct = (api.replace(SENTINEL, BENCH_KEY) + "content-length: 2\r\n\r\n{}").encode()
    api_proxied = (api + "content-length: 2\r\n\r\n{}").encode()
    upstream_ctx = ssl.create_default_context(cafile=str(upstream.ca_file))
    gateway_ctx = ssl.create_default_context(cadata=gw.ca_cert_pem().decode())
    with (
        upstream_ctx.wrap_socket(_connect(upstream.https_port), server_hostname="api.anthropic.com") as direct,
        gateway_ctx.wrap_socket(_tunnel(port, "api.anthropic.com:443"), server_hostname="api.anthropic.com") as tls,
    ):
        result["intercepted_tls_with_credential"] = _pair(
            _time_requests(_Client(direct), api_direct, n), _time_requests(_Client(tls), api_proxied, n)
        )

    direct_mbs = _throughput(lambda: _connect(upstream.http_port), size)
    tunnel_mbs = _throughput(lambda: _tunnel(port, f"{BENCH_HOST}:80"), size)
    result["tunnel_throughput"] = {
        "direct_MBps": direct_mbs,
        "gateway_MBps": tunnel_mbs,
        "ratio": round(tunnel_mbs / direct_mbs, 3) if direct_mbs else None,
    }
    stats = gw.stats()
    result["gateway_errors"] = stats.get("errors", 0)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(measure_overhead(), indent=2))
