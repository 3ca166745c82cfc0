"""Hostname and authority normalisation: the one place that decides what a destination *is*.

Policy matching, credential binding, SNI checks and leaf certificates all compare normalised
names, so a look-alike spelling (case, trailing dot, Unicode, odd IPv4 forms) can never match
one check and slip past another.
"""

from __future__ import annotations

import ipaddress
import re

MAX_HOSTNAME_LEN = 253
MAX_PORT = 65535

# Letters, digits, hyphen and (for real-world names like _dmarc) underscore; no empty labels.
_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
# A last label that a resolver could read as a number (127.1, 0x7f.1, 2130706433) turns a
# "hostname" into an IP literal behind the policy's back, so such names are refused outright.
_NUMERIC_LABEL_RE = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")

DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443}


class HostError(ValueError):
    """A host or authority that cannot be normalised; the request is refused with 400."""


def is_ip(host: str) -> bool:
    """True for a normalised IP literal (as returned by normalise_host)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def normalise_host(raw: str) -> str:
    """Return the canonical form of a host: lower-case ASCII (punycode) name or an IP literal.

    IPv6 literals may come bracketed. Raises HostError for anything that is not a clean name.
    """
    host = raw.strip()
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError as exc:
            raise HostError(f"bad IPv6 literal {raw!r}") from exc
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
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
