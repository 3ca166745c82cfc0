"""Forwarding one HTTP request the gateway can see (plain http, or inside terminated TLS).

Both sides are parsed and re-serialised, so the upstream sees the head the gateway checked (h11
throughout, except the common case of wire.py: a bodiless request answered with one Content-Length,
written and read as h11 would, and held to h11's grammar):
its Host is the normalised destination, its target the normalised path that the policy matched.
Hop-by-hop headers are dropped, the credential (if the route carries one) replaces whatever the
sandbox sent, and responses -- redirects included -- are relayed as they are: the gateway never
follows a redirect, so a key can never travel to the Location a server names. A route's forms of
foreign keys are searched for in the body on its way up (exfil.BodyScanner); its own key's are
overwritten in the answer on its way down (exfil.Scrubber), so an echo cannot hand it back.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import h11

from harness.gateway.credentials import BoundCredential, inject
from harness.gateway.dial import DialError, Overrides, open_upstream
from harness.gateway.exfil import BodyScanner, Forms, Scrubber
from harness.gateway.framing import FramingError, check_response, head_end
from harness.gateway.names import format_authority
from harness.gateway.streams import READ_CHUNK, PlainStream, Stream
from harness.gateway.wire import fixed_answer, request_head, response_head

# Connection-specific headers (RFC 9110 7.6.1) plus proxy credentials, which must never leave.
# Content-Length and Transfer-Encoding stay: h11 re-frames bodies from them on each side.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"upgrade",
        b"expect",
    }
)
# Fields a Connection header may never name: dropping them would change the message's framing
# or destination between the gateway's view and the upstream's.
NEVER_HOP_BY_HOP = frozenset({b"content-length", b"transfer-encoding", b"host"})
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
WRITE_HIGH_WATER = 1024 * 1024
MAX_POOLED_PER_SESSION = 8


class ClientGone(Exception):
    """The sandbox side went away mid-exchange."""


def filter_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    named: set[bytes] = set()
    for key, value in headers:
        if key == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    named -= NEVER_HOP_BY_HOP
    return [(k, v) for k, v in headers if k not in HOP_BY_HOP and k not in named]


async def next_event(conn: h11.Connection, stream: Stream | PlainStream, timeout_s: float) -> object:
    """The next h11 event, reading as needed with a per-read timeout."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        async with asyncio.timeout(timeout_s):
            data = await stream.read(READ_CHUNK)
        conn.receive_data(data)


@dataclass
class Upstream:
    stream: PlainStream
    conn: h11.Connection
    addr: str | None
    """The address:port the connection went to (its socket's peer), for the audit log."""
    reused: bool = False
    closed: bool = False
    reusable: bool = True
    """False once the answer says the connection ends with it (or left bytes nobody asked for)."""


FdGate = tuple[Callable[[], bool], Callable[[], None]]
"""(take, give): take one of the sandbox's descriptors for a new upstream (False: none left), give it back."""


class NoDescriptors(DialError):
    """The sandbox has used up its share of the gateway's file descriptors."""

    def __init__(self) -> None:
        super().__init__("too many connections (this sandbox's share of the gateway's descriptors)", status=503)


def peer_address(stream: PlainStream) -> str | None:
    """host:port of the far end of a connected stream, as the kernel reports it."""
    peer = stream.writer.get_extra_info("peername")
    return format_authority(str(peer[0]), int(peer[1])) if peer else None


class UpstreamPool:
    """Keep-alive upstream connections for one client connection (no cross-sandbox sharing)."""

    def __init__(
        self,
        overrides: Overrides,
        tls: ssl.SSLContext,
        connect_timeout_s: float,
        fds: FdGate,
        wrap: Callable[[PlainStream, str, int], PlainStream] | None = None,
    ) -> None:
        self._overrides = overrides
        self._tls = tls
        self._timeout = connect_timeout_s
        self._take_fd, self._give_fd = fds
        self._wrap = wrap  # puts the gateway's toxics between this session and its upstreams
        self._idle: dict[tuple[str, str, int], Upstream] = {}

    async def get(self, scheme: str, host: str, port: int) -> Upstream:
        """A kept-alive connection to scheme://host:port, else a new one; an https one is TLS verified
        against the real name (upstream_tls: certificate required, host name checked)."""
        up = self._idle.pop((scheme, host, port), None)
        if up is not None:
            up.reused = True
            return up
        if not self._take_fd():
            raise NoDescriptors
        try:
            stream = await open_upstream(
                host, port, self._overrides, self._timeout, tls=self._tls if scheme == "https" else None
            )
        except BaseException:
            self._give_fd()
            raise
        addr = peer_address(stream)
        if self._wrap is not None:
            stream = self._wrap(stream, host, port)
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD_BYTES)
        return Upstream(stream, conn, addr)

    def discard(self, up: Upstream) -> None:
        """Close an upstream connection for good and give its descriptor back (once)."""
        if not up.closed:
            up.closed = True
            up.stream.close()
            self._give_fd()

    def put_back(self, scheme: str, host: str, port: int, up: Upstream) -> None:
        fresh = up.conn.our_state is h11.IDLE and up.conn.their_state is h11.IDLE  # see _relay_fixed_body
        done = up.conn.our_state is h11.DONE and up.conn.their_state is h11.DONE
        if up.reusable and (fresh or done):
            if not fresh:
                up.conn.start_next_cycle()
            if len(self._idle) < MAX_POOLED_PER_SESSION and (scheme, host, port) not in self._idle:
                self._idle[(scheme, host, port)] = up
                return
        self.discard(up)

    def close(self) -> None:
        for up in self._idle.values():
            self.discard(up)
        self._idle.clear()


@dataclass
class Exchange:
    status: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    upstream_ms: float | None = None
    upstream_addr: str | None = None
    """The address:port the request went to (the connected socket's peer)."""
    redactions: int = 0
    """Forms of the injected key overwritten in the answer."""


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for key, value in headers:
        if key == b"transfer-encoding":
            return True
        if key == b"content-length" and value.strip() != b"0":
            return True
    return False


@dataclass(slots=True)
class Route:
    """Where one visible request goes and what travels with it, all decided before a byte is sent."""

    scheme: str
    """http, or https: TLS to the upstream, verified against host (the only kind a key goes into)."""
    host: str
    """The normalised destination host the policy checked."""
    port: int
    """The destination port the policy checked."""
    target: bytes
    """The origin-form target sent: the normalised path the policy matched, then the query; no fragment."""
    authority: bytes
    """The Host header sent: the normalised host, and the port when it is not the scheme's default."""
    cred: BoundCredential | None
    """The credential injected, or None."""
    leak_forms: Forms | None
    """Forms of keys that must not go to this destination: the body is searched for them."""
    scrub_forms: Forms | None
    """Forms of the injected key: overwritten in the answer (an echo must not hand it back)."""


async def forward(
    client_conn: h11.Connection,
    client: Stream,
    request: h11.Request,
    route: Route,
    pool: UpstreamPool,
    idle_timeout_s: float,
    response_timeout_s: float,
) -> Exchange:
    """Relay one request and its response. Raises DialError before anything was sent back, KeyLeak
    when the body carries a foreign key (nothing of it has left)."""
    ex = Exchange()
    received = list(request.headers)  # h11's Headers is a Sequence: each pass over it costs a call per field
    headers = [(b"host", route.authority), *(h for h in filter_headers(received) if h[0] != b"host")]
    if route.cred is not None:
        headers = inject(headers, route.cred)
    expects_continue = any(k == b"expect" and v.lower() == b"100-continue" for k, v in received)
    has_body = _has_body(received)
    if not has_body:
        # Read the (empty) end of the request first, so a stale pooled connection can be retried.
        event = await next_event(client_conn, client, idle_timeout_s)
        if not isinstance(event, h11.EndOfMessage):
            raise ClientGone("request ended early")
    # The common case (no body, not HEAD) is written without h11 when it fits h11's grammar (wire.py).
    scrubber = Scrubber(route.scrub_forms) if route.scrub_forms is not None else None
    fast = None if has_body or request.method == b"HEAD" else request_head(request.method, route.target, headers)
    # h11 changes nothing in a Content-Length answer to an HTTP/1.1 client that keeps the connection,
    # so such an answer may be written without it too (unless a key is scrubbed out of it).
    raw_ok = scrubber is None and request.http_version == b"1.1" and not _asks_close(received)
    outgoing = _Outgoing(request.method, route.target, headers, fast, raw_ok)
    scanner = BodyScanner(route.leak_forms) if has_body and route.leak_forms is not None else None
    scheme, host, port = route.scheme, route.host, route.port
    attempts = 2 if not has_body else 1
    for attempt in range(attempts):
        up = await pool.get(scheme, host, port)
        ex.upstream_addr = up.addr
        try:
            await _send_request(
                up, outgoing, client_conn, client, has_body, expects_continue, idle_timeout_s, ex, scanner
            )
            t_sent = time.perf_counter()
            await _relay_response(
                up, outgoing, client_conn, client, idle_timeout_s, response_timeout_s, ex, t_sent, scrubber
            )
        except TimeoutError as exc:
            pool.discard(up)
            if ex.status is None:
                raise DialError(f"upstream {host}:{port} did not answer in time", status=504) from exc
            raise
        except (h11.RemoteProtocolError, ConnectionError, OSError) as exc:
            pool.discard(up)
            if up.reused and ex.status is None and attempt + 1 < attempts:
                continue  # the pooled connection had gone stale; one fresh try
            if ex.status is None:
                raise DialError(f"upstream {host}:{port} failed: {exc}") from exc
            raise
        except BaseException:
            pool.discard(up)
            raise
        pool.put_back(scheme, host, port, up)
        return ex
    raise DialError(f"upstream {host}:{port} failed")  # unreachable: the loop returns or raises


@dataclass(slots=True)
class _Outgoing:
    """The request as sent upstream: its parts, and its head when wire.py could write it without h11."""

    method: bytes
    """The request's method."""
    target: bytes
    """The origin-form target sent."""
    headers: list[tuple[bytes, bytes]]
    """The headers sent (Host first, hop-by-hop dropped, credential injected)."""
    fast: bytes | None
    """The whole head written without h11 (a bodiless request), or None: h11 writes it."""
    raw_answer: bool
    """The sandbox may be answered without h11 as well (see forward)."""

    def event(self) -> h11.Request:
        return h11.Request(method=self.method, target=self.target, headers=self.headers)

    def sync(self, up: Upstream) -> None:
        """Bring the connection's h11 state to "request sent" after a head written without it, so h11
        can take over the answer (the bytes it would write are already on the wire)."""
        if up.conn.our_state is h11.IDLE:
            up.conn.send(self.event())
            up.conn.send(h11.EndOfMessage())


async def _send_request(
    up: Upstream,
    outgoing: _Outgoing,
    client_conn: h11.Connection,
    client: Stream,
    has_body: bool,
    expects_continue: bool,
    idle_timeout_s: float,
    ex: Exchange,
    scanner: BodyScanner | None,
) -> None:
    if outgoing.fast is not None:
        up.stream.write(outgoing.fast)
        await up.stream.drain()
        return
    head = up.conn.send(outgoing.event())
    if not has_body:
        # The head and its (empty) end in one write: one send(2) per request upstream.
        up.stream.write(head + up.conn.send(h11.EndOfMessage()))
        await up.stream.drain()
        return
    up.stream.write(head)
    if expects_continue:
        # The gateway answers 100-continue itself: it has already decided to forward.
        client.write(client_conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        await client.drain()
    while True:
        event = await next_event(client_conn, client, idle_timeout_s)
        if isinstance(event, h11.Data):
            ex.bytes_up += len(event.data)
            if scanner is None:
                up.stream.write(up.conn.send(event))
            else:
                for piece in scanner.feed(event.data):
                    up.stream.write(up.conn.send(h11.Data(data=piece)))
            if up.stream.write_buffered() > WRITE_HIGH_WATER:
                await up.stream.drain()
        elif isinstance(event, h11.EndOfMessage):
            for piece in scanner.flush() if scanner is not None else ():
                up.stream.write(up.conn.send(h11.Data(data=piece)))
            up.stream.write(up.conn.send(h11.EndOfMessage()))
            break
        else:
            raise ClientGone("client closed during request body")
    await up.stream.drain()


async def _relay_response(
    up: Upstream,
    outgoing: _Outgoing,
    client_conn: h11.Connection,
    client: Stream,
    idle_timeout_s: float,
    response_timeout_s: float,
    ex: Exchange,
    t_sent: float,
    scrubber: Scrubber | None,
) -> None:
    method = outgoing.method
    timeout = response_timeout_s
    if outgoing.fast is not None:
        raw = await _read_answer_head(up, response_timeout_s)
        end = head_end(raw)
        answer = fixed_answer(raw[:end]) if end >= 0 else None
        if answer is not None:
            ex.upstream_ms = (time.perf_counter() - t_sent) * 1000.0
            ex.status = answer.status
            headers = filter_headers(answer.headers)
            if scrubber is not None:
                headers = scrubber.headers(headers)
            raw_head = response_head(answer.status, answer.reason, headers) if outgoing.raw_answer else None
            if raw_head is not None:
                # Written as h11 would, and h11's parser for this client is left behind (http1.serve_http).
                await _relay_fixed_body(
                    up, raw[end:], answer.keep_alive, answer.length, raw_head, None, client, idle_timeout_s, ex, None
                )
                return
            response = h11.Response(status_code=answer.status, headers=headers, reason=answer.reason)
            head = client_conn.send(response)
            await _relay_fixed_body(
                up, raw[end:], answer.keep_alive, answer.length, head, client_conn, client, idle_timeout_s, ex, scrubber
            )
            return
        # Not the common case (or not well-formed): h11 reads it from the first byte, as it always did.
        outgoing.sync(up)
        if raw:
            up.conn.receive_data(raw)
    while True:
        event = await next_event(up.conn, up.stream, timeout)
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 100:
                continue  # already answered to the client, or never asked for
            client.write(client_conn.send(event))
        elif isinstance(event, h11.Response):
            try:
                check_response(event)
            except FramingError as exc:
                raise DialError(str(exc)) from None
            ex.upstream_ms = (time.perf_counter() - t_sent) * 1000.0
            ex.status = event.status_code
            timeout = idle_timeout_s
            headers = filter_headers(list(event.headers))
            if scrubber is not None:
                headers = scrubber.headers(headers)
            head = client_conn.send(h11.Response(status_code=event.status_code, headers=headers, reason=event.reason))
            length = _fixed_body_length(event, method)
            if length is not None and up.conn.their_state is h11.SEND_BODY:
                buffered = bytes(up.conn.trailing_data[0])
                keep = _keeps_alive(event)
                await _relay_fixed_body(
                    up, buffered, keep, length, head, client_conn, client, idle_timeout_s, ex, scrubber
                )
                return
            client.write(head)
        elif isinstance(event, h11.Data):
            ex.bytes_down += len(event.data)
            if scrubber is None:
                client.write(client_conn.send(event))
            else:
                for piece in scrubber.feed(event.data):
                    client.write(client_conn.send(h11.Data(data=piece)))
            # Waiting on every chunk costs a loop round-trip each; wait only when the client lags.
            if client.write_buffered() > WRITE_HIGH_WATER:
                await client.drain()
        elif isinstance(event, h11.EndOfMessage):
            _end_body(client_conn, client, ex, scrubber)
            await client.drain()
            return
        else:
            raise ConnectionError("upstream closed before the response ended")


def _end_body(client_conn: h11.Connection, client: Stream, ex: Exchange, scrubber: Scrubber | None) -> None:
    """Write what the scrubber held back (if any) and the end of the answer."""
    out: list[bytes] = []
    _end_pieces(client_conn, out, ex, scrubber)
    client.write(b"".join(out))


def _end_pieces(client_conn: h11.Connection | None, out: list[bytes], ex: Exchange, scrubber: Scrubber | None) -> None:
    """Add what the scrubber held back (if any) and the end of the answer to `out` (nothing when
    the answer is written without h11: a Content-Length body's end is its last byte)."""
    if client_conn is None:
        return
    if scrubber is not None:
        for piece in scrubber.flush():
            out.append(client_conn.send(h11.Data(data=piece)))
        ex.redactions = scrubber.redactions
    out.append(client_conn.send(h11.EndOfMessage()))


def _relay_piece(client_conn: h11.Connection | None, out: list[bytes], data: bytes, scrubber: Scrubber | None) -> None:
    """One read of a Content-Length body, framed for the sandbox (through the scrubber when the route has
    one), added to `out`; as it is when the answer is written without h11."""
    if client_conn is None:
        out.append(data)
        return
    if scrubber is None:
        out.append(client_conn.send(h11.Data(data=data)))
        return
    for piece in scrubber.feed(data):
        out.append(client_conn.send(h11.Data(data=piece)))


def _fixed_body_length(response: h11.Response, method: bytes) -> int | None:
    """The body length of a response framed by Content-Length alone, else None (h11 frames it)."""
    if method == b"HEAD" or response.status_code < 200 or response.status_code in (204, 304):
        return None
    length = None
    for key, value in response.headers:
        if key == b"transfer-encoding":
            return None
        if key == b"content-length":
            length = int(value)
    return length


def _asks_close(headers: list[tuple[bytes, bytes]]) -> bool:
    """The client's request ends its connection (`Connection: close`, or anything that mentions it)."""
    return any(k == b"connection" and b"close" in v.lower() for k, v in headers)


def _keeps_alive(response: h11.Response) -> bool:
    if response.http_version != b"1.1":
        return False
    return not any(k == b"connection" and b"close" in v.lower() for k, v in response.headers)


async def _read_answer_head(up: Upstream, timeout_s: float) -> bytes:
    """What the upstream sent up to the end of its answer's head (and any bytes past it); less when
    it closed, stalled past MAX_RESPONSE_HEAD_BYTES, or framed lines oddly: h11 then judges it."""
    raw = b""
    while head_end(raw) < 0 and len(raw) <= MAX_RESPONSE_HEAD_BYTES:
        async with asyncio.timeout(timeout_s):
            data = await up.stream.read(READ_CHUNK)
        if not data:
            break  # EOF: the stream gives it again to h11's loop
        raw += data
    return raw


async def _relay_fixed_body(
    up: Upstream,
    buffered: bytes,
    keep_alive: bool,
    length: int,
    head: bytes,
    client_conn: h11.Connection | None,
    client: Stream,
    idle_timeout_s: float,
    ex: Exchange,
    scrubber: Scrubber | None,
) -> None:
    """Relay a Content-Length body without running it through h11's receive buffer.

    h11 copies every body byte twice on the way in; for package downloads that was most of the
    gateway's time per request. h11 still checked the head and frames the client side; the bytes
    it had already buffered past the head are sent first, then the rest straight from the socket.
    What is ready goes to the sandbox in one write: the answer's `head` with the body read so far
    (and the end, when the body came whole), since each write to a socket is a send(2), and on
    loopback a send was the single largest cost of a small answer.
    """
    first, extra = buffered[:length], buffered[length:]
    remaining = length - len(first)
    out = [head]
    if first:
        _relay_piece(client_conn, out, first, scrubber)
    ex.bytes_down += len(first)
    while remaining > 0:
        client.write(b"".join(out))
        out.clear()
        if client.write_buffered() > WRITE_HIGH_WATER:
            await client.drain()
        async with asyncio.timeout(idle_timeout_s):
            data = await up.stream.read(min(READ_CHUNK, remaining))
        if not data:
            raise ConnectionError("upstream closed before the response ended")
        remaining -= len(data)
        ex.bytes_down += len(data)
        _relay_piece(client_conn, out, data, scrubber)
    _end_pieces(client_conn, out, ex, scrubber)
    client.write(b"".join(out))
    await client.drain()
    # The upstream parser never saw the body (or, on wire.py's path, anything), so it cannot start a
    # next cycle: a fresh one takes over this connection, unless the upstream closes it or sent bytes
    # nobody asked for.
    if not keep_alive or extra:
        up.reusable = False
    elif up.conn.our_state is not h11.IDLE:
        up.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD_BYTES)
