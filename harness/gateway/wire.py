"""A forwarded request's common case, written and read without h11's per-event machinery.

h11 spent about 150 µs of CPU per request on the upstream connection (building and sending the
request, parsing the answer's head) and about 75 µs writing the answer to the sandbox: together
about half of the gateway's CPU per proxied 1 KiB GET. The common case is a request without a body
answered with one Content-Length, so only that case is taken here, and only when it is exactly what
h11 would send and accept:

- the request head is written as h11 writes it (Host first), and sent only when it has exactly the
  lines written and every part is within h11's own grammar (h11._abnf): nothing goes out that h11
  would have refused to send;
- the answer's head must match h11's grammar as a whole and parse under httptools (llhttp, strict:
  no folding, no bare LF, no space before a colon); anything else -- a 1xx, a HEAD, a 204 or 304,
  chunked or close-delimited bodies, a Transfer-Encoding, two lengths, another version -- goes to
  h11 with the bytes as read (forward.py), so h11 judges it exactly as before;
- such an answer goes to an HTTP/1.1 keep-alive client as h11 writes it (h11 changes no header of a
  Content-Length answer to such a client), unless a key must be scrubbed from it.

The sandbox's request itself is still parsed by h11, after framing.py's checks on the raw head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httptools
from h11 import _abnf

# h11's grammar for whole heads, built from its own pieces: one match per head instead of two per field.
_FIELD = f"(?:{_abnf.token}):[ \t]*(?:{_abnf.field_value})[ \t]*\r\n"
_SENT_FIELD = f"(?:{_abnf.token}): (?:{_abnf.field_value})\r\n"
_REQUEST_HEAD = re.compile(
    f"(?:{_abnf.token}) (?:{_abnf.request_target}) HTTP/1\\.1\r\n(?:{_SENT_FIELD})*\r\n".encode()
)
"""A request head as request_head writes it, every part within h11's grammar (no padding around a value,
as h11 refuses to send one)."""
_ANSWER_HEAD = re.compile(f"HTTP/1\\.[01] [0-9]{{3}} (?:{_abnf.reason_phrase})\r\n(?:{_FIELD})*\r\n".encode())
"""An answer head (status line and fields) within h11's grammar, HTTP/1.0 or 1.1."""
_NO_BODY_STATUSES = (204, 304)


def request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The head h11 would write for this bodiless request (Host first), or None when any part is
    outside h11's grammar (the caller then lets h11 send it, and refuse it as before)."""
    host: list[bytes] = []
    rest: list[bytes] = []
    for name, value in headers:
        line = b"%s: %s\r\n" % (name, value)
        (host if name.lower() == b"host" else rest).append(line)
    if len(host) != 1:
        return None  # h11 insists on exactly one Host in HTTP/1.1
    head = b"%s %s HTTP/1.1\r\n%s%s\r\n" % (method, target, host[0], b"".join(rest))
    # A CRLF inside a value would pass the grammar as a line of its own (a header injected): the head
    # must have exactly the lines written, the request line, one per field and the blank one.
    if head.count(b"\r\n") != len(headers) + 2 or not _REQUEST_HEAD.fullmatch(head):
        return None
    return head


def response_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The head h11 writes for this answer to an HTTP/1.1 keep-alive client when the answer is framed by
    its one Content-Length (h11 then changes no header), or None if it carries a Host (h11 would move it
    first). `headers` come from a FixedAnswer, so they are already within h11's grammar."""
    lines = []
    for name, value in headers:
        if name == b"host":
            return None
        lines.append(b"%s: %s\r\n" % (name, value))
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, b"".join(lines))


@dataclass(slots=True)
class FixedAnswer:
    """An answer head that qualified for the fast path: a final status and exactly one Content-Length."""

    status: int
    """The status code (200-599, not 204 or 304)."""
    reason: bytes
    """The reason phrase, within h11's grammar."""
    headers: list[tuple[bytes, bytes]]
    """Every header as received, names lower-cased (as h11 gives them)."""
    length: int
    """The body's length."""
    keep_alive: bool
    """HTTP/1.1 without `Connection: close`: the connection may serve another request."""


class _Collect:
    """httptools callbacks: the reason and the header fields, and whether the head ended."""

    __slots__ = ("complete", "headers", "reason")

    def __init__(self) -> None:
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def fixed_answer(head: bytes) -> FixedAnswer | None:
    """`head` (a whole answer head, blank line included) as a FixedAnswer, or None for h11 to judge."""
    if not _ANSWER_HEAD.fullmatch(head):
        return None
    got = _Collect()
    parser = httptools.HttpResponseParser(got)
    try:
        parser.feed_data(head)
    except httptools.HttpParserError:
        return None
    status = parser.get_status_code()
    if not got.complete or status < 200 or status in _NO_BODY_STATUSES:
        return None
    version = parser.get_http_version()
    if version not in ("1.1", "1.0"):
        return None
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    keep_alive = version == "1.1"
    for raw_name, value in got.headers:
        name = raw_name.lower()
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif name == b"connection" and b"close" in value.lower():
            keep_alive = False
        headers.append((name, value))
    if length is None:
        return None
    return FixedAnswer(status, got.reason, headers, length, keep_alive)
