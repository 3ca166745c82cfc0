"""tinyproxy as an egress: the policy as the allowlist filter file a careful admin writes.

    FilterDefaultDeny Yes, FilterType ere   the filter file is the allowlist, one ERE per allowed host
    ConnectPort 443 / ConnectPort 80        the ports CONNECT may reach: the union of the allow rules' ports

tinyproxy has no deny list beside an allowlist, no per-host ports (ConnectPort is global, and plain http is not
restricted by port at all) and no method or path rules: each rule that loses meaning is listed in
`untranslatable`, with what tinyproxy does instead.

Names: tinyproxy uses the system resolver, so it runs in a private mount namespace (`unshare --mount`) where
/etc/hosts is the stand-ins' map, /etc/nsswitch.conf says `hosts: files` and /etc/resolv.conf names a loopback
address where nothing of ours answers: an unmapped name does not resolve, so it is never dialled.
"""

from __future__ import annotations

import ipaddress
import re
import shutil

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
    remap_note,
    require,
    rule_text,
    union_ports,
)
from harness.errors import EnvironmentMissing
from harness.gateway.policy import HostPattern, Policy
from harness.load import peers
from harness.sandbox.base import Endpoint
from harness.supervisor import Supervisor

ANY_NAME = r"^[^:]*[a-zA-Z_-][^:]*$"
"""`**`: a host name, never an IP literal (an IPv4 literal has no letter, an IPv6 one has a colon)."""
LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.0/8")
MAX_CONNECT_PORTS = 4096
"""A port range wider than this is written as no ConnectPort at all (every port), not thousands of lines."""
NAMESPACE_SCRIPT = (
    'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && mount --bind "$3" /etc/nsswitch.conf'
    ' && exec "$4" -d -c "$5"'
)
"""Run by `unshare --mount` as root: the private resolver files over the system's, then tinyproxy itself (exec:
the supervised pid is tinyproxy's)."""


def host_regex(host: HostPattern) -> str | None:
    """The ERE for a rule's hosts, or None when tinyproxy's string filter cannot express it."""
    if host.kind == "exact":
        return f"^{re.escape(host.value)}$"
    if host.kind == "one":
        return rf"^[^.]+\.{re.escape(host.value)}$"
    if host.kind == "any":
        return rf"^.+\.{re.escape(host.value)}$"
    if host.kind == "all":
        return ANY_NAME
    network = host.network
    if isinstance(network, ipaddress.IPv4Network) and network.supernet_of(LOOPBACK_V4):
        network = LOOPBACK_V4  # harness guard: an address rule is narrowed to its loopback part
    if isinstance(network, ipaddress.IPv4Network) and network.prefixlen % 8 == 0:
        octets = str(network.network_address).split(".")[: network.prefixlen // 8]
        rest = 4 - len(octets)
        return "^" + r"\.".join([*octets, *(["[0-9]+"] * rest)]) + "$"
    return None


def _hosts_overlap(a: HostPattern, b: HostPattern) -> bool:
    """Could one host match both patterns? (Conservative: True when unsure.)"""
    if (a.kind == "cidr") != (b.kind == "cidr"):
        return False
    if a.kind == "cidr":
        return a.network is not None and b.network is not None and a.network.overlaps(b.network)  # type: ignore[arg-type]
    if "all" in (a.kind, b.kind):
        return True
    if a.kind == "exact":
        return b.matches(a.value, False)
    if b.kind == "exact":
        return a.matches(b.value, False)
    return a.value == b.value or a.value.endswith("." + b.value) or b.value.endswith("." + a.value)


def tinyproxy_policy(
    policy: Policy, notes: list[str] | None = None
) -> tuple[list[str], list[str], list[Untranslatable]]:
    """Filter lines, ConnectPort values, and what tinyproxy cannot express; `notes` collects the harness guard's
    narrowing of address rules (tinyproxy has no way to refuse a non-loopback address otherwise)."""
    notes = notes if notes is not None else []
    out: list[Untranslatable] = []
    filters: list[str] = []
    allowed = [r for r in allows(policy) if not r.conditional]
    global_ports = union_ports(allowed)
    for rule in allows(policy):
        if rule.conditional:
            out.append(
                Untranslatable(
                    rule_text(rule),
                    "tinyproxy filters hosts only (FilterURLs works for plain http alone, for every rule): the host"
                    " is left out of the allowlist, so it is denied entirely",
                    cases=("paths",),
                )
            )
            continue
        network = rule.host.network
        if isinstance(network, ipaddress.IPv4Network) and not network.subnet_of(LOOPBACK_V4):
            if not network.supernet_of(LOOPBACK_V4):
                notes.append(f"{rule_text(rule)}: left out (harness guard: tinyproxy dials only loopback addresses)")
                continue
            notes.append(f"{rule_text(rule)}: narrowed to 127.0.0.0/8 (harness guard: it dials only loopback)")
        regex = host_regex(rule.host)
        if regex is None:
            out.append(
                Untranslatable(
                    rule_text(rule),
                    "tinyproxy's filter matches the host as text: only octet-aligned IPv4"
                    " prefixes can be written; this rule is left out, so it is denied",
                )
            )
            continue
        filters.append(f"# {rule_text(rule)}")
        filters.append(regex)
        if rule.ports != global_ports:
            out.append(
                Untranslatable(
                    rule_text(rule),
                    f"ConnectPort is global: CONNECT to this host opens on every allowed port"
                    f" ({global_ports.describe()}), not only its own",
                )
            )
        if not rule.ports.any_port:
            out.append(
                Untranslatable(
                    rule_text(rule), "tinyproxy restricts no port for plain http: GET http://host:ANY/ is let through"
                )
            )
    for rule in policy.rules:
        if rule.action != "deny":
            continue
        overlapping = [a for a in allows(policy) if _hosts_overlap(rule.host, a.host)]
        if overlapping:
            out.append(
                Untranslatable(
                    rule_text(rule),
                    "tinyproxy's filter is an allowlist only (FilterDefaultDeny Yes); it cannot deny inside "
                    + ", ".join(a.target for a in overlapping),
                )
            )
    if global_ports.any_port or sum(hi - lo + 1 for lo, hi in global_ports.ranges) > MAX_CONNECT_PORTS:
        connect_ports: list[str] = []
    elif not global_ports.ranges:
        connect_ports = ["0"]  # no allowed port: CONNECT disabled
    else:
        connect_ports = [str(p) for lo, hi in global_ports.ranges for p in range(lo, hi + 1)]
    return filters, connect_ports, out


def tinyproxy_config(workdir_text: str, port: int, connect_ports: list[str]) -> str:
    lines = [
        f"Port {port}",
        f"Listen {peers.LOOPBACK}",
        "Timeout 60",
        "MaxClients 1024",
        f'LogFile "{workdir_text}/tinyproxy.log"',
        "LogLevel Info",
        f'PidFile "{workdir_text}/tinyproxy.pid"',
        "Allow 127.0.0.0/8",
        f'Filter "{workdir_text}/filter"',
        "FilterType ere",
        "FilterDefaultDeny Yes",
        "DisableViaHeader Yes",
        *(f"ConnectPort {p}" for p in connect_ports),
    ]
    return "\n".join(lines) + "\n"


def start(setup: EgressSetup, supervisor: Supervisor) -> PeerEgress:
    exe = require("tinyproxy")
    unshare = shutil.which("unshare")
    if unshare is None:
        raise EnvironmentMissing("unshare (util-linux) is needed to give tinyproxy its own resolver files")
    policy = load(setup)
    names = check_names(setup.names)
    guard_notes: list[str] = []
    filters, connect_ports, untranslatable = tinyproxy_policy(policy, guard_notes)
    untranslatable += policy_wide(policy, "tinyproxy")
    work = setup.workdir
    work.mkdir(parents=True, exist_ok=True)
    (work / "filter").write_text("\n".join(filters) + "\n")
    (work / "hosts").write_text(hosts_file_text(names))
    (work / "resolv.conf").write_text(f"nameserver {NO_RESOLVER}\noptions timeout:1 attempts:1\n")
    (work / "nsswitch.conf").write_text("hosts: files\n")
    port = peers.free_port()
    conf = work / "tinyproxy.conf"
    conf.write_text(tinyproxy_config(str(work), port, connect_ports))
    argv = [
        unshare,
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        NAMESPACE_SCRIPT,
        "tinyproxy-egress",
        *(str(work / f) for f in ("hosts", "resolv.conf", "nsswitch.conf")),
        exe,
        str(conf),
    ]
    try:
        peer = peers.launch_peer("tinyproxy", argv, port, work, supervisor)
    except peers.PeerError as exc:
        raise peer_error("tinyproxy", exc) from exc
    return PeerEgress(
        name="tinyproxy",
        peer=peer,
        proxy=Endpoint(peers.LOOPBACK, port),
        untranslatable=untranslatable,
        config_files=[conf, work / "filter", work / "hosts", work / "resolv.conf", work / "nsswitch.conf"],
        resolution="private mount namespace (unshare --mount): /etc/hosts is the name map, nsswitch `hosts: files`,"
        f" resolv.conf names {NO_RESOLVER} (nothing answers)",
        tls="tunnelled (CONNECT), not terminated",
        decision_log=work / "tinyproxy.log",
        notes=[
            "A denied request gets tinyproxy's own 403 page (Filtered / Access violation).",
            *guard_notes,
            *remap_note(setup.names, "tinyproxy"),
        ],
    )
