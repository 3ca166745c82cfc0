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
import re
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


def find(forms: tuple[KeyForm, ...], data: bytes) -> KeyForm | None:
    """The first of forms that occurs in data."""
    for form in forms:
        if form.pattern in data:
            return form
    return None


def _proper_prefixes(pattern: bytes) -> bytes:
    """A regex matching every proper prefix of pattern, as nested optional groups (anchored by the caller)."""
    inner = b""
    for byte in reversed(pattern[1:-1]):
        inner = re.escape(bytes([byte])) + (b"(?:" + inner + b")?" if inner else b"")
    return re.escape(pattern[:1]) + (b"(?:" + inner + b")?" if inner else b"")


class Forms:
    """A set of key forms, with what searching a stream for them needs, computed once per set."""

    __slots__ = ("_partial", "forms", "keep")

    def __init__(self, forms: tuple[KeyForm, ...]) -> None:
        self.forms = forms
        """The forms, in search order."""
        self.keep = max(len(f.pattern) for f in forms) - 1
        """The most bytes of a form that can end a read without the form being whole."""
        self._partial = re.compile(b"(?:" + b"|".join(_proper_prefixes(f.pattern) for f in forms) + rb")\Z")

    def find(self, data: bytes) -> KeyForm | None:
        """The first form that occurs in data."""
        return find(self.forms, data)

    def partial_len(self, tail: bytes) -> int:
        """The length of the longest end of tail that some form begins with (0: none); one C-level search."""
        match = self._partial.search(tail)
        return len(tail) - match.start() if match is not None else 0


class KnownKeys:
    """Every form of every key the gateway holds, and the sets of them each destination is searched for."""

    def __init__(self, keys: list[tuple[str, str, tuple[str, int]]]) -> None:
        """keys: (credential name, secret, bound host:port) of each secret present on this host."""
        forms: dict[bytes, KeyForm] = {}
        for name, secret, bound in keys:
            raw = secret.encode()
            for encoding, make in KEY_FORMS:
                for pattern in make(raw):
                    forms.setdefault(pattern, KeyForm(pattern, name, encoding, bound))
        self.forms: tuple[KeyForm, ...] = tuple(forms.values())
        bounds = {f.bound for f in self.forms}
        self._all = Forms(self.forms) if self.forms else None
        # Only two kinds of set exist: every key's forms, or every key's but one host's own. They are
        # built once here, so no request ever builds one.
        self._all_but: dict[tuple[str, int], Forms | None] = {}
        self._own: dict[tuple[str, int], Forms] = {}
        for bound in bounds:
            others = tuple(f for f in self.forms if f.bound != bound)
            self._all_but[bound] = Forms(others) if others else None
            self._own[bound] = Forms(tuple(f for f in self.forms if f.bound == bound))
        self._names = tuple((f.pattern.lower().decode("ascii"), f) for f in self.forms)

    def __bool__(self) -> bool:
        return bool(self.forms)

    def patterns(self) -> list[str]:
        """Every form as text, for the audit log's scrubber."""
        return [f.pattern.decode("ascii") for f in self.forms]

    def foreign(self, host: str, port: int, verified_tls: bool) -> Forms | None:
        """The forms that must not reach host:port: every key's, but a key's own inside verified TLS
        (None: nothing to search for)."""
        if verified_tls:
            return self._all_but.get((host, port), self._all)
        return self._all

    def own(self, host: str, port: int) -> Forms | None:
        """The forms of the keys bound to host:port: what its answers are scrubbed of."""
        return self._own.get((host, port))

    def find_in_name(self, name: str) -> KeyForm | None:
        """A key in a host name (hex or base32 in a label leaks through DNS before any request is sent).
        Names are compared case-folded and with their dots removed, as a label split would hide them."""
        flat = name.lower().replace(".", "")
        for pattern, form in self._names:
            if pattern in flat:
                return form
        return None


class _HeldTail:
    """A body on its way through, holding back only what could be the start of a key's form.

    A form split across two reads would pass a per-read search. So the bytes at the end of the
    stream that are a proper prefix of some form (usually none) stay until the next read, or the
    end, shows whether the form completes; everything else is released at once, as the chunks it
    arrived in. A streamed answer (server-sent events) is thus not delayed, and the relay copies
    nothing it did not copy before, except to cut a chunk where a possible prefix begins."""

    def __init__(self, forms: Forms) -> None:
        self.forms = forms
        self.keep = forms.keep
        self.tail = b""
        """The stream's last `keep` bytes so far: with the next read's first, the seam to search."""
        self.pending: deque[bytes] = deque()
        self.pending_len = 0

    def search(self, data: bytes) -> KeyForm | None:
        """A form inside data, or across the seam between what came before and data."""
        form = self.forms.find(data)
        if form is not None or not self.tail:
            return form
        return self.forms.find(self.tail + data[: self.keep])

    def push(self, data: bytes) -> list[bytes]:
        """Take data (already searched); return what may go on now."""
        keep = self.keep
        self.tail = data[-keep:] if len(data) >= keep else (self.tail + data)[-keep:]
        self.pending.append(data)
        self.pending_len += len(data)
        excess = self.pending_len - self.forms.partial_len(self.tail)
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

    def __init__(self, forms: Forms) -> None:
        super().__init__(forms)
        self.redactions = 0
        """Forms overwritten so far."""

    def headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """A response's headers, scrubbed (searched as one blob: one pass per form, not per header)."""
        if self.forms.find(b"\n".join(value for _, value in headers)) is None:
            return headers
        return [(name, self._scrub(value)) for name, value in headers]

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
        for form in self.forms.forms:
            if form.pattern in data:
                self.redactions += data.count(form.pattern)
                data = data.replace(form.pattern, REDACTION_BYTE * len(form.pattern))
        return data
