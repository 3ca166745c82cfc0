"""Unit tests of the roots of the bypass classes: the address normaliser, the dialler's protection,
the framing check, the key scanner and scrubber, and the descriptor budget."""

from __future__ import annotations

import asyncio
import base64
import binascii
import socket
from typing import Any

import pytest

from harness.gateway.dial import DialError, Overrides, is_protected_address, resolve
from harness.gateway.exfil import BodyScanner, Forms, KeyForm, KeyLeak, KnownKeys, Scrubber, find
from harness.gateway.fds import FD_RESERVE, FDS_PER_SANDBOX, FdBudget
from harness.gateway.framing import FramingError, check_request_head, head_end
from harness.gateway.names import HostError, normalise_host
from harness.gateway.policy import normalise_path, policy_from_dict

pytestmark = pytest.mark.timeout(30)

KEY = "sk-ant-UNIT-0123456789-abcdefghijklmnopq"
BOUND = ("api.anthropic.com", 443)


# ---- addresses -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("[::ffff:127.0.0.1]", "127.0.0.1"),
        ("[::ffff:7f00:1]", "127.0.0.1"),
        ("[0:0:0:0:0:ffff:7f00:1]", "127.0.0.1"),
        ("[0000:0000:0000:0000:0000:FFFF:7F00:0001]", "127.0.0.1"),
        ("[::ffff:169.254.169.254]", "169.254.169.254"),
        ("[::ffff:10.0.0.5]", "10.0.0.5"),
        ("0.0.0.0", "127.0.0.1"),
        ("[::ffff:0.0.0.0]", "127.0.0.1"),
        ("[::]", "::1"),
        ("[0::0]", "::1"),
        ("[::1]", "::1"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("8.8.8.8", "8.8.8.8"),
    ],
)
def test_addresses_have_one_form(raw: str, canonical: str) -> None:
    assert normalise_host(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    ["[::127.0.0.1]", "[::7f00:1]", "[64:ff9b::7f00:1]", "[64:ff9b:1::a9fe:a9fe]", "[fe80::1%25eth0]", "[fe80::1%lo]"],
)
def test_addresses_whose_meaning_hides_are_refused(raw: str) -> None:
    with pytest.raises(HostError):
        normalise_host(raw)


DENY_PRIVATE = {
    "rules": [
        {"allow": "[::/0]:*"},
        {"allow": "0.0.0.0/0:*"},
        {"deny": "127.0.0.0/8:*"},
        {"deny": "169.254.0.0/16:*"},
        {"deny": "10.0.0.0/8:*"},
    ]
}


@pytest.mark.parametrize(
    "raw",
    [
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[0:0:0:0:0:ffff:7f00:1]",
        "[::ffff:169.254.169.254]",
        "[::ffff:10.0.0.5]",
        "0.0.0.0",
        "[::]",
        "[::1]",
        "127.255.255.254",
    ],
)
def test_deny_wins_across_address_families(raw: str) -> None:
    policy = policy_from_dict(DENY_PRIVATE)
    assert not policy.check_destination(normalise_host(raw), 443).allowed


def test_a_v6_deny_rule_of_mapped_addresses_covers_the_v4_ones() -> None:
    policy = policy_from_dict({"rules": [{"allow": "0.0.0.0/0:*"}, {"deny": "[::ffff:192.168.0.0/112]:*"}]})
    assert not policy.check_destination("192.168.1.1", 443).allowed
    assert policy.check_destination("192.169.1.1", 443).allowed


def test_loopback_allow_does_not_widen() -> None:
    """Only a deny covers every loopback address; an allow of 127.0.0.1 stays 127.0.0.1."""
    policy = policy_from_dict({"rules": [{"allow": "127.0.0.1:*"}]})
    assert policy.check_destination("127.0.0.1", 8080).allowed
    assert not policy.check_destination("127.0.0.2", 8080).allowed
    assert not policy.check_destination("::1", 8080).allowed


@pytest.mark.parametrize(
    "addr",
    [
        "127.0.0.1",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:0.0.0.0",
        "::",
        "0.0.0.0",
        "::7f00:1",
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "::ffff:169.254.169.254",
        "169.254.169.254",
        "fd00:ec2::254",
        "fe80::1%eth0",
        "224.0.0.1",
    ],
)
def test_protected_addresses_in_every_form(addr: str) -> None:
    assert is_protected_address(addr)


@pytest.mark.parametrize("addr", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:93.184.216.34"])
def test_public_addresses_are_not_protected(addr: str) -> None:
    assert not is_protected_address(addr)


def fake_resolver(monkeypatch: pytest.MonkeyPatch, answers: list[str]) -> None:
    """The loop's getaddrinfo answers `answers` for every name (a DNS answer we do not control here)."""

    async def getaddrinfo(self: Any, host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers
        ]

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize(
    "answers",
    [
        ["::ffff:127.0.0.1"],
        ["::ffff:0.0.0.0"],
        ["::"],
        ["0.0.0.0"],
        ["::7f00:1"],
        ["64:ff9b::a9fe:a9fe"],
        ["::1", "127.0.0.1"],
    ],
)
def test_a_name_resolving_only_to_protected_addresses_is_refused(
    monkeypatch: pytest.MonkeyPatch, answers: list[str]
) -> None:
    fake_resolver(monkeypatch, answers)
    with pytest.raises(DialError, match="protected"):
        asyncio.run(resolve("rebind.example", 443, Overrides({})))


def test_a_mixed_answer_dials_the_public_address_in_its_canonical_form(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_resolver(monkeypatch, ["::ffff:127.0.0.1", "::ffff:93.184.216.34"])
    target = asyncio.run(resolve("mixed.example", 443, Overrides({})))
    assert (target.address, target.port) == ("93.184.216.34", 443)


# ---- paths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/a/..;/b", "/a/.;x/b", "/a/%2e%2e;x/b", "/..;"])
def test_dot_segments_with_parameters_are_ambiguous(path: str) -> None:
    with pytest.raises(HostError):
        normalise_path(path)


def test_parameters_elsewhere_are_plain_path() -> None:
    assert normalise_path("/a;v=1/b") == "/a;v=1/b"


# ---- framing ---------------------------------------------------------------------------------
def head(*fields: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST /x " + version + b"\r\nHost: a\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


@pytest.mark.parametrize(
    "fields",
    [
        (b"Content-Length: 1", b"Transfer-Encoding: chunked"),
        (b"transfer-encoding: chunked", b"CONTENT-LENGTH: 1"),
        (b"Content-Length: 1", b"Content-Length: 1"),
        (b"Content-Length: 1,1",),
        (b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
        (b"Transfer-Encoding: gzip",),
        (b"Transfer-Encoding: gzip, chunked",),
        (b"Transfer-Encoding:", b" chunked"),
        (b"X: y", b"\tTransfer-Encoding: chunked"),
        (b"Content_Length: 4",),
        (b"Transfer_encoding: chunked",),
    ],
)
def test_ambiguous_framing(fields: tuple[bytes, ...]) -> None:
    with pytest.raises(FramingError):
        check_request_head(head(*fields))


@pytest.mark.parametrize(
    "fields",
    [
        (),
        (b"Content-Length: 12",),
        (b"Transfer-Encoding: chunked",),
        (b"Transfer-Encoding:  Chunked\t",),
        (b"X-Length: 1",),
    ],
)
def test_plain_framing(fields: tuple[bytes, ...]) -> None:
    check_request_head(head(*fields))


def test_transfer_encoding_in_http_1_0() -> None:
    with pytest.raises(FramingError):
        check_request_head(head(b"Transfer-Encoding: chunked", version=b"HTTP/1.0"))


def test_head_end_matches_h11() -> None:
    assert head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nBODY") == len(b"GET / HTTP/1.1\r\nA: b\r\n\r\n")
    assert head_end(b"GET / HTTP/1.1\nA: b\n\nBODY") == len(b"GET / HTTP/1.1\nA: b\n\n")
    assert head_end(b"GET / HTTP/1.1\r\nA: b\r\n") == -1


# ---- known keys ------------------------------------------------------------------------------
@pytest.fixture
def keys() -> KnownKeys:
    return KnownKeys([("anthropic", KEY, BOUND)])


def key_encodings() -> list[bytes]:
    raw = KEY.encode()
    out = [raw, binascii.hexlify(raw), binascii.hexlify(raw).upper()]
    out += ["".join(f"%{b:02X}" for b in raw).encode(), "".join(f"%{b:02x}" for b in raw).encode()]
    for prefix in (b"", b"x", b"xy", b"xyz", b"wxyz"):
        for encode in (base64.b64encode, base64.urlsafe_b64encode, base64.b32encode):
            out.append(encode(prefix + raw + b"tail"))
    return out


@pytest.mark.parametrize("encoded", key_encodings())
def test_every_encoding_is_found(keys: KnownKeys, encoded: bytes) -> None:
    forms = keys.foreign("evil.test", 443, True)
    assert forms is not None and forms.find(b"prefix " + encoded + b" suffix") is not None


def test_a_key_is_foreign_everywhere_but_its_own_host_in_tls(keys: KnownKeys) -> None:
    def searched(forms: Forms | None) -> tuple[KeyForm, ...]:
        return () if forms is None else forms.forms

    assert searched(keys.foreign(*BOUND, True)) == ()
    assert searched(keys.foreign(*BOUND, False)) == keys.forms  # plain http to its own host
    assert searched(keys.foreign("api.anthropic.com", 8443, True)) == keys.forms
    assert searched(keys.foreign("evil.test", 443, True)) == keys.forms


def test_a_key_in_a_name(keys: KnownKeys) -> None:
    hexkey = binascii.hexlify(KEY.encode()).decode()
    assert keys.find_in_name(f"{hexkey[:40]}.{hexkey[40:]}.evil.test") is not None
    assert keys.find_in_name("api.anthropic.com") is None


@pytest.mark.parametrize("split", range(1, len(KEY)))
def test_the_body_scanner_releases_no_part_of_a_split_key(keys: KnownKeys, split: int) -> None:
    scanner = BodyScanner(Forms(keys.forms))
    body = b"a" * 300 + KEY.encode() + b"z" * 10
    cut = 300 + split
    released = b"".join(scanner.feed(body[:cut]))
    with pytest.raises(KeyLeak):
        scanner.feed(body[cut:])
    assert released == body[: len(released)] and len(released) <= 300  # not one byte of the key left


@pytest.mark.parametrize("size", [1, 3, 7, 38, 39, 40, 200])
def test_the_body_scanner_finds_a_key_spread_over_many_small_reads(keys: KnownKeys, size: int) -> None:
    scanner = BodyScanner(Forms(keys.forms))
    body = b"a" * 500 + base64.b64encode(b"x" + KEY.encode()) + b"z" * 500
    released = b""
    with pytest.raises(KeyLeak):
        for i in range(0, len(body), size):
            released += b"".join(scanner.feed(body[i : i + size]))
    # At most the a's and the two base64 chars that still hold bits of the "x" before the key.
    assert len(released) <= 502


def test_the_body_scanner_passes_a_clean_body_whole(keys: KnownKeys) -> None:
    scanner = BodyScanner(Forms(keys.forms))
    body = bytes(range(256)) * 100
    pieces = [piece for i in range(0, len(body), 777) for piece in scanner.feed(body[i : i + 777])]
    out = b"".join(pieces + scanner.flush())
    assert out == body


@pytest.mark.parametrize("size", [1, 5, 39, 64, 1000])
def test_the_scrubber_overwrites_split_keys_and_keeps_the_length(keys: KnownKeys, size: int) -> None:
    scrubber = Scrubber(Forms(keys.forms))
    body = b"echo x-api-key: " + KEY.encode() + b" and again " + base64.b64encode(KEY.encode()) + b" end"
    pieces = [piece for i in range(0, len(body), size) for piece in scrubber.feed(body[i : i + size])]
    out = b"".join(pieces + scrubber.flush())
    assert len(out) == len(body)
    assert find(keys.forms, out) is None and KEY.encode() not in out
    assert out.startswith(b"echo x-api-key: ****") and out.endswith(b" end")
    assert scrubber.redactions >= 2


# ---- descriptors -----------------------------------------------------------------------------
def test_a_flooding_sandbox_cannot_starve_another() -> None:
    budget = FdBudget(1024)
    for sandbox in ("a", "b", "c", "d"):
        budget.add_sandbox(sandbox)
    assert budget.budget == 1024 - FD_RESERVE - 4 * FDS_PER_SANDBOX
    floods = {s: sum(budget.take(s) for _ in range(2000)) for s in ("a", "b", "c")}
    assert sum(floods.values()) == budget.budget - budget.guarantee  # everything but d's guarantee
    assert floods["a"] > floods["c"] >= budget.guarantee
    assert all(budget.take("d") for _ in range(budget.guarantee))
    assert not budget.take("d")
    for _ in range(floods["a"]):
        budget.give("a")
    assert budget.take("d")  # what a gave back is in the pool again


def test_removed_sandboxes_take_nothing() -> None:
    budget = FdBudget(1024)
    budget.add_sandbox("a")
    assert budget.take("a")
    budget.remove_sandbox("a")
    assert not budget.take("a")
    budget.give("a")  # a late give of a removed sandbox is harmless


def test_a_streamed_answer_is_not_held_back(keys: KnownKeys) -> None:
    """Server-sent events go on at once: only what could begin a key's form waits for the next read."""
    scrubber = Scrubber(Forms(keys.forms))
    event = b'data: {"type":"content_block_delta","delta":{"text":"stack"}}\n\n'
    assert scrubber.feed(event) == [event]  # the very chunk, uncopied
    assert scrubber.feed(b"event: ping\n\nsk-ant-UN") == [b"event: ping\n\n"]  # a possible start waits
    assert b"".join(scrubber.feed(b"RELATED text")) == b"sk-ant-UNRELATED text"


def test_partial_len_is_the_longest_proper_prefix_at_the_end(keys: KnownKeys) -> None:
    forms = Forms(keys.forms)
    text = b'{"text":"sk-ant is how a key starts; %73%6b too"} c2stYW50 736b2d ' * 2
    for end in range(len(text)):
        tail = text[max(0, end - forms.keep) : end]
        brute = max(
            (len(tail) - i for f in keys.forms for i in range(len(tail)) if f.pattern.startswith(tail[i:])),
            default=0,
        )
        assert forms.partial_len(tail) == brute, tail
