"""Loopback canaries: tiny threaded servers, one per (address, port), that record every connection.

Each canary answers whatever arrives as HTTP (200, `Connection: close`), and records the peer, the raw
bytes (bounded), the SNI of a TLS handshake and the request heads it could parse. TLS ports present a
leaf from the conformance CA naming every canary name. Linux routes all of 127/8 to loopback, so each
name gets its own address and a proxy's dial is visible by where it lands.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harness.gateway.tls import issue_leaf, make_ca

MAX_RECORDED_BYTES = 64 * 1024
"""Bytes kept per connection: enough for every case's request, bounded for the resource-abuse ones."""
FIRST_READ_S = 1.0
"""How long a canary waits for the first bytes of a connection."""
READ_IDLE_S = 0.15
"""After an answer, how long it keeps reading (a smuggled second request) before it closes."""


@dataclass
class Connection:
    """One connection a canary accepted."""

    canary: str
    address: str
    port: int
    peer: str
    tls: bool
    accepted: float
    sni: str | None = None
    data: bytearray = field(default_factory=bytearray)
    closed: float | None = None
    error: str | None = None
    parsed: list[dict[str, str]] = field(default_factory=list)
    """Requests the canary's HTTP/1.1 parser framed (method, target, Host), in order."""
    parse_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "canary": self.canary,
            "listen": f"{self.address}:{self.port}",
            "peer": self.peer,
            "tls": self.tls,
            "sni": self.sni,
            "bytes": len(self.data),
            "requests": self.parsed[:5],
            "parse_error": self.parse_error,
            "head": printable(bytes(self.data[:600])),
        }


def printable(raw: bytes) -> str:
    """Bytes as readable, escaped text (\\r\\n kept visible, non-ASCII as \\xNN)."""
    out = []
    for byte in raw:
        ch = chr(byte)
        if ch == "\n":
            out.append("\\n\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\\":
            out.append("\\\\")
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


@dataclass(frozen=True)
class CanarySpec:
    """A canary's name, its loopback address, the ports it listens on and which of them speak TLS."""

    name: str
    address: str
    ports: tuple[int, ...]
    tls_ports: tuple[int, ...] = (443, 8443)
    aliases: tuple[str, ...] = ()
    """The host names that resolve to this canary (its name is a label, not a host)."""


class Canaries:
    """Every canary, their CA, and the connections they recorded."""

    def __init__(self, specs: Iterable[CanarySpec], workdir: Path) -> None:
        self.specs = list(specs)
        self.workdir = workdir
        self.connections: list[Connection] = []
        self.lock = threading.Lock()
        self.listeners: list[socket.socket] = []
        self.bound: dict[tuple[str, int], int] = {}
        """(address, wanted port) -> the port actually bound (another when the wanted one was taken)."""
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        ca_key, ca_cert = make_ca("blastradius conformance canary CA")
        names = sorted({n for s in self.specs for n in s.aliases} | {s.address for s in self.specs})
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = issue_leaf(ca_key, ca_cert, leaf_key, names)
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca_file = workdir / "canary-ca.pem"
        self.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        chain = workdir / "canary-leaf.pem"
        chain.write_bytes(
            leaf.public_bytes(serialization.Encoding.PEM)
            + leaf_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        chain.chmod(0o600)
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(chain)
        self.tls.sni_callback = self._sni

    def _sni(self, sock: ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> None:
        sock.br_sni = name  # type: ignore[attr-defined]  # read back once the handshake is done

    def start(self) -> Canaries:
        for spec in self.specs:
            for port in spec.ports:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((spec.address, port))
                except OSError:
                    sock.bind((spec.address, 0))
                sock.listen(256)
                sock.settimeout(0.2)
                self.bound[(spec.address, port)] = sock.getsockname()[1]
                self.listeners.append(sock)
                thread = threading.Thread(
                    target=self._accept, args=(spec, port, sock), daemon=True, name=f"canary-{spec.name}:{port}"
                )
                thread.start()
                self._threads.append(thread)
        return self

    def names(self) -> dict[str, str]:
        """EgressSetup.names: every name to its canary's address ("host:port" -> "ip:port" where the wanted port
        was taken and the canary listens on another)."""
        table: dict[str, str] = {}
        for spec in self.specs:
            for name in spec.aliases:
                table[name] = spec.address
                for port in spec.ports:
                    actual = self.bound.get((spec.address, port), port)
                    if actual != port:
                        table[f"{name}:{port}"] = f"{spec.address}:{actual}"
        return table

    def _accept(self, spec: CanarySpec, port: int, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            peer_text = f"{peer[0]}:{peer[1]}"
            record = Connection(spec.name, spec.address, port, peer_text, port in spec.tls_ports, time.monotonic())
            with self.lock:
                self.connections.append(record)
            threading.Thread(target=self._serve, args=(spec, conn, record), daemon=True).start()

    def _serve(self, spec: CanarySpec, conn: socket.socket, record: Connection) -> None:
        try:
            conn.settimeout(FIRST_READ_S)
            stream: socket.socket = conn
            first = conn.recv(1, socket.MSG_PEEK)
            record.tls = record.tls and first == b"\x16"
            if record.tls:
                tls = self.tls.wrap_socket(conn, server_side=True)
                record.sni = getattr(tls, "br_sni", None)
                stream = tls
            parser: h11.Connection | None = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_RECORDED_BYTES)
            while True:
                try:
                    chunk = stream.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                if len(record.data) < MAX_RECORDED_BYTES:
                    record.data += chunk[: MAX_RECORDED_BYTES - len(record.data)]
                if parser is not None:
                    parser = self._parse(spec, record, parser, chunk, stream)
        except (OSError, ssl.SSLError) as exc:
            record.error = type(exc).__name__
        finally:
            record.closed = time.monotonic()
            with contextlib.suppress(OSError):
                conn.close()

    def _parse(
        self, spec: CanarySpec, record: Connection, parser: h11.Connection, chunk: bytes, stream: socket.socket
    ) -> h11.Connection | None:
        """Feed `chunk` to the canary's HTTP/1.1 parser, record each request it frames and answer it; None once
        the bytes are no longer HTTP (or the connection must close): from then on they are only recorded."""
        parser.receive_data(chunk)
        try:
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    if event is h11.PAUSED and parser.our_state is h11.DONE and parser.their_state is h11.DONE:
                        parser.start_next_cycle()
                        continue
                    return parser
                if isinstance(event, h11.Request):
                    host = next((v for k, v in event.headers if k == b"host"), b"")
                    record.parsed.append(
                        {
                            "method": event.method.decode("latin-1"),
                            "target": event.target.decode("latin-1"),
                            "host": host.decode("latin-1"),
                        }
                    )
                elif isinstance(event, h11.EndOfMessage):
                    body = f"canary {spec.name}:{record.port}\n".encode()
                    headers = [
                        ("Content-Type", "text/plain"),
                        ("X-Canary", spec.name),
                        ("Content-Length", str(len(body))),
                    ]
                    out = parser.send(h11.Response(status_code=200, headers=headers)) or b""
                    out += parser.send(h11.Data(data=body)) or b""
                    out += parser.send(h11.EndOfMessage()) or b""
                    stream.sendall(out)
                    # Keep reading: whatever else arrives on this connection (a smuggled request) is recorded.
                    stream.settimeout(READ_IDLE_S)
                    if parser.our_state is h11.MUST_CLOSE:
                        return None
                elif isinstance(event, h11.ConnectionClosed):
                    return None
        except h11.RemoteProtocolError as exc:
            record.parse_error = str(exc)[:200]
            if parser.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                stream.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return None

    def stop(self) -> None:
        self._stop.set()
        for sock in self.listeners:
            sock.close()

    def __enter__(self) -> Canaries:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
