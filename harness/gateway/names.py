"""Hostname and authority normalisation: the one place that decides what a destination *is*.

Policy matching, credential binding, SNI checks and leaf certificates all compare normalised
names, so a look-alike spelling (case, trailing dot, Unicode, odd IPv4 forms) can never match
one check and slip past another.
"""

from __future__ import annotations

import functools
import ipaddress
import re

MAX_HOSTNAME_LEN = 253
MAX_PORT = 65535
AUTHORITY_CACHE_SIZE = 1024
"""Authorities whose parse is remembered: a keep-alive client names the same few hosts on every
request, and parsing one (ipaddress, idna, label checks) was about 3% of a proxied 1 KiB request.
Bounded, so a guest naming a new host each time only evicts; a refused authority is never cached."""

# Letters, digits, hyphen and (for real-world names like _dmarc) underscore; no empty labels.
_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
# A last label that a resolver could read as a number (127.1, 0x7f.1, 2130706433) turns a
# "hostname" into an IP literal behind the policy's back, so such names are refused outright.
_NUMERIC_LABEL_RE = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")

DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443}

IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
"""Deprecated IPv4-compatible IPv6 (::a.b.c.d): an IPv4 address in IPv6 clothing that no stack routes."""
NAT64_PREFIXES = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
"""NAT64 prefixes (RFC 6052, 8215): a translator turns 64:ff9b::a.b.c.d into a connection to a.b.c.d."""

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class HostError(ValueError):
    """A host or authority that cannot be normalised; the request is refused with 400."""


def is_ip(host: str) -> bool:
    """True for a normalised IP literal (as returned by normalise_host)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def canonical_address(ip: Address) -> Address:
    """The one form of an address that every rule and protection check sees, and that is dialled.

    An IPv4-mapped IPv6 address (::ffff:a.b.c.d, in any spelling) is the IPv4 address: the kernel
    connects to a.b.c.d, so a CIDR rule about a.b.c.d must see it. The unspecified addresses
    (0.0.0.0, ::) connect to the host's own loopback, so they are loopback.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.is_unspecified:
            return ipaddress.IPv6Address("::1")
    if isinstance(ip, ipaddress.IPv4Address) and ip.is_unspecified:
        return ipaddress.IPv4Address("127.0.0.1")
    return ip


def embedded_ipv4(ip: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for where a stack or translator would reach it
    (IPv4-compatible, NAT64), else None. Mapped addresses are already IPv4 (canonical_address)."""
    if isinstance(ip, ipaddress.IPv6Address) and (ip in IPV4_COMPATIBLE or any(ip in net for net in NAT64_PREFIXES)):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def normalise_address(text: str) -> str:
    """An IP literal in its canonical form (canonical_address). Raises HostError for a literal whose
    meaning depends on something the policy cannot see: a zone id, or an IPv4 address inside IPv6
    (IPv4-compatible, NAT64) that a translator would reach behind a CIDR rule's back."""
    if "%" in text:
        raise HostError(f"IPv6 zone ids are not allowed: {text!r}")
    ip = canonical_address(ipaddress.ip_address(text))
    if ip.version == 6 and not ip.is_loopback and embedded_ipv4(ip) is not None:
        raise HostError(f"IPv6 literal embedding an IPv4 address: use the IPv4 form, not {text!r}")
    return str(ip)


def normalise_host(raw: str) -> str:
    """Return the canonical form of a host: lower-case ASCII (punycode) name or an IP literal.

    IPv6 literals may come bracketed. IP literals are canonical (normalise_address): ::ffff:127.0.0.1
    is 127.0.0.1 and 0.0.0.0 is 127.0.0.1. Raises HostError for anything that is not a clean name.
    """
    host = raw.strip()
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise HostError(f"bad IPv6 literal {raw!r}") from exc
        return normalise_address(host[1:-1])
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return normalise_address(host)
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise HostError("empty host")
    if not host.isascii():
        try:
            # The idna codec applies nameprep (case folding, NFKC), so full-width or mixed-case
            # Unicode spellings collapse to the same punycode name.
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise HostError(f"bad internationalised name {raw!r}") from exc
    host = host.lower()
    if len(host) > MAX_HOSTNAME_LEN:
        raise HostError("host name too long")
    labels = host.split(".")
    for label in labels:
        if not _LABEL_RE.match(label):
            raise HostError(f"bad host name {raw!r}")
    if _NUMERIC_LABEL_RE.match(labels[-1]):
        raise HostError(f"ambiguous numeric host {raw!r}")
    return host


def parse_port(raw: str) -> int:
    if not raw.isdigit() or len(raw) > 5:
        raise HostError(f"bad port {raw!r}")
    port = int(raw)
    if not 0 < port <= MAX_PORT:
        raise HostError(f"port out of range {raw!r}")
    return port


def split_authority(authority: str) -> tuple[str, str | None]:
    """Split 'host', 'host:port', '[v6]' or '[v6]:port' into (host, port-or-None), unvalidated."""
    if "@" in authority:
        raise HostError("userinfo is not allowed in an authority")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise HostError(f"bad authority {authority!r}")
        host, rest = authority[: end + 1], authority[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise HostError(f"bad authority {authority!r}")
        return host, rest[1:]
    if authority.count(":") > 1:
        raise HostError(f"unbracketed IPv6 authority {authority!r}")
    host, sep, port = authority.partition(":")
    return host, (port if sep else None)


@functools.lru_cache(maxsize=AUTHORITY_CACHE_SIZE)
def parse_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """Normalise an authority to (host, port); the port is required when default_port is None."""
    host_raw, port_raw = split_authority(authority)
    host = normalise_host(host_raw)
    if port_raw is None:
        if default_port is None:
            raise HostError(f"authority {authority!r} has no port")
        return host, default_port
    return host, parse_port(port_raw)


def format_authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
