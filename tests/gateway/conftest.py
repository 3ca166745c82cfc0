"""Fixtures: a real loopback upstream, real gateway processes, and raw-socket clients."""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.gateway.process import CredentialSpec, GatewayConfig, GatewayProcess
from harness.standins.upstream import UpstreamServer

ANTHROPIC_KEY = "sk-ant-TEST-0123456789-abcdefghijklmnop"
OPENAI_KEY = "sk-openai-TEST-9876543210-zyxwvutsrq"
CLIENT_TIMEOUT_S = 5.0

TEST_POLICY = """
name: test
deny_mode: 403-explained
loop_breaker: {threshold: 50, window_s: 60}
rules:
  - allow: api.anthropic.com
  - allow: api.openai.com
  - allow: github.com
  - allow: api-anthropic.com
  - allow: evil.test
  - allow: "**.evil.test"
  - allow: pypi.org
    ports: [80, 443]
  - allow: files.pythonhosted.org
    ports: [80, 443]
    methods: [GET, HEAD]
    paths: ["/packages/**"]
  - allow: 127.0.0.1/32
    ports: ["1024-65535"]
  - deny: "blocked.evil.test:*"
"""


def credentials() -> list[CredentialSpec]:
    return [
        CredentialSpec("anthropic", "api.anthropic.com", "x-api-key", env="BR_TEST_ANTHROPIC_KEY"),
        CredentialSpec(
            "openai", "api.openai.com", "authorization", template="Bearer {secret}", env="BR_TEST_OPENAI_KEY"
        ),
    ]


SECRET_ENV = {"BR_TEST_ANTHROPIC_KEY": ANTHROPIC_KEY, "BR_TEST_OPENAI_KEY": OPENAI_KEY}


def guest_gateway_config(run_dir: Path, upstream: UpstreamServer) -> GatewayConfig:
    """A gateway for a fleet of real guests: TEST_POLICY, the test credentials, upstreams on the stand-in."""
    policy = run_dir / "policy.yaml"
    policy.write_text(TEST_POLICY)
    return GatewayConfig(
        policy=policy,
        state_dir=run_dir / "gateway",
        audit_path=run_dir / "audit.jsonl",
        ca_dir=run_dir / "ca",
        credentials=credentials(),
        upstream_overrides=upstream.overrides(),
        upstream_ca_file=upstream.ca_file,
        extra_env=dict(SECRET_ENV),
    )


@pytest.fixture(scope="session")
def upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer(
        expected={
            "api.anthropic.com": ("x-api-key", ANTHROPIC_KEY),
            "api.openai.com": ("authorization", f"Bearer {OPENAI_KEY}"),
        }
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ca")


@pytest.fixture(scope="session")
def test_policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "test.yaml"
    path.write_text(TEST_POLICY)
    return path


GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture(scope="module")
def make_gateway(
    tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamServer, ca_dir: Path, test_policy_file: Path
) -> Iterator[GatewayFactory]:
    started: list[GatewayProcess] = []

    def factory(**overrides: object) -> GatewayProcess:
        state = tmp_path_factory.mktemp("gw")
        kwargs: dict[str, object] = dict(
            policy=test_policy_file,
            state_dir=state,
            audit_path=state / "audit.jsonl",
            ca_dir=ca_dir,
            credentials=credentials(),
            upstream_overrides=upstream.overrides(),
            upstream_ca_file=upstream.ca_file,
            extra_env=dict(SECRET_ENV),
        )
        kwargs.update(overrides)
        gw = GatewayProcess(GatewayConfig(**kwargs))  # type: ignore[arg-type]
        started.append(gw)
        gw.start()
        return gw

    yield factory
    for gw in started:
        gw.stop()
    for gw in started:
        assert_dialled_loopback(gw)


def assert_dialled_loopback(gw: GatewayProcess) -> None:
    """Every address the gateway connected to was a loopback stand-in: some real names (pypi.org,
    files.pythonhosted.org) resolve on our machines, and no test may reach them."""
    for record in gw.audit_records():
        addr = record.get("upstream_addr")
        if addr is not None:
            host = str(addr).rpartition(":")[0].strip("[]")
            assert ipaddress.ip_address(host).is_loopback, record


@pytest.fixture(scope="module")
def gateway(make_gateway: GatewayFactory) -> GatewayProcess:
    return make_gateway()


@pytest.fixture(scope="module")
def port(gateway: GatewayProcess) -> int:
    return gateway.add_sandbox("sb-main")


# ---- clients ------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes = field(repr=False, default=b"")

    def json(self) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.body)
        return data


def parse_reply(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return Reply(status, headers, body, raw)


def recv_all(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ssl.SSLError, ConnectionResetError):
            break
        if not chunk:
            break
        out += chunk
    return out


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S)
    return sock


def send_raw(port: int, data: bytes, half_close: bool = False) -> bytes:
    with connect(port) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def http_get(port: int, url: str, host: str | None = None, extra: str = "") -> Reply:
    """Absolute-form request through the proxy, Connection: close."""
    authority = host or url.split("/")[2]
    data = f"GET {url} HTTP/1.1\r\nHost: {authority}\r\n{extra}Connection: close\r\n\r\n".encode()
    return parse_reply(send_raw(port, data))


def connect_tunnel(port: int, authority: str, host_header: str | None = None) -> tuple[socket.socket, bytes]:
    """Send CONNECT and read the proxy's answer head. Returns the socket and the answer bytes."""
    sock = connect(port)
    head = f"CONNECT {authority} HTTP/1.1\r\n"
    if host_header is not None:
        head += f"Host: {host_header}\r\n"
    sock.sendall((head + "\r\n").encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    return sock, answer


def tls_request(
    port: int,
    authority: str,
    cadata: bytes,
    request: bytes,
    server_hostname: str | None = None,
) -> Reply:
    """CONNECT authority, TLS inside verified against cadata, send request, read to close."""
    sock, answer = connect_tunnel(port, authority, authority)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    ctx = ssl.create_default_context(cadata=cadata.decode())
    host = server_hostname or authority.rsplit(":", 1)[0]
    with ctx.wrap_socket(sock, server_hostname=host) as tls:
        tls.sendall(request)
        return parse_reply(recv_all(tls))


def read_audit(gw: GatewayProcess) -> list[dict[str, object]]:
    return gw.audit_records()
