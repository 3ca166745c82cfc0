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
    the request line does not already say.
    """
    line_end = head.find(b"\r\n")
    head_end = head.find(b"\r\n\r\n")
    if line_end < 0 or head_end < 0 or b"\r\nhost:" in head[line_end : head_end + 2].lower():
        return head
    parts = head[:line_end].split(b" ")
    if len(parts) != 3:
        return head
    return head[:line_end] + b"\r\nhost: " + parts[1] + head[line_end:]


async def read_head(ctx: Context, conn: h11.Connection, stream: Stream, proxy_side: bool) -> h11.Request | None:
    """The next request head, or None when the client closes or its keep-alive idles out."""
    loop = asyncio.get_running_loop()
    deadline: float | None = None
    held = b""  # a CONNECT head held back until complete, to give it a Host header
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            if isinstance(event, h11.Request):
                return event
            return None  # ConnectionClosed
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
        if deadline is None:
            deadline = loop.time() + ctx.limits.header_timeout_s
        if proxy_side and conn.their_state is h11.IDLE and (held or data.startswith(b"CONNECT ")):
            held += data
            if b"\r\n\r\n" not in held and data and len(held) <= ctx.limits.max_header_bytes:
                continue
            data, held = add_connect_host(held), b""
        conn.receive_data(data)


async def serve_http(ctx: Context, stream: Stream, tunnel: TunnelDest | None) -> ConnectRequest | None:
    """Serve requests on `stream` until it closes; `tunnel` binds them to an intercepted CONNECT's target.

    Returns the CONNECT that ended it on the proxy side, if one did.
    """
    limits = ctx.limits
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
    while True:
        try:
            request = await read_head(ctx, conn, stream, proxy_side=tunnel is None)
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if exc.error_status_hint in (400, 414, 431) else 400
            await ctx.refuse(stream, status, f"malformed request: {exc}")
            return None
        except HeadTimeout:
            await ctx.refuse(stream, 408, "request head not received in time")
            return None
        if request is None:
            return None
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
        keep = await handle_request(ctx, conn, stream, request, tunnel)
        if not keep or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return None
        conn.start_next_cycle()
