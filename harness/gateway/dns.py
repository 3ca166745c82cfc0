"""Policy-gated DNS: the optional resolver a guest may use, reachable only through the gateway.

By default a guest has no resolver at all (the gateway resolves names for the requests it
forwards). When enabled, each sandbox gets a DNS port (UDP and TCP) that answers names some
allow rule covers and REFUSES every other, so a blocked name never resolves in the guest and
DNS cannot be used as a side channel for data (FINDINGS probe 5).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct

from harness.gateway.audit import AuditRecord
from harness.gateway.names import HostError, is_ip, normalise_host
from harness.gateway.state import GatewayState

log = logging.getLogger(__name__)

QTYPE_A = 1
QTYPE_AAAA = 28
QCLASS_IN = 1
RCODE_OK = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_REFUSED = 5
ANSWER_TTL_S = 30
MAX_DNS_MESSAGE = 4096
TCP_READ_TIMEOUT_S = 5.0
BIND_ATTEMPTS = 20
QTYPE_NAMES = {QTYPE_A: "A", QTYPE_AAAA: "AAAA"}


class DnsFormatError(ValueError):
    pass


def parse_query(msg: bytes) -> tuple[int, int, str, int, int, bytes]:
    """(id, flags, qname, qtype, qclass, raw question) of a one-question query."""
    if len(msg) < 12:
        raise DnsFormatError("short message")
    qid, flags, qdcount = struct.unpack("!HHH", msg[:6])
    if qdcount != 1 or flags & 0x8000:
        raise DnsFormatError("expected one question in a query")
    labels: list[str] = []
    pos = 12
    while True:
        if pos >= len(msg):
            raise DnsFormatError("truncated name")
        length = msg[pos]
        pos += 1
        if length == 0:
            break
        if length & 0xC0:
            raise DnsFormatError("compression in a question")
        label = msg[pos : pos + length]
        if len(label) != length:
            raise DnsFormatError("truncated label")
        labels.append(label.decode("ascii", "strict"))
        pos += length
    if pos + 4 > len(msg):
        raise DnsFormatError("truncated question")
    qtype, qclass = struct.unpack("!HH", msg[pos : pos + 4])
    return qid, flags, ".".join(labels), qtype, qclass, msg[12 : pos + 4]


def build_response(qid: int, flags: int, question: bytes, rcode: int, answers: list[tuple[int, bytes]]) -> bytes:
    # QR=1, keep opcode and RD from the query, RA=1.
    out_flags = 0x8000 | (flags & 0x7900) | 0x0080 | rcode
    head = struct.pack("!HHHHHH", qid, out_flags, 1 if question else 0, len(answers), 0, 0)
    body = question
    for qtype, rdata in answers:
        # 0xC00C: a pointer to the question's name at offset 12.
        body += struct.pack("!HHHIH", 0xC00C, qtype, QCLASS_IN, ANSWER_TTL_S, len(rdata)) + rdata
    return head + body


class DnsServer:
    def __init__(self, state: GatewayState, sandbox: str) -> None:
        self.state = state
        self.sandbox = sandbox
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    async def start(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(BIND_ATTEMPTS):
            tcp = await asyncio.start_server(self._serve_tcp, host, 0)
            port = tcp.sockets[0].getsockname()[1]
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=(host, port), family=socket.AF_INET
                )
            except OSError:
                tcp.close()
                continue
            self._tcp, self._udp, self.port = tcp, transport, port  # type: ignore[assignment]
            return
        raise OSError("could not bind a DNS port for both UDP and TCP")

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()

    async def answer(self, msg: bytes) -> bytes | None:
        try:
            qid, flags, qname, qtype, qclass, question = parse_query(msg)
        except (DnsFormatError, UnicodeDecodeError):
            if len(msg) >= 2:
                return build_response(struct.unpack("!H", msg[:2])[0], 0, b"", RCODE_FORMERR, [])
            return None
        qtype_name = QTYPE_NAMES.get(qtype, str(qtype))
        try:
            host = normalise_host(qname)
        except HostError:
            return self._decide(qid, flags, question, RCODE_REFUSED, [], qname, qtype_name, "bad-name")
        if is_ip(host) or qclass != QCLASS_IN or not self.state.policy.names_allowed(host):
            return self._decide(qid, flags, question, RCODE_REFUSED, [], host, qtype_name, "not-allowed")
        if qtype not in (QTYPE_A, QTYPE_AAAA):
            return self._decide(qid, flags, question, RCODE_OK, [], host, qtype_name, None)
        try:
            addrs = await self._resolve(host)
        except OSError:
            return self._decide(qid, flags, question, RCODE_SERVFAIL, [], host, qtype_name, "resolve-failed")
        answers = []
        for addr in addrs:
            ip = ipaddress.ip_address(addr)
            if (qtype == QTYPE_A and ip.version == 4) or (qtype == QTYPE_AAAA and ip.version == 6):
                answers.append((qtype, ip.packed))
        return self._decide(qid, flags, question, RCODE_OK, answers, host, qtype_name, None)

    async def _resolve(self, host: str) -> list[str]:
        override = self.state.overrides.address_for(host)
        if override is not None:
            return [override]
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        return sorted({str(info[4][0]) for info in infos})

    def _decide(
        self,
        qid: int,
        flags: int,
        question: bytes,
        rcode: int,
        answers: list[tuple[int, bytes]],
        host: str,
        qtype: str,
        reason: str | None,
    ) -> bytes:
        allowed = rcode != RCODE_REFUSED
        self.state.stats["dns_answered" if allowed else "dns_refused"] += 1
        self.state.audit.write(
            AuditRecord(
                event="dns",
                sandbox=self.sandbox,
                decision="allow" if allowed else "deny",
                method=qtype,
                scheme="dns",
                host=host,
                rule=None if allowed else "dns-policy",
                status=rcode,
                reason=reason,
            )
        )
        return build_response(qid, flags, question, rcode, answers)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                async with asyncio.timeout(TCP_READ_TIMEOUT_S):
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    msg = await reader.readexactly(size)
                reply = await self.answer(msg)
                if reply is None:
                    return
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) > MAX_DNS_MESSAGE:
            return
        task = asyncio.ensure_future(self._reply(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = await self.server.answer(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)
