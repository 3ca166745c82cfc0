"""The HTTP/1 server side of a connection: request heads, their limits, and the keep-alive loop.

The same layer serves the sandbox's proxy connection and the inside of an intercepted tunnel.
Each request goes to request.py. On the proxy side a CONNECT ends this layer: it is returned to
the session, which hands it to connect.py. This layer never imports connect.py, because interception
(imported by connect.py) serves this layer again inside the tunnel.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import h11

from harness.gateway.context import Context
from harness.gateway.framing import LEADING_BLANK_LINES, FramingError, check_request_head, head_end
from harness.gateway.layers.request import TunnelDest, handle_request
from harness.gateway.streams import Stream


class HeadTimeout(Exception):
    """A request head started but did not finish in time (slowloris)."""


@dataclass(frozen=True)
class ConnectRequest:
    """A CONNECT that ended the HTTP/1 layer on the proxy side, for the CONNECT layer to take over."""

    conn: h11.Connection
    """The h11 connection it arrived on: its body (there must be none) and any bytes read past it."""
    request: h11.Request
    """The CONNECT request itself."""


def add_connect_host(head: bytes) -> bytes:
    """Give a CONNECT without Host one naming its target, so h11 accepts it.

    Locust's FastHttpUser (and other tunnelling clients) send CONNECT with no Host header,
    which HTTP/1.1 requires. The target is the authority either way, so nothing is trusted that
    the request line does not already say. `head` is a whole head (read_head holds it until then).
    """
    line_end = head.find(b"\n")
    if b"\nhost:" in head.lower():
        return head
    parts = head[:line_end].rstrip(b"\r").split(b" ")
    if len(parts) != 3:
        return head
    return head[: line_end + 1] + b"host: " + parts[1] + b"\r\n" + head[line_end + 1 :]


class HeadTooLarge(Exception):
    """A request head longer than Limits.max_header_bytes."""


async def read_head(
    ctx: Context, conn: h11.Connection, stream: Stream, proxy_side: bool
) -> tuple[h11.Request, bytes] | None:
    """The next request and its raw head, or None when the client closes or its keep-alive idles out.

    The head is held until it is whole, checked for ambiguous framing (framing.py), and only then
    given to h11: so a head that arrives in pieces is judged as the bytes it is, and a Host-less
    CONNECT gets its Host however its head was split. `conn` holds no unread bytes (serve_http).
    Raises FramingError, HeadTooLarge, HeadTimeout, or h11.RemoteProtocolError.
    """
    loop = asyncio.get_running_loop()
    deadline: float | None = None
    buf = b""
    while True:
        buf = buf.lstrip(LEADING_BLANK_LINES)
        end = head_end(buf)
        if end >= 0:
            break
        if len(buf) > ctx.limits.max_header_bytes:
            raise HeadTooLarge
        if deadline is None:
            timeout = ctx.limits.idle_timeout_s
        else:
            timeout = deadline - loop.time()
            if timeout <= 0:
                raise HeadTimeout
        try:
            async with asyncio.timeout(timeout):
                data = await stream.read()
        except TimeoutError:
            if deadline is None:
                return None  # idle keep-alive connection: close quietly
            raise HeadTimeout from None
        if not data:
            return None  # the client closed, before or inside a head: nothing to answer
        if deadline is None:
            deadline = loop.time() + ctx.limits.header_timeout_s
        buf += data
    head = buf[:end]
    check_request_head(head)
    if proxy_side and head.startswith(b"CONNECT "):
        head = add_connect_host(head)
    conn.receive_data(head)
    if end < len(buf):
        conn.receive_data(buf[end:])
    event = conn.next_event()
    if not isinstance(event, h11.Request):
        raise h11.RemoteProtocolError("not a request head")
    return event, head


async def serve_http(ctx: Context, stream: Stream, tunnel: TunnelDest | None) -> ConnectRequest | None:
    """Serve requests on `stream` until it closes; `tunnel` binds them to an intercepted CONNECT's target.

    Returns the CONNECT that ended it on the proxy side, if one did.
    """
    limits = ctx.limits
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
    while True:
        try:
            got = await read_head(ctx, conn, stream, proxy_side=tunnel is None)
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if exc.error_status_hint in (400, 414, 431) else 400
            await ctx.refuse(stream, status, f"malformed request: {exc}")
            return None
        except FramingError as exc:
            ctx.count("smuggling_refused", 1)
            await ctx.refuse(stream, 400, f"ambiguous message framing: {exc}")
            return None
        except HeadTooLarge:
            await ctx.refuse(stream, 431, "request head too large")
            return None
        except HeadTimeout:
            await ctx.refuse(stream, 408, "request head not received in time")
            return None
        if got is None:
            return None
        request, head = got
        ctx.count("requests", 1)
        if request.http_version not in (b"1.0", b"1.1"):
            await ctx.refuse(stream, 505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
            return None
        if len(request.target) > limits.max_request_line:
            await ctx.refuse(stream, 414, "request line too long")
            return None
        # h11 bounds only a head that arrives in pieces; one that arrives whole is measured here.
        head_bytes = len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)
        if len(request.headers) > limits.max_header_count or head_bytes > limits.max_header_bytes:
            await ctx.refuse(stream, 431, "too many header fields")
            return None
        if request.method == b"CONNECT":
            if tunnel is not None:
                await ctx.refuse(stream, 400, "CONNECT inside a tunnel")
                return None
            return ConnectRequest(conn, request)
        keep = await handle_request(ctx, conn, stream, request, head, tunnel)
        if not keep or conn.their_state is not h11.DONE:
            return None
        # A kept exchange whose answer this parser never sent was answered whole by forward.py
        # without h11 (wire.py's path, an HTTP/1.1 keep-alive client): a fresh parser takes the next.
        answered_raw = conn.our_state is h11.SEND_RESPONSE
        if conn.our_state is not h11.DONE and not answered_raw:
            return None
        # Bytes read past this request are the start of the next head: back to the stream, so
        # read_head sees them raw, and a fresh parser for them (h11 never holds a head unchecked).
        leftover = conn.trailing_data[0]
        if leftover or answered_raw:
            if leftover:
                stream.push_back(leftover)
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        else:
            conn.start_next_cycle()
