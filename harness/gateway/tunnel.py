"""Byte-for-byte relay between a client and an upstream: the CONNECT hot path.

For the tunnel's life each transport gets a relay protocol in place of its stream reader: what one
side receives is written to the other from the loop's data callback, with no task woken, no
future and no timer per chunk (the stream-based relay spent most of a small TLS exchange on that
machinery). Back-pressure is the transports' own: a side whose write buffer passes its high-water
mark pauses reading on the other. EOF is half-closed through, so request/response protocols over
the tunnel see it the way they would direct. While a toxic is on, each chunk goes through its link's
plan in a task instead, with the source paused until the plan has been played.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

from harness.gateway.streams import PlainStream
from harness.gateway.toxics import Link, send_plan

# Let the kernel and transport absorb this much before pausing the other side's reads.
WRITE_HIGH_WATER = 1024 * 1024


class _Side(asyncio.Protocol):
    """One transport's protocol during a tunnel: what arrives on it goes to the other side's transport."""

    def __init__(self, tunnel: _Tunnel, stream: PlainStream, index: int, link: Link | None) -> None:
        self.tunnel = tunnel
        """The tunnel this side belongs to."""
        self.transport: asyncio.Transport = stream.writer.transport  # type: ignore[assignment]
        """The transport this side reads from (and the other side writes to)."""
        self.index = index
        """Which counter its bytes go to: 0 up (from the sandbox), 1 down."""
        self.link = link
        """The toxic link of the direction this side's bytes travel, if toxics may apply."""
        self.other: _Side = self
        """The side whose transport this side's bytes are written to (set once both exist)."""
        self.ended = False
        """EOF arrived here and was passed on (or the connection is gone)."""
        self.writable = asyncio.Event()
        """Set while this transport's write buffer is under its high-water mark."""
        self.writable.set()
        self._slow: deque[bytes | None] | None = None  # chunks (None: EOF) waiting for a toxic's plan
        self._worker: asyncio.Task[None] | None = None

    # ---- asyncio.Protocol --------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        tunnel.counter[self.index] += len(data)
        tunnel.last = time.monotonic()
        if self._slow is not None or (self.link is not None and self.link.registry.active):
            self._enqueue(data)
            return
        self.other.transport.write(data)

    def eof_received(self) -> bool:
        if self._slow is not None or (self.link is not None and self.link.registry.active):
            self._enqueue(None)
        else:
            self._pass_eof()
        return True  # keep the transport open for the other direction

    def pause_writing(self) -> None:
        # This transport cannot take more: stop reading what would be written to it.
        self.writable.clear()
        with contextlib.suppress(Exception):
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writable.set()
        if self.other._worker is None:  # a toxic's plan resumes reading itself when it is done
            with contextlib.suppress(Exception):
                self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()
        self.tunnel.finish(exc)

    # ---- EOF and the toxics' slow path ---------------------------------------------------------
    def _pass_eof(self) -> None:
        dst = self.other.transport
        if dst.can_write_eof() and not dst.is_closing():
            with contextlib.suppress(OSError):
                dst.write_eof()
        self.ended = True
        self.tunnel.side_ended()

    def _enqueue(self, item: bytes | None) -> None:
        if self._slow is None:
            self._slow = deque()
        self._slow.append(item)
        with contextlib.suppress(Exception):
            self.transport.pause_reading()
        if self._worker is None:
            self._worker = asyncio.ensure_future(self._play())

    async def _play(self) -> None:
        """Play queued chunks through the link's plan, in order; reading resumes once the queue is empty."""
        assert self.link is not None and self._slow is not None
        link, queue, dst = self.link, self._slow, self.other
        try:
            while queue:
                item = queue.popleft()
                if item is None:
                    await link.before_close()  # slow_close, timeout
                    self._pass_eof()
                    continue
                if not await send_plan(link.plan(item), dst.transport.write, dst.drain, link.ctl):
                    self.tunnel.finish(None)
                    return
            self._slow = None
            with contextlib.suppress(Exception):
                self.transport.resume_reading()
        except Exception as exc:
            self.tunnel.finish(exc)
        finally:
            self._worker = None

    async def drain(self) -> None:
        """Wait until this side's transport has room (a toxic's plan writes to it, then waits here)."""
        if self.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            await self.writable.wait()

    def cancel(self) -> None:
        if self._worker is not None:
            self._worker.cancel()


class _Tunnel:
    """Both sides of one relay and how it ends: both directions at EOF, a connection lost, or idleness."""

    def __init__(self, counter: list[int]) -> None:
        self.counter = counter
        """[bytes_up, bytes_down], counted as they arrive."""
        self.last = time.monotonic()
        """When the last byte moved, either way."""
        self.sides: tuple[_Side, ...] = ()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Resolved (or failed) when the relay is over."""

    def side_ended(self) -> None:
        if all(side.ended for side in self.sides):
            self.finish(None)

    def finish(self, exc: BaseException | None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)


def _take_over(stream: PlainStream, side: _Side) -> tuple[bytes, bool]:
    """Give the stream's transport to `side`; returns what the stream held unread and whether it saw EOF."""
    held, eof = stream.detach_reader()
    side.transport.set_protocol(side)
    side.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
    return held, eof


async def relay(
    client: PlainStream,
    upstream: PlainStream,
    idle_timeout_s: float,
    counter: list[int],
    links: tuple[Link, Link] | None = None,
) -> None:
    """Relay until both directions end; counter becomes [bytes_up, bytes_down].

    links: the (upstream, downstream) toxic links of this connection, if toxics may apply.
    Raises TimeoutError after idle_timeout_s with no byte either way, or the error that broke a side.
    """
    tunnel = _Tunnel(counter)
    up_link, down_link = links if links is not None else (None, None)
    from_client = _Side(tunnel, client, 0, up_link)
    from_upstream = _Side(tunnel, upstream, 1, down_link)
    from_client.other, from_upstream.other = from_upstream, from_client
    tunnel.sides = (from_client, from_upstream)
    held: list[tuple[_Side, bytes, bool]] = []
    for stream, side in ((client, from_client), (upstream, from_upstream)):
        data, eof = _take_over(stream, side)
        held.append((side, data, eof))
    for side, data, eof in held:
        if data:
            side.data_received(data)
        if eof:
            side.eof_received()
        with contextlib.suppress(Exception):
            side.transport.resume_reading()  # the stream reader may have paused it over its limit
    try:
        while True:
            wait = tunnel.last + idle_timeout_s - time.monotonic()
            if wait <= 0:
                # Idle only if neither direction moved (a long download has a quiet uplink).
                raise TimeoutError(f"tunnel idle for {idle_timeout_s} s")
            with contextlib.suppress(TimeoutError):
                # The timer is armed once per idle period, not once per chunk as a read timeout would be.
                await asyncio.wait_for(asyncio.shield(tunnel.done), wait)
                return
    finally:
        # An error that arrives after the relay stopped waiting is the connection's end, already handled.
        tunnel.done.add_done_callback(lambda done: done.cancelled() or done.exception())
        for side in tunnel.sides:
            side.cancel()
        if up_link is not None:
            up_link.ctl.cancel_timers()
