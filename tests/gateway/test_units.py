"""Unit tests: names, policy matcher, loop breaker, credentials, CA, DNS wire format."""

from __future__ import annotations

import contextlib
import os
import ssl
import stat
import struct
from pathlib import Path

import pytest

from harness.gateway.config import GatewayConfig
from harness.gateway.credentials import (
    SENTINEL,
    CredentialError,
    CredentialSpec,
    CredentialStore,
    inject,
    read_secret,
)
from harness.gateway.deny import loop_answer
from harness.gateway.dns import QTYPE_A, RCODE_REFUSED, build_response, parse_query
from harness.gateway.loopbreaker import (
    ANSWER_200_TERMINAL,
    ANSWER_429,
    LoopBreaker,
    LoopVerdict,
    resolve_answer,
)
from harness.gateway.names import HostError, normalise_host, parse_authority
from harness.gateway.policy import (
    PolicyError,
    load_policy,
    normalise_path,
    policy_from_dict,
)
from harness.gateway.tls import SHA1_COMPAT, STRICT, CertificateAuthority

pytestmark = pytest.mark.timeout(30)


# ---- names -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25.com", "example.com"),  # full-width folds
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("[::1]", "::1"),
        ("10.0.0.1", "10.0.0.1"),
        ("_dmarc.example.com", "_dmarc.example.com"),
    ],
)
def test_normalise_host(raw: str, expected: str) -> None:
    assert normalise_host(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        ".",
        "127.1",
        "0x7f.0.0.1",
        "2130706433",
        "010.0.0.1",
        "a..b",
        "exa mple.com",
        "a@b.com",
        "-x.com",
        "x" * 64 + ".com",
        "evil.com%2f",
        "[1.2.3.4]",
    ],
)
def test_normalise_host_refuses(raw: str) -> None:
    with pytest.raises(HostError):
        normalise_host(raw)


def test_parse_authority() -> None:
    assert parse_authority("GitHub.com.:443", None) == ("github.com", 443)
    assert parse_authority("[::1]:8080", None) == ("::1", 8080)
    assert parse_authority("example.com", 80) == ("example.com", 80)
    for bad in (
        "example.com",
        "example.com:0",
        "example.com:70000",
        "example.com:+1",
        "user@example.com:443",
        "::1:443",
    ):
        with pytest.raises(HostError):
            parse_authority(bad, None)


# ---- policy ----------------------------------------------------------------------------------
def make_policy(*rules: dict[str, object], **extra: object) -> object:
    return policy_from_dict({"rules": list(rules), **extra})


def test_ports_are_enforced_by_default() -> None:
    policy = load_policy("balanced")
    assert policy.check_destination("github.com", 443).allowed
    assert not policy.check_destination("github.com", 22).allowed
    assert not policy.check_destination("github.com", 9999).allowed
    assert not policy.check_destination("github.com", 80).allowed
    assert not policy.check_destination("example.com", 443).allowed
    assert policy.check_destination("example.com", 443).rule == "default-deny"


def test_wildcards() -> None:
    policy = policy_from_dict({"rules": [{"allow": "*.one.test"}, {"allow": "**.any.test"}, {"allow": "exact.test"}]})
    assert policy.check_destination("a.one.test", 443).allowed
    assert not policy.check_destination("a.b.one.test", 443).allowed
    assert not policy.check_destination("one.test", 443).allowed
    assert policy.check_destination("a.any.test", 443).allowed
    assert policy.check_destination("a.b.c.any.test", 443).allowed
    assert not policy.check_destination("any.test", 443).allowed
    assert not policy.check_destination("evilany.test", 443).allowed
    assert policy.check_destination("exact.test", 443).allowed
    assert not policy.check_destination("sub.exact.test", 443).allowed
    assert not policy.check_destination("exact.test.evil", 443).allowed


def test_ip_literals_match_only_cidr() -> None:
    policy = policy_from_dict({"rules": [{"allow": "**"}, {"allow": "10.0.0.0/8:*"}, {"allow": "[fd00::/8]:443"}]})
    assert policy.check_destination("anything.example", 443).allowed
    assert not policy.check_destination("1.2.3.4", 443).allowed  # ** never matches an IP
    assert policy.check_destination("10.1.2.3", 22).allowed
    assert not policy.check_destination("11.1.2.3", 443).allowed
    assert policy.check_destination("fd00::1", 443).allowed
    assert not policy.check_destination("fd00::1", 80).allowed


def test_deny_wins_regardless_of_order() -> None:
    for rules in (
        [{"allow": "**.example.com"}, {"deny": "secret.example.com"}],
        [{"deny": "secret.example.com"}, {"allow": "**.example.com"}],
    ):
        policy = policy_from_dict({"rules": rules})
        decision = policy.check_destination("secret.example.com", 443)
        assert not decision.allowed
        assert decision.rule == "deny secret.example.com:443"
        assert policy.check_destination("public.example.com", 443).allowed


def test_host_port_and_port_lists() -> None:
    policy = policy_from_dict(
        {
            "rules": [
                {"allow": "github.com:22"},
                {"allow": "mirror.test", "ports": [80, "8000-8002"]},
                {"allow": "any.test:*"},
            ]
        }
    )
    assert policy.check_destination("github.com", 22).allowed
    assert not policy.check_destination("github.com", 443).allowed
    assert policy.check_destination("mirror.test", 8001).allowed
    assert not policy.check_destination("mirror.test", 8003).allowed
    assert not policy.check_destination("mirror.test", 443).allowed
    assert policy.check_destination("any.test", 65535).allowed


def test_method_and_path_rules() -> None:
    policy = policy_from_dict(
        {
            "rules": [
                {"allow": "files.test", "methods": ["GET"], "paths": ["/packages/**", "/simple/*/"]},
                {"deny": "files.test", "paths": ["/packages/secret/**"]},
            ]
        }
    )
    assert policy.check_destination("files.test", 443).needs_requests
    assert policy.check_request("files.test", 443, "GET", "/packages/a/b.whl").allowed
    assert not policy.check_request("files.test", 443, "POST", "/packages/a/b.whl").allowed
    assert not policy.check_request("files.test", 443, "GET", "/admin").allowed
    assert policy.check_request("files.test", 443, "GET", "/simple/requests/").allowed
    assert not policy.check_request("files.test", 443, "GET", "/simple/a/b/").allowed
    assert not policy.check_request("files.test", 443, "GET", "/packages/secret/x").allowed


def test_normalise_path() -> None:
    assert normalise_path("/packages/../admin?x=1") == "/admin"
    assert normalise_path("/a/./b//c/") == "/a/b/c/"
    assert normalise_path("/%70ackages/x") == "/packages/x"
    assert normalise_path("//x") == "/x"
    for bad in ("/a%2f..%2fadmin", "/a\\b", "/a%00"):
        with pytest.raises(HostError):
            normalise_path(bad)


def test_policy_errors() -> None:
    for data in (
        {"rules": [{"allow": "a.*.com"}]},
        {"rules": [{"allow": "x.com", "deny": "y.com"}]},
        {"rules": [{"allow": "x.com:99999"}]},
        {"rules": [{"allow": "x.com:443", "ports": [80]}]},
        {"deny_mode": "teapot", "rules": []},
        {"rules": [{"allow": "10.0.0.0/33"}]},
    ):
        with pytest.raises(PolicyError):
            policy_from_dict(data)


def test_presets_load() -> None:
    for name in ("open", "balanced", "locked"):
        policy = load_policy(name)
        assert policy.rules
    open_policy = load_policy("open")
    assert open_policy.check_destination("example.com", 443).allowed
    assert not open_policy.check_destination("example.com", 22).allowed
    assert not open_policy.check_destination("169.254.169.254", 80).allowed
    assert load_policy("locked").check_destination("api.anthropic.com", 443).needs_requests


def test_dns_question() -> None:
    policy = load_policy("balanced")
    assert policy.names_allowed("api.anthropic.com")
    assert policy.names_allowed("raw.githubusercontent.com")
    assert not policy.names_allowed("example.com")


# ---- loop breaker ----------------------------------------------------------------------------
def test_loop_breaker_counts_within_window() -> None:
    breaker = LoopBreaker(threshold=3, window_s=10.0)
    key = ("sb", "GET", "http", "example.com", "80", "/")
    verdicts = [breaker.observe_denied(key, now=float(t)) for t in range(5)]
    assert verdicts == [LoopVerdict.UNDER] * 3 + [LoopVerdict.TRIPPED, LoopVerdict.LOOPING]
    assert breaker.observe_denied(("sb", "GET", "http", "example.com", "80", "/other"), now=5.0) is LoopVerdict.UNDER
    # A quiet window resets the key.
    assert breaker.observe_denied(key, now=100.0) is LoopVerdict.UNDER
    assert breaker.trips == 1


def test_loop_breaker_spread_out_retries_never_trip() -> None:
    breaker = LoopBreaker(threshold=3, window_s=10.0)
    key = ("sb", "GET", "http", "example.com", "80", "/")
    assert all(breaker.observe_denied(key, now=t * 6.0) is LoopVerdict.UNDER for t in range(20))


def test_loop_answer_styles_differ_only_in_status() -> None:
    plain = loop_answer("example.com", 80, "default-deny", "sb", 3, 60.0)
    terminal = loop_answer("example.com", 80, "default-deny", "sb", 3, 60.0, terminal=True)
    assert (plain.status, terminal.status) == (429, 200)
    assert plain.headers == terminal.headers and plain.body == terminal.body
    headers = dict(terminal.headers)
    assert headers[b"x-blastradius-decision"].endswith(b"; loop=1; permanent")
    assert headers[b"x-proxy-error"] == b"retry-loop-detected"


def test_loop_answer_setting_is_parsed_and_checked() -> None:
    base = {"rules": [{"allow": "api.anthropic.com"}]}
    assert policy_from_dict(base).loop_answer == ANSWER_429
    answer = policy_from_dict({**base, "loop_breaker": {"threshold": 2, "answer": "200-terminal"}}).loop_answer
    assert answer == ANSWER_200_TERMINAL
    # YAML reads `answer: 429` as an int; it still names the 429 style.
    assert policy_from_dict({**base, "loop_breaker": {"answer": 429}}).loop_answer == ANSWER_429
    with pytest.raises(PolicyError, match="answer"):
        policy_from_dict({**base, "loop_breaker": {"answer": "200"}})
    with pytest.raises(ValueError, match="answer"):
        GatewayConfig(loop_answer="418")
    with pytest.raises(ValueError, match="answer"):
        LoopBreaker(3, 10.0, answer="terminal")
    # Most specific first: run time, then GatewayConfig, then the policy; default 429.
    assert resolve_answer(None, ANSWER_200_TERMINAL, ANSWER_429) == ANSWER_200_TERMINAL
    assert resolve_answer(ANSWER_429, ANSWER_200_TERMINAL, ANSWER_200_TERMINAL) == ANSWER_429
    assert resolve_answer(None, None) == ANSWER_429
    assert GatewayConfig.from_json(GatewayConfig(loop_answer="200-terminal").to_json()).loop_answer == "200-terminal"


# ---- credentials -----------------------------------------------------------------------------
def test_credential_binding_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BR_UNIT_KEY", "unit-secret-value-123")
    store = CredentialStore([CredentialSpec("svc", "API.Example.com.", "x-api-key", env="BR_UNIT_KEY")])
    assert store.for_dest("api.example.com", 443) is not None
    assert store.for_dest("api.example.com", 8443) is None
    assert store.for_dest("api.example.com.evil.test", 443) is None
    assert store.for_dest("evil-api.example.com", 443) is None
    cred = store.for_dest("api.example.com", 443)
    assert cred is not None
    headers = inject([(b"host", b"api.example.com"), (b"x-api-key", SENTINEL.encode())], cred)
    assert headers == [(b"host", b"api.example.com"), (b"x-api-key", b"unit-secret-value-123")]
    assert "unit-secret-value-123" not in repr(CredentialSpec("svc", "h", "x", env="BR_UNIT_KEY"))


def test_secret_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "key"
    secret_file.write_text("file-secret-value-1\n")
    assert read_secret(CredentialSpec("f", "h", "x", file=str(secret_file))) == "file-secret-value-1"
    assert read_secret(CredentialSpec("c", "h", "x", command="echo command-secret-42")) == "command-secret-42"
    assert read_secret(CredentialSpec("c", "h", "x", command="false")) is None
    monkeypatch.delenv("BR_ABSENT", raising=False)
    assert read_secret(CredentialSpec("e", "h", "x", env="BR_ABSENT")) is None
    monkeypatch.setenv("BR_SHORT", "abc")
    with pytest.raises(CredentialError):
        read_secret(CredentialSpec("e", "h", "x", env="BR_SHORT"))


# ---- CA --------------------------------------------------------------------------------------
def test_ca_is_per_install_and_private(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    again = CertificateAuthority.load_or_create(tmp_path)
    assert ca.cert_pem == again.cert_pem
    assert b"PRIVATE KEY" not in ca.cert_pem
    assert stat.S_IMODE(os.stat(tmp_path / "ca-key.pem").st_mode) == 0o600
    ctx = ca.server_context("api.example.com", STRICT)
    assert ctx is ca.server_context("api.example.com", STRICT)  # cached per host and profile
    assert ca.server_context("api.example.com", SHA1_COMPAT) is not ctx
    assert not list((tmp_path / "tmp").iterdir())  # leaf key files are deleted after loading
    client = ssl.create_default_context(cadata=ca.cert_pem.decode())
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = ctx.wrap_bio(incoming, outgoing, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname="api.example.com")
    for _ in range(10):
        for obj in (cli, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        incoming.write(c_out.read())
        c_in.write(outgoing.read())
    cli.do_handshake()
    assert cli.getpeercert()["subjectAltName"] == (("DNS", "api.example.com"),)


# ---- DNS wire format -------------------------------------------------------------------------
def dns_query(name: str, qtype: int = QTYPE_A, qid: int = 0x1234) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)


def test_dns_roundtrip() -> None:
    qid, flags, name, qtype, _qclass, question = parse_query(dns_query("Example.COM"))
    assert (qid, name, qtype) == (0x1234, "Example.COM", QTYPE_A)
    reply = build_response(qid, flags, question, RCODE_REFUSED, [])
    assert struct.unpack("!HH", reply[:4]) == (0x1234, 0x8000 | 0x0100 | 0x0080 | RCODE_REFUSED)
