"""wire.py: the upstream fast path writes what h11 writes and takes only answers h11 would take."""

from __future__ import annotations

import h11
import pytest

from harness.gateway.wire import fixed_answer, request_head, response_head

HEADERS = [(b"host", b"api.example:8443"), (b"user-agent", b"t/1"), (b"x-api-key", b"k" * 20)]


def h11_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    return conn.send(h11.Request(method=method, target=target, headers=headers)) + conn.send(h11.EndOfMessage())


@pytest.mark.parametrize(
    "headers",
    [HEADERS, [*HEADERS[1:], HEADERS[0]], [(b"host", b"a"), (b"Accept", b"*/*"), (b"x-empty", b"")]],
)
def test_request_head_is_byte_for_byte_what_h11_writes(headers: list[tuple[bytes, bytes]]) -> None:
    assert request_head(b"GET", b"/v1/x?y=1", headers) == h11_head(b"GET", b"/v1/x?y=1", headers)


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        (b"GET", b"/a b", HEADERS),  # a space in the target
        (b"GET", b"/a\r\nx: y", HEADERS),
        (b"G ET", b"/", HEADERS),
        (b"GET", b"/", [*HEADERS, (b"x-bad", b"a\r\nx-injected: 1")]),
        (b"GET", b"/", [*HEADERS, (b"x-nul", b"a\x00b")]),
        (b"GET", b"/", [*HEADERS, (b"x-lf", b"a\nb")]),
        (b"GET", b"/", [*HEADERS, (b"x-cr", b"a\rb")]),
        (b"GET", b"/", [*HEADERS, (b"x-smuggle", b"a\r\n\r\nGET /admin HTTP/1.1\r\nhost: a")]),
        (b"GET", b"/", [*HEADERS, (b"x\r\ny", b"v")]),
        (b"GET", b"/ HTTP/1.1\r\nx: y\r\n\r\nGET /x", HEADERS),
        (b"GET", b"/", [*HEADERS, (b"bad name", b"v")]),
        (b"GET", b"/", HEADERS[1:]),  # no Host
        (b"GET", b"/", [*HEADERS, (b"host", b"other")]),  # two
    ],
)
def test_request_head_leaves_to_h11_what_h11_would_refuse(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    assert request_head(method, target, headers) is None
    with pytest.raises(h11.LocalProtocolError):
        h11_head(method, target, headers)


def test_a_plain_answer_qualifies() -> None:
    answer = fixed_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b c\r\n\r\n")
    assert answer is not None
    assert (answer.status, answer.reason, answer.length, answer.keep_alive) == (200, b"OK", 5, True)
    assert answer.headers == [(b"content-length", b"5"), (b"x-a", b"b c")]
    closing = fixed_answer(b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert closing is not None and not closing.keep_alive
    old = fixed_answer(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert old is not None and not old.keep_alive


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",  # close-delimited
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Fold: a\r\n b\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 5\n\n",  # bare LF
        b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/2.0 200 OK\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n",  # unfinished
        b"garbage\r\n\r\n",
    ],
)
def test_anything_but_the_common_case_goes_to_h11(head: bytes) -> None:
    assert fixed_answer(head) is None


def h11_answer(request: h11.Request, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(
        b"%s %s HTTP/%s\r\n" % (request.method, request.target, request.http_version)
        + b"".join(b"%s: %s\r\n" % h for h in request.headers)
        + b"\r\n"
    )
    conn.next_event()
    conn.next_event()
    return conn.send(h11.Response(status_code=status, headers=headers, reason=reason))


def test_response_head_is_what_h11_writes_to_a_keep_alive_client() -> None:
    request = h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"a")])
    headers = [(b"content-length", b"5"), (b"x-a", b"b c"), (b"etag", b'"x"')]
    assert response_head(200, b"OK", headers) == h11_answer(request, 200, b"OK", headers)
    assert response_head(404, b"", headers) == h11_answer(request, 404, b"", headers)


def test_response_head_leaves_a_host_header_to_h11() -> None:
    assert response_head(200, b"OK", [(b"content-length", b"0"), (b"host", b"x")]) is None


@pytest.mark.parametrize("value", [b" padded", b"padded ", b"a\tb\x7f\x80"])
def test_request_head_and_h11_agree_on_padding_and_odd_bytes(value: bytes) -> None:
    headers = [*HEADERS, (b"x-v", value)]
    try:
        expected: bytes | None = h11_head(b"GET", b"/", headers)
    except h11.LocalProtocolError:
        expected = None
    assert request_head(b"GET", b"/", headers) == expected
