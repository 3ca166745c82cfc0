"""A local upstream on loopback: the stand-in for a model API and a package mirror.

One plain HTTP and one HTTPS listener (its own test CA, one certificate naming every stand-in
host). It records every request it receives -- which host (SNI / Host), which headers -- and
checks the credential a host expects, so tests can prove a key arrived where it should and
nowhere else. Runs its own event loop in a thread so a test (or a benchmark) can drive it
while the gateway runs in its own process.

Routes: /bytes/<n> (n bytes), /status/<code>, /sleep/<seconds> (a slow upstream), /redirect?to=<url>[&status=<code>],
/upload (counts the body), /echo (a hostile upstream that hands back what it received, credential
included, as TRACE does: ?encode=raw|base64|hex, ?where=body|header, ?chunk=<n> to send the body in
chunks of n bytes), /both-framing (an answer with Content-Length and Transfer-Encoding), anything else
echoes what was received as JSON, the expected credential masked.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import ssl
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harness.gateway.tls import SHA1_COMPAT, issue_leaf, make_ca, server_context_from_pem
from harness.scratch import make_scratch_dir, remove_scratch_dir

DEFAULT_NAMES = (
    "api.anthropic.com",
    "api.openai.com",
    "github.com",
    "api.github.com",
    "example.com",
    "pypi.org",
    "files.pythonhosted.org",
    "api.anthropic.com.evil.test",
    "api-anthropic.com",
    "evil.test",
    "127.0.0.1",
)
BYTES_CHUNK = 1024 * 1024
MAX_BYTES_ROUTE = 4 * 1024**3
START_TIMEOUT_S = 10.0
MAX_SLEEP_S = 10.0


@dataclass
class Received:
    scheme: str
    sni: str | None
    method: str
    target: str
    host: str | None
    headers: dict[str, str]
    body_len: int
    credential: str  # ok | missing | wrong | not-expected


@dataclass
class UpstreamServer:
    """expected: host -> (header, value) that host requires (the stand-in model API's key)."""

    names: tuple[str, ...] = DEFAULT_NAMES
    expected: dict[str, tuple[str, str]] = field(default_factory=dict)
    host: str = "127.0.0.1"
    http_port: int = 0
    https_port: int = 0
    ca_file: Path | None = None
    _received: list[Received] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _servers: list[asyncio.Server] = field(default_factory=list, repr=False)
    _tmp: Path | None = field(default=None, repr=False)

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> UpstreamServer:
        tmp = self._tmp = make_scratch_dir("br-upstream-")
        ca_key, ca_cert = make_ca("blastradius test upstream CA")
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        chain = issue_leaf(ca_key, ca_cert, leaf_key, list(self.names)).public_bytes(serialization.Encoding.PEM)
        key_pem = leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # As before the profiles: a busybox guest's ssl_client may reach it through a peer's blind tunnel.
        ctx = server_context_from_pem(chain, key_pem, tmp, SHA1_COMPAT)

        def remember_sni(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            sslobj.upstream_sni = name  # type: ignore[attr-defined]

        ctx.sni_callback = remember_sni
        self.ca_file = tmp / "upstream-ca.pem"
        self.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="upstream", daemon=True)
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start_servers(ctx), self._loop)
        fut.result(timeout=START_TIMEOUT_S)
        return self

    async def _start_servers(self, ctx: ssl.SSLContext) -> None:
        plain = await asyncio.start_server(
            lambda r, w: self._serve(r, w, "http"), self.host, self.http_port, limit=BYTES_CHUNK
        )
        tls = await asyncio.start_server(
            lambda r, w: self._serve(r, w, "https"), self.host, self.https_port, ssl=ctx, limit=BYTES_CHUNK
        )
        self._servers = [plain, tls]
        self.http_port = plain.sockets[0].getsockname()[1]
        self.https_port = tls.sockets[0].getsockname()[1]

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def shutdown() -> None:
            for server in self._servers:
                server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=START_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=START_TIMEOUT_S)
        loop.close()
        if self._tmp is not None:
            remove_scratch_dir(self._tmp)

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- what tests read -----------------------------------------------------------------
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def clear(self) -> None:
        with self._lock:
            self._received.clear()

    def overrides(self, names: tuple[str, ...] | None = None) -> dict[str, str]:
        """upstream_overrides sending every name's :443 and :80 here."""
        table: dict[str, str] = {}
        for name in names or self.names:
            if name.replace(".", "").isdigit():
                continue
            table[f"{name}:443"] = f"{self.host}:{self.https_port}"
            table[f"{name}:80"] = f"{self.host}:{self.http_port}"
        return table

    # ---- serving -------------------------------------------------------------------------
    def _check_credential(self, host: str | None, headers: dict[str, str]) -> str:
        bare = (host or "").split(":")[0].lower()
        if bare not in self.expected:
            return "not-expected"
        header, value = self.expected[bare]
        got = headers.get(header.lower())
        if got is None:
            return "missing"
        return "ok" if got == value else "wrong"

    def _is_expected_header(self, host: str | None, header: str) -> bool:
        bare = (host or "").split(":")[0].lower()
        return bare in self.expected and self.expected[bare][0].lower() == header

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, scheme: str) -> None:
        sslobj = writer.get_extra_info("ssl_object")
        sni = getattr(sslobj, "upstream_sni", None) if sslobj is not None else None
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._next(conn, reader)
                if not isinstance(request, h11.Request):
                    return
                body_len = 0
                while True:
                    event = await self._next(conn, reader)
                    if isinstance(event, h11.Data):
                        body_len += len(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                await self._respond(conn, writer, scheme, sni, request, body_len)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, ssl.SSLError, OSError):
            pass
        finally:
            writer.close()

    async def _next(self, conn: h11.Connection, reader: asyncio.StreamReader) -> object:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(BYTES_CHUNK))
                continue
            return event

    async def _respond(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        scheme: str,
        sni: str | None,
        request: h11.Request,
        body_len: int,
    ) -> None:
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
        host = headers.get("host")
        record = Received(
            scheme=scheme,
            sni=sni,
            method=request.method.decode(),
            target=request.target.decode(),
            host=host,
            headers=headers,
            body_len=body_len,
            credential=self._check_credential(sni or host, headers),
        )
        with self._lock:
            self._received.append(record)
        url = urlsplit(record.target)
        path = url.path
        status = 200
        extra: list[tuple[bytes, bytes]] = []
        if path.startswith("/bytes/"):
            size = min(int(path.split("/")[2]), MAX_BYTES_ROUTE)
            await self._send_bytes(conn, writer, size)
            return
        if path == "/echo":
            await self._send_echo(conn, writer, request, parse_qs(url.query))
            return
        if path == "/both-framing":
            await self._send_both_framing(writer)
            return
        if path.startswith("/sleep/"):
            await asyncio.sleep(min(float(path.split("/")[2]), MAX_SLEEP_S))
        if path.startswith("/status/"):
            status = int(path.split("/")[2])
        elif path == "/redirect":
            query = parse_qs(url.query)
            status = int(query.get("status", ["302"])[0])
            extra.append((b"location", query.get("to", ["/"])[0].encode()))
        elif record.credential in ("missing", "wrong"):
            status = 401
        # Like a real API, never echo a key back: the sandbox must not learn it from a reply.
        shown = asdict(record)
        shown["headers"] = {
            k: ("[checked]" if self._is_expected_header(sni or host, k) else v) for k, v in headers.items()
        }
        body = json.dumps(shown).encode()
        writer.write(
            conn.send(
                h11.Response(
                    status_code=status,
                    headers=[
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        *extra,
                    ],
                )
            )
        )
        if request.method != b"HEAD":
            writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    async def _send_echo(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, request: h11.Request, query: dict[str, list[str]]
    ) -> None:
        """Hand back the request head as received (what TRACE does): a hostile or careless upstream."""
        head = request.method + b" " + request.target + b"\r\n"
        head += b"".join(k + b": " + v + b"\r\n" for k, v in request.headers)
        encode = query.get("encode", ["raw"])[0]
        echoed = {"raw": head, "base64": base64.b64encode(head), "hex": binascii.hexlify(head)}[encode]
        headers = [(b"content-type", b"message/http")]
        if query.get("where", ["body"])[0] == "header":
            # Every header value of the request, one response header each (values only: no CR/LF).
            headers += [(b"x-echo-" + k, v) for k, v in request.headers]
            echoed = b"echoed in headers\n"
        chunk = int(query.get("chunk", ["0"])[0])
        if chunk:
            writer.write(
                conn.send(h11.Response(status_code=200, headers=[*headers, (b"transfer-encoding", b"chunked")]))
            )
            for start in range(0, len(echoed), chunk):
                writer.write(conn.send(h11.Data(data=echoed[start : start + chunk])))
                await writer.drain()
        else:
            writer.write(
                conn.send(h11.Response(status_code=200, headers=[*headers, (b"content-length", b"%d" % len(echoed))]))
            )
            writer.write(conn.send(h11.Data(data=echoed)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    async def _send_both_framing(self, writer: asyncio.StreamWriter) -> None:
        """An answer framed two ways (RFC 9112 §6.3): written raw, h11 would never produce it. The
        connection closes after it, since its length is ambiguous by design."""
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    async def _send_bytes(self, conn: h11.Connection, writer: asyncio.StreamWriter, size: int) -> None:
        writer.write(
            conn.send(
                h11.Response(
                    status_code=200,
                    headers=[
                        (b"content-length", str(size).encode()),
                        (b"content-type", b"application/octet-stream"),
                    ],
                )
            )
        )
        chunk = b"x" * BYTES_CHUNK
        remaining = size
        while remaining > 0:
            n = min(remaining, BYTES_CHUNK)
            # Passthrough: with a known length h11 frames nothing, so the chunk is not copied.
            for piece in conn.send_with_data_passthrough(h11.Data(data=chunk if n == BYTES_CHUNK else chunk[:n])):
                writer.write(piece)
            remaining -= n
            await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()


def received_as_dicts(server: UpstreamServer) -> list[dict[str, Any]]:
    return [asdict(r) for r in server.received()]
