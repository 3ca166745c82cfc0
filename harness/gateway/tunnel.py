"""Byte-for-byte relay between a client and an upstream: the CONNECT hot path.

Large reads, no per-byte work, a drain only when the peer's buffer is actually backed up, and
half-close so request/response protocols over the tunnel see EOF the way they would direct.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from harness.gateway.streams import READ_CHUNK
from harness.gateway.toxics import Link, send_plan

# Let the kernel and transport absorb this much before waiting on the slower side.
WRITE_HIGH_WATER = 1024 * 1024


class _Activity:
    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = time.monotonic()


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    activity: _Activity,
    idle_timeout_s: float,
    counter: list[int],
    index: int,
    link: Link | None = None,
) -> None:
    transport = writer.transport
    transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
    while True:
        try:
            async with asyncio.timeout(idle_timeout_s):
                data = await reader.read(READ_CHUNK)
        except TimeoutError:
            # Idle only if the other direction was idle too (a long download has a quiet uplink).
            if time.monotonic() - activity.last < idle_timeout_s:
                continue
            raise
        if not data:
            if link is not None and link.registry.active:
                await link.before_close()  # slow_close, timeout
            if writer.can_write_eof() and not transport.is_closing():
                with contextlib.suppress(OSError):
                    writer.write_eof()
            return
        counter[index] += len(data)
        activity.last = time.monotonic()
        if link is not None and link.registry.active:
            # A toxic is on somewhere: this chunk goes through the link's plan (one check when none is).
            if not await send_plan(link.plan(data), writer.write, writer.drain, link.ctl):
                return
        else:
            writer.write(data)
        if transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            await writer.drain()


async def relay(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    up_r: asyncio.StreamReader,
    up_w: asyncio.StreamWriter,
    idle_timeout_s: float,
    counter: list[int],
    links: tuple[Link, Link] | None = None,
) -> None:
    """Relay until both directions end; counter becomes [bytes_up, bytes_down].

    links: the (upstream, downstream) toxic links of this connection, if toxics may apply.
    """
    activity = _Activity()
    up_link, down_link = links if links is not None else (None, None)
    up = asyncio.ensure_future(_pump(client_r, up_w, activity, idle_timeout_s, counter, 0, up_link))
    down = asyncio.ensure_future(_pump(up_r, client_w, activity, idle_timeout_s, counter, 1, down_link))
    try:
        done, _pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            exc = task.exception()
            if exc is not None:
                raise exc
    finally:
        for task in (up, down):
            if not task.done():
                task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        if up_link is not None:
            up_link.ctl.cancel_timers()
