"""How each peer writes the gateway policy in its own terms, and what it says it cannot express (no binary needed),
and that every preset's translation is accepted by the real peer."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from harness.egress import EgressSetup, start_egress
from harness.egress.mitmproxy import mitmproxy_policy
from harness.egress.squid import squid_policy
from harness.egress.tinyproxy import host_regex, tinyproxy_policy
from harness.egress.translate import check_names, hosts_file_text, port_remaps, remap_note
from harness.errors import ConfigError
from harness.gateway.policy import PRESETS, load_policy, parse_host_pattern, policy_from_dict, preset_path
from harness.load import peers
from harness.supervisor import Supervisor


def _policy(*rules: dict) -> object:
    return policy_from_dict({"name": "t", "rules": list(rules)})


def test_squid_binds_each_host_to_its_own_ports_and_denies_first() -> None:
    policy = _policy(
        {"allow": "allowed.test"}, {"allow": "plain.test", "ports": [80, "8000-8100"]}, {"deny": "10.0.0.0/8:*"}
    )
    access, gaps = squid_policy(policy, {"allowed.test": "127.0.0.2"})  # type: ignore[arg-type]
    lines = access.splitlines()
    assert "acl r1_host dstdomain -n allowed.test" in lines and "acl r1_ports port 443" in lines
    assert "acl r2_ports port 80 8000-8100" in lines
    assert "acl SSL_ports port 80 443 8000-8100" in lines
    # deny rules before any allow, address rules only for IP literals, default deny last.
    assert lines.index("http_access deny r3_host r3_ports ip_literal") < lines.index(
        "http_access allow r1_host r1_ports"
    )
    assert lines.index("http_access deny !ip_literal !mapped_names") < lines.index("http_access allow r1_host r1_ports")
    assert lines[-1] == "http_access deny all"
    assert gaps == []


def test_squid_lists_its_wildcards_and_tunnelled_method_rules() -> None:
    policy = _policy({"allow": "*.one.test"}, {"allow": "**.any.test"}, {"allow": "api.test", "methods": ["GET"]})
    _, gaps = squid_policy(policy, {})  # type: ignore[arg-type]
    assert [g.rule.split(" (")[0] for g in gaps] == ["allow: *.one.test", "allow: **.any.test", "allow: api.test"]
    assert "any depth" in gaps[0].why and "one.test itself" in gaps[0].why
    assert "CONNECT" in gaps[2].why


def test_tinyproxy_writes_exact_patterns_and_names_its_global_ports() -> None:
    assert re.search(host_regex(parse_host_pattern("*.x.test")) or "", "a.x.test")
    assert not re.search(host_regex(parse_host_pattern("*.x.test")) or "", "a.b.x.test")
    assert not re.search(host_regex(parse_host_pattern("*.x.test")) or "", "x.test")
    assert re.search(host_regex(parse_host_pattern("**.x.test")) or "", "a.b.x.test")
    assert not re.search(host_regex(parse_host_pattern("**")) or "", "10.1.2.3")
    policy = _policy({"allow": "allowed.test"}, {"allow": "plain.test", "ports": [80]}, {"deny": "bad.allowed.test"})
    filters, connect_ports, gaps = tinyproxy_policy(policy)  # type: ignore[arg-type]
    assert r"^allowed\.test$" in filters and connect_ports == ["80", "443"]
    whys = " | ".join(g.why for g in gaps)
    assert "ConnectPort is global" in whys and "no port for plain http" in whys
    # A deny inside an allowed wildcard cannot be written; a deny of a host no allow covers is default deny.
    policy = _policy({"allow": "**.x.test"}, {"deny": "bad.x.test"}, {"deny": "other.test"})
    _, _, gaps = tinyproxy_policy(policy)  # type: ignore[arg-type]
    assert [g.rule for g in gaps if g.rule.startswith("deny")] == ["deny: bad.x.test (ports 443)"]


def test_tinyproxy_disables_connect_without_an_allowed_port() -> None:
    _, connect_ports, _ = tinyproxy_policy(_policy({"deny": "x.test"}))  # type: ignore[arg-type]
    assert connect_ports == ["0"]


def test_mitmproxy_carries_every_rule_and_lists_only_path_normalisation() -> None:
    data, gaps = mitmproxy_policy(load_policy("locked"), {"api.anthropic.com": "127.0.0.2"})
    assert data["names"] == {"api.anthropic.com": "127.0.0.2"}
    assert data["rules"][0]["methods"] == ["GET", "POST"] and data["rules"][0]["ports"] == [[443, 443]]
    assert len(gaps) == 1 and "normalisation" in gaps[0].why


def test_names_must_be_loopback() -> None:
    assert check_names({"A.test.": "127.0.0.2"}) == {"a.test": "127.0.0.2"}
    with pytest.raises(ConfigError, match="not a loopback"):
        check_names({"a.test": "10.0.0.1"})
    assert hosts_file_text({"a.test": "127.0.0.2"}).splitlines()[1:] == ["127.0.0.2 a.test"]


@pytest.mark.parametrize("name", ["squid", "tinyproxy", "mitmproxy"])
def test_every_preset_translates_and_the_peer_accepts_it(name: str, tmp_path: Path) -> None:
    if peers.binary(name) is None:
        pytest.skip(f"{name} is not installed; install it with: {peers.INSTALL[name]}")
    for preset in PRESETS:
        workdir = tmp_path / preset
        with Supervisor(f"test-egress-preset-{os.getpid()}-{name}") as sup:
            setup = EgressSetup(preset_path(preset), workdir, {"github.com": "127.0.0.2"})
            egress = start_egress(name, setup, sup)
            try:
                assert egress.describe()["untranslatable"] == [
                    {"rule": u.rule, "why": u.why} for u in egress.untranslatable
                ]
            finally:
                egress.stop()
        if name == "squid":  # squid starts despite an ACL value it drops; its log says so
            log = (workdir / "cache.log").read_text()
            assert "ERROR" not in log and "WARNING" not in log, log


def test_port_remaps_are_split_from_the_names() -> None:
    names = {"a.test": "127.0.0.2", "a.test:22": "127.0.0.2:2222"}
    assert check_names(names) == {"a.test": "127.0.0.2"}
    assert port_remaps(names) == {"a.test:22": ("127.0.0.2", 2222)}
    assert "a.test:22 -> 127.0.0.2:2222" in remap_note(names, "squid")[0]
    with pytest.raises(ConfigError, match="not a loopback"):
        port_remaps({"a.test:22": "10.0.0.1:22"})
