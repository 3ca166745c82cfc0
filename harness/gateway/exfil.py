"""Known-key exfiltration: the gateway holds the real keys, so it can see one leave.

A request that carries one of the keys, raw or encoded, toward any destination other than the key's
own host:port (inside verified TLS) is denied and audited as `credential_exfiltration`. The
gateway can look only where it parses: plain HTTP and requests inside intercepted TLS (target,
headers, body) and the names it is asked to connect to or resolve. Inside a blind tunnel it sees
nothing. The same forms are scrubbed from what a key's own host answers (an echo) and from the
audit log.

Encodings searched (KEY_FORMS): the key itself; base64 and base64url at each of the three alignments a
key can take inside a longer encoded blob; base32 at each of its five; hex in lower and upper case;
percent-encoding of every byte (upper and lower hex) and of the reserved bytes only. Out of scope:
reversal, compression, encryption, mixed-case hex, and any encoding of a part of a key.
"""

from __future__ import annotations

import base64
import binascii
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

EXFIL_EVENT = "credential_exfiltration"
"""The audit event of a request that carries a key away from its host."""
EXFIL_RULE = "credential-exfiltration"
"""The rule its deny names."""
REDACTION_BYTE = b"*"
"""What a key form in an upstream's answer is overwritten with: same length, so framing holds."""
FOREIGN_CACHE_SIZE = 4096
"""Destinations whose foreign-form tuple is remembered (one tuple per host:port and TLS-ness)."""


def _aligned(encode: Callable[[bytes], bytes], key: bytes, group: int, bits: int) -> list[bytes]:
    """The parts of encode(prefix + key) that depend on the key alone, for every prefix length a key
    can follow inside a longer encoded blob (group: bytes per block; bits: bits per output char)."""
    forms = []
    for shift in range(group):
        encoded = encode(b"\0" * shift + key)
        start = -(-shift * 8 // bits)  # the first char holding no prefix bit
        end = (shift + len(key)) * 8 // bits  # past the last char holding only key bits
        forms.append(encoded[start:end])
    return forms


KEY_FORMS: tuple[tuple[str, Callable[[bytes], list[bytes]]], ...] = (
    ("raw", lambda k: [k]),
    ("base64", lambda k: _aligned(base64.b64encode, k, 3, 6)),
    ("base64url", lambda k: _aligned(base64.urlsafe_b64encode, k, 3, 6)),
    ("base32", lambda k: _aligned(base64.b32encode, k, 5, 5)),
    ("hex", lambda k: [binascii.hexlify(k), binascii.hexlify(k).upper()]),
    ("url", lambda k: ["".join(f"%{b:02X}" for b in k).encode(), "".join(f"%{b:02x}" for b in k).encode()]),
    ("url", lambda k: [quote(k, safe="").encode()]),
)
"""Each encoding by name, and the byte strings a key takes in it."""


@dataclass(frozen=True, slots=True)
class KeyForm:
    """One way a key can appear on the wire."""

    pattern: bytes
    """The bytes searched for."""
    credential: str
    """The credential whose key this is (its name, never its value)."""
    encoding: str
    """Which encoding (KEY_FORMS)."""
    bound: tuple[str, int]
    """The one host:port this key may go to, inside verified TLS."""


class KeyLeak(Exception):
    """A request carries a key away from its host; str() says which credential, encoding and where."""

    def __init__(self, form: KeyForm, where: str) -> None:
        super().__init__(f"the {form.credential} key ({form.encoding}) in the {where}")
        self.form = form
        self.where = where


class KnownKeys:
    """Every form of every key the gateway holds."""

    def __init__(self, keys: list[tuple[str, str, tuple[str, int]]]) -> None:
        """keys: (credential name, secret, bound host:port) of each secret present on this host."""
        forms: dict[bytes, KeyForm] = {}
        for name, secret, bound in keys:
            raw = secret.encode()
            for encoding, make in KEY_FORMS:
                for pattern in make(raw):
                    forms.setdefault(pattern, KeyForm(pattern, name, encoding, bound))
        self.forms: tuple[KeyForm, ...] = tuple(forms.values())
        self._by_bound: dict[tuple[str, int], tuple[KeyForm, ...]] = {}
        self._foreign: dict[tuple[str, int, bool], tuple[KeyForm, ...]] = {}
        for form in self.forms:
            self._by_bound[form.bound] = (*self._by_bound.get(form.bound, ()), form)
        self._names = tuple((f.pattern.lower().decode("ascii"), f) for f in self.forms)

    def __bool__(self) -> bool:
        return bool(self.forms)

    def patterns(self) -> list[str]:
        """Every form as text, for the audit log's scrubber."""
        return [f.pattern.decode("ascii") for f in self.forms]

    def foreign(self, host: str, port: int, verified_tls: bool) -> tuple[KeyForm, ...]:
        """The forms that must not reach host:port: every key's, but a key's own inside verified TLS."""
        cache_key = (host, port, verified_tls)
        found = self._foreign.get(cache_key)
        if found is None:
            found = tuple(f for f in self.forms if not (verified_tls and f.bound == (host, port)))
            if len(self._foreign) < FOREIGN_CACHE_SIZE:
                self._foreign[cache_key] = found
        return found

    def own(self, host: str, port: int) -> tuple[KeyForm, ...]:
        """The forms of the keys bound to host:port: what its answers are scrubbed of."""
        return self._by_bound.get((host, port), ())

    def find_in_name(self, name: str) -> KeyForm | None:
        """A key in a host name (hex or base32 in a label leaks through DNS before any request is sent).
        Names are compared case-folded and with their dots removed, as a label split would hide them."""
        flat = name.lower().replace(".", "")
        for pattern, form in self._names:
            if pattern in flat:
                return form
        return None


def find(forms: tuple[KeyForm, ...], data: bytes) -> KeyForm | None:
    """The first form that occurs in data."""
    for form in forms:
        if form.pattern in data:
            return form
    return None


class _HeldTail:
    """A body on its way through, holding back only what could be the start of a key's form.

    A form split across two reads would pass a per-read search. So the bytes at the end of the
    stream that are a proper prefix of some form (usually none) stay until the next read, or the
    end, shows whether the form completes; everything else is released at once, as the chunks it
    arrived in. A streamed answer (server-sent events) is thus not delayed, and the relay copies
    nothing it did not copy before, except to cut a chunk where a possible prefix begins."""

    def __init__(self, forms: tuple[KeyForm, ...]) -> None:
        self.forms = forms
        self.keep = max(len(f.pattern) for f in forms) - 1
        self.tail = b""
        """The stream's last `keep` bytes so far: with the next read's first, the seam to search."""
        self.pending: deque[bytes] = deque()
        self.pending_len = 0

    def search(self, data: bytes) -> KeyForm | None:
        """A form inside data, or across the seam between what came before and data."""
        form = find(self.forms, data)
        return form if form is not None else find(self.forms, self.tail + data[: self.keep])

    def _prefix_len(self) -> int:
        """The length of the longest end of the stream that a form begins with (0: none)."""
        tail = self.tail
        best = 0
        for form in self.forms:
            pattern = form.pattern
            i = tail.find(pattern[:1], max(0, len(tail) - len(pattern) + 1))
            while i >= 0 and len(tail) - i > best:
                if pattern.startswith(tail[i:]):
                    best = len(tail) - i
                    break
                i = tail.find(pattern[:1], i + 1)
        return best

    def push(self, data: bytes) -> list[bytes]:
        """Take data (already searched); return what may go on now."""
        keep = self.keep
        self.tail = data[-keep:] if len(data) >= keep else (self.tail + data)[-keep:]
        self.pending.append(data)
        self.pending_len += len(data)
        excess = self.pending_len - self._prefix_len()
        out = []
        while excess > 0:
            first = self.pending[0]
            if len(first) <= excess:
                self.pending.popleft()
                out.append(first)
            else:
                out.append(first[:excess])
                self.pending[0] = first[excess:]
            taken = len(out[-1])
            excess -= taken
            self.pending_len -= taken
        return out

    def flush(self) -> list[bytes]:
        """Everything held, at the end of the body (already searched)."""
        out = list(self.pending)
        self.pending.clear()
        self.pending_len = 0
        return out


class BodyScanner(_HeldTail):
    """Scans a request body on its way upstream; raises KeyLeak before a byte of a key leaves."""

    def feed(self, data: bytes) -> list[bytes]:
        """The chunks that may go upstream now."""
        form = self.search(data)
        if form is not None:
            raise KeyLeak(form, "body")
        return self.push(data)


class Scrubber(_HeldTail):
    """Overwrites a key's forms in an upstream's answer, with the same number of bytes so that
    Content-Length and chunk sizes stay true."""

    def __init__(self, forms: tuple[KeyForm, ...]) -> None:
        super().__init__(forms)
        self.redactions = 0
        """Forms overwritten so far."""

    def header(self, value: bytes) -> bytes:
        """A response header's value, scrubbed."""
        return self._scrub(value)

    def feed(self, data: bytes) -> list[bytes]:
        """The scrubbed chunks that may go to the sandbox now."""
        if self.search(data) is None:
            return self.push(data)
        # A form is here: every byte it can span is still held, so scrub them together.
        merged = self._scrub(b"".join(self.pending) + data)
        self.pending.clear()
        self.pending_len = 0
        self.tail = b""
        return self.push(merged)

    def _scrub(self, data: bytes) -> bytes:
        for form in self.forms:
            if form.pattern in data:
                self.redactions += data.count(form.pattern)
                data = data.replace(form.pattern, REDACTION_BYTE * len(form.pattern))
        return data
