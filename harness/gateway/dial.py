"""Opening upstream connections: host-side resolution overrides and host protection.

Overrides change only where the TCP connection goes. Everything else (policy, credential
binding, SNI, certificate verification) keeps using the real name, so a test that points
api.anthropic.com:443 at a loopback server exercises exactly the production code path.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from dataclasses import dataclass

from harness.gateway.errors import SetupError
from harness.gateway.names import HostError, canonical_address, embedded_ipv4, is_ip, parse_port, split_authority
from harness.gateway.streams import STREAM_LIMIT, PlainStream


class DialError(Exception):
    """The upstream could not be reached; the client gets 502 (or 504 on timeout)."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


class OverrideError(SetupError):
    """An upstream override that does not parse."""


@dataclass(frozen=True)
class Target:
    address: str
    port: int
    overridden: bool


class Overrides:
    """Host-side resolution table. Keys: 'host:port', 'host', '*:port', '*'. Most specific wins."""

    def __init__(self, table: dict[str, str]) -> None:
        self._table: dict[tuple[str, int | None], tuple[str, int | None]] = {}
        for key, value in table.items():
            try:
                k_host, k_port = split_authority(key)
                v_host, v_port = split_authority(value)
                v_host = v_host.strip("[]")
                if not is_ip(v_host):
                    raise HostError("the address must be an IP literal")
                self._table[(k_host.lower().rstrip("."), parse_port(k_port) if k_port else None)] = (
                    v_host,
                    parse_port(v_port) if v_port else None,
                )
            except HostError as exc:
                raise OverrideError(
                    f"override {key}={value}: {exc}; "
                    "write HOST[:PORT]=ADDR[:PORT], e.g. api.anthropic.com:443=127.0.0.1:8443"
                ) from None

    def lookup(self, host: str, port: int) -> Target | None:
        for key in ((host, port), (host, None), ("*", port), ("*", None)):
            hit = self._table.get(key)
            if hit is not None:
                return Target(hit[0], hit[1] or port, overridden=True)
        return None

    def address_for(self, host: str) -> str | None:
        """The override address for a name on any port (the DNS resolver's answer)."""
        for (k_host, _), (addr, _) in self._table.items():
            if k_host == host:
                return addr
        return None


METADATA_ADDRESSES = (ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"))
"""Cloud metadata services; the IPv4 one is link-local already, AWS's IPv6 one is a unique-local address."""


def is_protected_address(addr: str) -> bool:
    """Addresses a *name* must never lead to: the host itself and cloud metadata.

    A sandbox allowed to reach some.name must not reach host services by pointing that name's
    DNS at 127.0.0.1 (FINDINGS probe 2). The address is judged in its canonical form and by any
    IPv4 address it stands for, so ::ffff:127.0.0.1, ::, 64:ff9b::7f00:1 or ::127.0.0.1 in a DNS
    answer are the loopback they reach. IP literals are governed by CIDR rules instead.
    """
    ip = canonical_address(ipaddress.ip_address(addr.partition("%")[0]))
    for candidate in (ip, embedded_ipv4(ip)):
        if candidate is None:
            continue
        if candidate.is_loopback or candidate.is_link_local or candidate.is_unspecified or candidate.is_multicast:
            return True
        if candidate in METADATA_ADDRESSES:
            return True
    return False


async def resolve(host: str, port: int, overrides: Overrides) -> Target:
    """Where a connection to host:port goes: an override, the literal itself, or the first answer of the
    host's resolver that is not protected, in canonical form. The address returned is the one dialled."""
    override = overrides.lookup(host, port)
    if override is not None:
        return override
    if is_ip(host):
        return Target(host, port, overridden=False)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise DialError(f"cannot resolve {host}: {exc.strerror or exc}") from exc
    for _family, _type, _proto, _canon, sockaddr in infos:
        addr = str(sockaddr[0])
        if not is_protected_address(addr):
            return Target(str(canonical_address(ipaddress.ip_address(addr))), port, overridden=False)
    raise DialError(f"{host} resolves only to protected addresses")


async def open_upstream(
    host: str,
    port: int,
    overrides: Overrides,
    timeout_s: float,
    tls: ssl.SSLContext | None = None,
) -> PlainStream:
    target = await resolve(host, port, overrides)
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(
                target.address,
                target.port,
                ssl=tls,
                server_hostname=host if tls is not None else None,
                limit=STREAM_LIMIT,
            )
    except TimeoutError as exc:
        raise DialError(f"timed out connecting to {host}:{port}", status=504) from exc
    except ssl.SSLError as exc:
        raise DialError(f"TLS to {host}:{port} failed: {exc.reason or exc}") from exc
    except OSError as exc:
        raise DialError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return PlainStream(reader, writer)
