"""Byte streams the proxy speaks HTTP over: plain asyncio streams, or TLS the gateway terminates.

TLS termination uses ssl.SSLObject over memory BIOs rather than asyncio's start_tls, so the
gateway can first peek at the client's first bytes (TLS ClientHello or plain HTTP inside a
CONNECT) and hand them to whichever side needs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct

from harness.gateway.tls import SniResult

READ_CHUNK = 256 * 1024
# Asyncio stream buffer limit: larger means fewer wake-ups per MB in tunnels.
STREAM_LIMIT = 256 * 1024


class PlainStream:
    """asyncio reader/writer with a push-back buffer for bytes read ahead."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._pending = b""

    def push_back(self, data: bytes) -> None:
        self._pending = data + self._pending

    async def read(self, n: int = READ_CHUNK) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        return await self.reader.read(n)

    def detach_reader(self) -> tuple[bytes, bool]:
        """Everything read ahead (pushed back or in the reader's buffer) and whether EOF was seen, for a
        caller that gives the transport a protocol of its own; the stream is not read from again."""
        reader = self.reader
        # StreamReader has no public call for what it holds; its buffer and EOF flag are read once,
        # here, and the reader is never used again.
        held = self._pending + bytes(reader._buffer)
        self._pending = b""
        reader._buffer.clear()
        return held, reader._eof

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def write_buffered(self) -> int:
        """Bytes written but not yet handed to the kernel (the forwarder's back-pressure check)."""
        return int(self.writer.transport.get_write_buffer_size())

    async def drain(self) -> None:
        await self.writer.drain()

    def abort_with_reset(self) -> None:
        """Close with RST (SO_LINGER 0): the 'reset' deny mode's fail-fast answer."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def close(self) -> None:
        if not self.writer.transport.is_closing():
            self.writer.close()


class TlsServerStream:
    """Server-side TLS over a PlainStream, with the leaf context chosen by the caller."""

    def __init__(self, raw: PlainStream, ctx: ssl.SSLContext) -> None:
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=True)
        self._pending = b""

    @property
    def sni(self) -> SniResult | None:
        return getattr(self._obj, "blastradius_sni", None)

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.raw.write(data)
            await self.raw.drain()

    async def handshake(self) -> None:
        while True:
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self.raw.read()
                if not data:
                    raise ConnectionError("client closed during TLS handshake") from None
                self._in.write(data)
            except ssl.SSLError:
                # Send our alert (e.g. unrecognized_name) before the caller closes.
                with contextlib.suppress(OSError):
                    await self._flush()
                raise
        await self._flush()

    def push_back(self, data: bytes) -> None:
        """Decrypted bytes read ahead (the start of a pipelined request), returned by the next read."""
        self._pending = data + self._pending

    async def read(self, n: int = READ_CHUNK) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        while True:
            try:
                return self._obj.read(n)
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self.raw.read()
                if not data:
                    return b""
                self._in.write(data)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def write(self, data: bytes) -> None:
        self._obj.write(data)
        out = self._out.read()
        if out:
            self.raw.write(out)

    def write_buffered(self) -> int:
        return self.raw.write_buffered()

    async def drain(self) -> None:
        await self.raw.drain()

    def abort_with_reset(self) -> None:
        self.raw.abort_with_reset()

    def close(self) -> None:
        with contextlib.suppress(ssl.SSLError):
            self._obj.unwrap()
        out = self._out.read()
        if out and not self.raw.writer.transport.is_closing():
            self.raw.write(out)
        self.raw.close()


Stream = PlainStream | TlsServerStream
