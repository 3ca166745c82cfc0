"""squid as an egress: the policy as the http_access list a careful admin writes.

    acl rN_host dstdomain -n allowed.test      exact name (`.x` for `*.x` and `**.x`: broader, listed)
    acl rN_ports port 443                      the rule's own ports, so a host is allowed only on them
    http_access deny  rD_host rD_ports         every deny rule first (deny wins)
    http_access allow rA_host rA_ports
    http_access deny all                       default deny

with the stock guards in front (`deny !Safe_ports`, `deny CONNECT !SSL_ports`, both the union of the allowed
ports) and CIDR rules as `dst` combined with an IP-literal ACL (a rule on addresses never matches a name).
Names resolve only through a hosts file made from EgressSetup.names; `dns_nameservers` points at a loopback
address where nothing of ours answers, and a harness guard (not part of the policy) refuses a name outside the
map before any lookup and any destination address outside loopback, so an unmapped name is denied, never
resolved or dialled.
"""

from __future__ import annotations

import ipaddress
import shutil
from collections.abc import Mapping
from pathlib import Path

from harness.egress import EgressSetup, Untranslatable
from harness.egress.translate import (
    NO_RESOLVER,
    PeerEgress,
    allows,
    check_names,
    hosts_file_text,
    load,
    peer_error,
    policy_wide,
    port_list,
    remap_note,
    require,
    rule_text,
    union_ports,
)
from harness.gateway.policy import Policy, Rule
from harness.load import peers
from harness.sandbox.base import Endpoint
from harness.supervisor import Supervisor

IP_LITERAL_PATTERNS = (r"^[0-9.]+$", r"^\[?[0-9a-fA-F:.]+\]?$")
"""dstdom_regex -n patterns for a destination written as an IP address (v4, or v6 in or out of brackets)."""
LOOPBACK_DSTS = ("127.0.0.0/8", "::1")
"""Every loopback address: a deny rule on any of them covers all (as the gateway decides)."""


def _host_acl(rule: Rule, acl: str, out: list[Untranslatable]) -> list[str]:
    """The ACL lines naming rule's hosts as `acl` (the caller combines it with ip_literal for CIDR rules)."""
    host = rule.host
    if host.kind == "exact":
        return [f"acl {acl} dstdomain -n {host.value}"]
    if host.kind in ("one", "any"):
        broader = " and names at any depth below it" if host.kind == "one" else ""
        out.append(
            Untranslatable(
                rule_text(rule),
                f"squid's dstdomain .{host.value} also matches {host.value} itself{broader}"
                " (dstdom_regex could be exact; the usual dstdomain is used)",
            )
        )
        return [f"acl {acl} dstdomain -n .{host.value}"]
    if host.kind == "all":
        return [f"acl {acl} dstdom_regex -n ."]
    assert host.network is not None
    networks = [host.network]
    if rule.action == "deny" and host.covers_loopback:
        networks += [
            n
            for n in map(ipaddress.ip_network, LOOPBACK_DSTS)
            if not any(n.subnet_of(m) for m in networks if m.version == n.version)
        ]
    return [f"acl {acl} dst {' '.join(_dst(n) for n in networks)}"]


def _dst(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """A network as squid's dst takes it: it refuses a /0 (asking for `all`, which spans both families)."""
    if network.prefixlen == 0:
        return " ".join(str(half) for half in network.subnets(prefixlen_diff=1))
    return str(network.network_address) if network.num_addresses == 1 else str(network)


def _rule_lines(index: int, rule: Rule, out: list[Untranslatable], per_host_ports: bool = True) -> list[str]:
    acl = f"r{index}"
    lines = [f"# rule {index}: {rule_text(rule)}"]
    lines += _host_acl(rule, f"{acl}_host", out)
    lines.append(f"acl {acl}_ports port {' '.join(port_list(rule.ports))}")
    match = [f"{acl}_host", f"{acl}_ports"] if per_host_ports else [f"{acl}_host"]
    if rule.host.kind == "cidr":
        match.append("ip_literal")
    elif rule.host.kind == "all":
        match.append("!ip_literal")
    if rule.conditional:
        if rule.methods is not None:
            lines.append(f"acl {acl}_methods method {' '.join(sorted(rule.methods))}")
            match.append(f"{acl}_methods")
        if rule.paths is not None:
            # urlpath_regex sees the query too; the gateway matches the path without it.
            regexes = [p.pattern.removesuffix("$") + r"(\?.*)?$" for p in rule.paths]
            lines.append(f"acl {acl}_paths urlpath_regex {' '.join(regexes)}")
            match.append(f"{acl}_paths")
        effect = (
            "so CONNECT to it is denied (the gateway intercepts and checks each request)"
            if rule.action == "allow"
            else "so CONNECT to it is not denied by this rule"
        )
        out.append(
            Untranslatable(
                rule_text(rule),
                f"squid checks method and path for plain http only; inside a CONNECT tunnel it sees neither, {effect}",
                cases=("paths",),
            )
        )
    lines.append(f"http_access {rule.action} {' '.join(match)}")
    return lines


def squid_policy(
    policy: Policy, names: Mapping[str, str], per_host_ports: bool = True
) -> tuple[str, list[Untranslatable]]:
    """The access part of squid.conf for `policy`, and what it could not express.

    per_host_ports=False writes the common recipe instead (each host allowed by dstdomain alone, ports only by the
    global Safe_ports/SSL_ports): kept to show what it lets through, never what `start` runs."""
    out: list[Untranslatable] = []
    lines = [
        f"# From policy {policy.name} ({policy.source}) by blastradius; deny rules first, default deny last.",
        "acl clients src 127.0.0.0/8 ::1",
        "acl CONNECT method CONNECT",
        "acl ip_literal dstdom_regex -n " + " ".join(IP_LITERAL_PATTERNS),
        "http_access deny !clients",
        "# Harness guard, not policy: a name outside the stand-ins' map is refused before any lookup, and an",
        "# address must be loopback, so nothing is ever resolved or dialled outside the map.",
        f"acl stand_ins dst {' '.join(LOOPBACK_DSTS)}",
    ]
    if names:
        lines += [
            f"acl mapped_names dstdomain -n {' '.join(sorted(names))}",
            "http_access deny !ip_literal !mapped_names",
        ]
    else:
        lines.append("http_access deny !ip_literal")
    allowed = allows(policy)
    if allowed:
        ports = " ".join(port_list(union_ports(allowed)))
        lines += [
            f"acl Safe_ports port {ports}",
            f"acl SSL_ports port {ports}",
            "http_access deny !Safe_ports",
            "http_access deny CONNECT !SSL_ports",
        ]
    for index, rule in enumerate(policy.rules, start=1):
        if rule.action == "deny":
            lines += _rule_lines(index, rule, out, per_host_ports)
    lines.append("http_access deny !stand_ins")
    for index, rule in enumerate(policy.rules, start=1):
        if rule.action == "allow":
            lines += _rule_lines(index, rule, out, per_host_ports)
            if not per_host_ports and rule.ports != union_ports(allowed):
                out.append(
                    Untranslatable(
                        rule_text(rule),
                        f"the common recipe: ports only by the global SSL_ports ({union_ports(allowed).describe()})",
                    )
                )
    lines.append("http_access deny all")
    return "\n".join(lines) + "\n", out


def squid_config(live: Path, port: int, access: str) -> str:
    """A forward proxy with no cache and no side services, its files in `live`, and `access` as its rules."""
    return (
        peers.squid_base(live, port)
        + f"""\
logformat egress %ts.%03tu %6tr %>a %Ss/%03>Hs %rm %ru %Sh/%<a:%<p
access_log stdio:{live}/egress.log egress
# Names resolve through the stand-ins' hosts file only; the DNS server named here is loopback, where nothing
# of ours answers, so an unmapped name fails to resolve instead of reaching the host's resolver.
hosts_file {live}/hosts
dns_nameservers {NO_RESOLVER}
dns_defnames off
dns_timeout 2 seconds
visible_hostname blastradius-egress
{access}"""
    )


def start(setup: EgressSetup, supervisor: Supervisor, per_host_ports: bool = True) -> PeerEgress:
    require("squid")
    policy = load(setup)
    names = check_names(setup.names)
    access, untranslatable = squid_policy(policy, names, per_host_ports)
    untranslatable += policy_wide(policy, "squid")
    setup.workdir.mkdir(parents=True, exist_ok=True)
    hosts = setup.workdir / "hosts"
    hosts.write_text(hosts_file_text(names))

    def collect_egress_log(peer: peers.Peer, live: Path) -> None:
        if (live / "egress.log").exists():
            shutil.copyfile(live / "egress.log", setup.workdir / "egress.log")

    lives: list[Path] = []

    def config(live: Path, port: int) -> str:
        lives.append(live)
        return squid_config(live, port, access)

    try:
        peer = peers.launch_squid(
            setup.workdir, supervisor, config, prepare=lambda live: shutil.copyfile(hosts, live / "hosts")
        )
    except peers.PeerError as exc:
        raise peer_error("squid", exc) from exc
    peer.on_stop.insert(0, lambda: collect_egress_log(peer, lives[0]))
    return PeerEgress(
        name="squid",
        peer=peer,
        proxy=Endpoint(peers.LOOPBACK, peer.port),
        untranslatable=untranslatable,
        config_files=[setup.workdir / "squid.conf", hosts],
        resolution=f"hosts_file {hosts.name} from the name map; dns_nameservers {NO_RESOLVER} (nothing answers);"
        " harness guard ACLs deny a name outside the map before any lookup and any address outside loopback",
        tls="tunnelled (CONNECT), not terminated",
        decision_log=lives[0] / "egress.log",
        notes=[
            "A denied request gets squid's own 403 page (ERR_ACCESS_DENIED), not the gateway's explanation.",
            *remap_note(setup.names, "squid"),
        ],
    )
