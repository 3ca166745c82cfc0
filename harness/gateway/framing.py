"""Message framing, checked on the raw head before h11 parses it (RFC 9112 §6.3, §5.2).

A message whose body length two parsers could read differently is how a request is smuggled past
method and path rules: the gateway frames it one way, an upstream another, and the upstream sees a
second request the policy never did. h11 quietly merges some of what must be refused (identical
duplicate Content-Length headers, a list of equal lengths, obs-folded lines), so the raw head is
checked first, and any ambiguity is a 400 and a closed connection, never a forwarded message.
"""

from __future__ import annotations

import re

import h11

HEAD_END = re.compile(rb"\n\r?\n")
"""The blank line that ends a head, as h11 finds it (a bare LF is a line end to it too)."""
LEADING_BLANK_LINES = b"\r\n"
"""Empty lines before a request line, which RFC 9112 §2.2 says a server should ignore."""

_CONTENT_LENGTH = b"\ncontent-length:"
_TRANSFER_ENCODING = b"\ntransfer-encoding:"


class FramingError(Exception):
    """A message whose framing is ambiguous or unsupported; str() is the reason given with the 400."""


def head_end(buf: bytes) -> int:
    """The index just past the head's blank line, or -1 while the head is incomplete."""
    match = HEAD_END.search(buf)
    return match.end() if match is not None else -1


def _value(head: bytes, lower: bytes, name: bytes) -> bytes:
    start = lower.find(name) + len(name)
    end = head.find(b"\n", start)
    return head[start:end].strip().lower()


def check_request_head(head: bytes) -> None:
    """Raise FramingError unless the head has at most one framing header, in one plain spelling.

    Refused: obs-fold (a folded Transfer-Encoding is read differently by every parser); two
    Content-Length fields or a list of lengths; both Transfer-Encoding and Content-Length, in any
    order; more than one Transfer-Encoding, or one other than a single `chunked` (in any case or
    padding); Transfer-Encoding in HTTP/1.0 (§6.1); `Content_Length`-style look-alikes, which some
    upstreams take for the framing header although HTTP says they are other fields.
    """
    if b"\n " in head or b"\n\t" in head:
        raise FramingError("obsolete line folding in the request head")
    lower = head.lower()
    lengths = lower.count(_CONTENT_LENGTH)
    codings = lower.count(_TRANSFER_ENCODING)
    if b"\ncontent_length" in lower or b"\ntransfer_encoding" in lower:
        raise FramingError("a framing header spelt with '_'")
    if not lengths and not codings:
        return
    if lengths > 1:
        raise FramingError("more than one Content-Length")
    if lengths and b"," in _value(head, lower, _CONTENT_LENGTH):
        raise FramingError("a list of Content-Length values")
    if not codings:
        return
    if lengths:
        raise FramingError("both Transfer-Encoding and Content-Length")
    if codings > 1:
        raise FramingError("more than one Transfer-Encoding")
    if _value(head, lower, _TRANSFER_ENCODING) != b"chunked":
        raise FramingError("a Transfer-Encoding other than chunked")
    if head[: head.find(b"\n")].rstrip().endswith(b"HTTP/1.0"):
        raise FramingError("Transfer-Encoding in an HTTP/1.0 request")


def check_response(response: h11.Response) -> None:
    """Raise FramingError for an upstream answer with both framing headers (h11 refuses the rest:
    conflicting lengths, codings other than chunked); relaying it would hand the ambiguity on."""
    names = {name for name, _ in response.headers}
    if b"transfer-encoding" in names and b"content-length" in names:
        raise FramingError("the upstream's answer has both Transfer-Encoding and Content-Length")
