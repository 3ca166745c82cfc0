"""A small blocking HTTP/1.1 client that talks through forward proxies the way agents' SDKs do.

Locust's own clients don't fit: FastHttpUser sends CONNECT even for plain http, and HttpUser
(requests) costs several times more CPU per request, which makes the generator the bottleneck
on a 2-core host. This one keeps one connection per origin (a kept-alive CONNECT tunnel for
https, absolute-form requests to the proxy for plain http), parses only what it needs, and
raises RequestFailed with a short *kind* so failures can be counted by kind.

It imports no locust; under Locust the socket and ssl modules are gevent-patched, so it is
cooperative there and plain blocking everywhere else (tests, the harness).
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

RECV_BYTES = 256 * 1024
MAX_HEAD_BYTES = 64 * 1024
DEFAULT_TIMEOUT_S = 10.0


class RequestFailed(Exception):
    """A request that did not get the expected answer; `kind` is what failures are counted by."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind)
        self.kind = kind
        self.detail = detail


@dataclass
class Response:
    status: int
    length: int
    ttfb_ms: float
    """Request sent -> first byte of the response head."""
    headers: dict[str, str]


def failure_kind(exc: BaseException) -> str:
    """Map an exception to the kind it is counted under in results."""
    if isinstance(exc, RequestFailed):
        return exc.kind
    if isinstance(exc, ConnectionRefusedError):
        return "connect_refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "connection_reset"
    if isinstance(exc, ssl.SSLError):
        return "tls_error"
    if isinstance(exc, OSError):
        return "os_error"
    return type(exc).__name__


class _Conn:
    """One socket plus the bytes read past the last response."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = b""

    def read_head(self) -> tuple[int, dict[str, str], str]:
        data = self.pending
        while b"\r\n\r\n" not in data:
            if len(data) > MAX_HEAD_BYTES:
                raise RequestFailed("bad_response", "head too large")
            chunk = self.sock.recv(RECV_BYTES)
            if not chunk:
                raise RequestFailed("closed", "closed before response head")
            data += chunk
        head, _, self.pending = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise RequestFailed("bad_response", lines[0][:80])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        return int(parts[1]), headers, parts[0]

    def read_exact(self, n: int) -> int:
        got = min(n, len(self.pending))
        self.pending = self.pending[got:]
        while got < n:
            chunk = self.sock.recv(min(RECV_BYTES, n - got))
            if not chunk:
                raise RequestFailed("short_body", f"{got} of {n} bytes")
            got += len(chunk)
        return got

    def read_line(self) -> bytes:
        while b"\r\n" not in self.pending:
            chunk = self.sock.recv(RECV_BYTES)
            if not chunk:
                raise RequestFailed("short_body", "closed inside chunked body")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\r\n")
        return line

    def read_chunked(self) -> int:
        total = 0
        while True:
            size = int(self.read_line().split(b";")[0], 16)
            if size == 0:
                while self.read_line():  # trailers end with an empty line
                    pass
                return total
            total += self.read_exact(size)
            self.read_line()

    def read_to_close(self) -> int:
        total, self.pending = len(self.pending), b""
        while chunk := self.sock.recv(RECV_BYTES):
            total += len(chunk)
        return total

    def close(self) -> None:
        self.sock.close()


class ProxyClient:
    """Requests to absolute URLs, through `proxy` (host, port) or straight to the origin."""

    def __init__(self, proxy: tuple[str, int] | None, ca_file: str | None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.proxy = proxy
        self.timeout_s = timeout_s
        self._ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        self._conns: dict[tuple[str, str, int], _Conn] = {}

    def _dial(self, host: str, port: int) -> socket.socket:
        sock = socket.create_connection((host, port), timeout=self.timeout_s)
        # Requests are small and latency is what we measure: never let Nagle hold a write back.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _open(self, scheme: str, host: str, port: int) -> _Conn:
        if self.proxy is None:
            sock = self._dial(host, port)
        else:
            sock = self._dial(*self.proxy)
            if scheme == "https":
                conn = _Conn(sock)
                authority = f"{host}:{port}"
                sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
                status, _, _ = conn.read_head()
                if status != 200:
                    sock.close()
                    raise RequestFailed(f"connect_http_{status}")
        if scheme == "https":
            sock = self._ctx.wrap_socket(sock, server_hostname=host)
        return _Conn(sock)

    def request(self, method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Response:
        """One request on a kept-alive connection; the connection is dropped on any error."""
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        reused = self._conns.pop(key, None)
        conn = reused or self._open(scheme, host, port)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        if scheme == "http" and self.proxy is not None:
            target = url  # absolute-form: what a client sends a forward proxy for plain http
        authority = host if port == (443 if scheme == "https" else 80) else f"{host}:{port}"
        lines = [f"{method} {target} HTTP/1.1", f"Host: {authority}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        t0 = time.perf_counter()
        try:
            conn.sock.sendall(raw)
            status, resp_headers, version = conn.read_head()
        except (RequestFailed, ConnectionResetError, BrokenPipeError) as exc:
            conn.close()
            stale = reused is not None and (not isinstance(exc, RequestFailed) or exc.kind == "closed")
            if not stale:
                raise
            # A kept-alive connection the server closed while idle (tinyproxy closes after each
            # response without saying so): every HTTP client reopens and resends once. The time
            # spent on the dead connection stays in the measurement.
            conn = self._open(scheme, host, port)
            try:
                conn.sock.sendall(raw)
                status, resp_headers, version = conn.read_head()
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        ttfb_ms = (time.perf_counter() - t0) * 1000.0
        try:
            length = self._read_body(conn, method, status, resp_headers)
        except BaseException:
            conn.close()
            raise
        keep = resp_headers.get("connection", "").lower() != "close" and not (
            version == "HTTP/1.0" and resp_headers.get("connection", "").lower() != "keep-alive"
        )
        if keep:
            self._conns[key] = conn
        else:
            conn.close()
        return Response(status=status, length=length, ttfb_ms=ttfb_ms, headers=resp_headers)

    @staticmethod
    def _read_body(conn: _Conn, method: str, status: int, headers: dict[str, str]) -> int:
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return 0
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return conn.read_chunked()
        if "content-length" in headers:
            return conn.read_exact(int(headers["content-length"]))
        headers["connection"] = "close"  # delimited by close: this connection is spent
        return conn.read_to_close()

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
