"""What the peer egresses (squid, tinyproxy, mitmproxy) share: the parsed policy, the one name map, how a
rule is written back as text, and the running peer as an Egress.

Each peer module turns `harness.gateway.policy.Policy` into its proxy's own configuration the way a careful
admin would, and lists in `untranslatable` every rule it could only express more loosely or more strictly
than the gateway does, with why. Nothing here decides a request: the peer does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.egress import EgressSetup, Untranslatable
from harness.errors import ConfigError, EnvironmentMissing
from harness.gateway.policy import Policy, PolicyError, PortSet, Rule, load_policy
from harness.load import peers
from harness.sandbox.base import Endpoint

NO_RESOLVER = "127.0.0.1"
"""Where a peer that insists on a DNS server is pointed: nothing of ours answers there, and every name the
harness uses is in its hosts file first."""


def load(setup: EgressSetup) -> Policy:
    """The setup's policy, parsed exactly as the gateway parses it (a bad file is one ConfigError line)."""
    try:
        return load_policy(setup.policy)
    except PolicyError as exc:
        raise ConfigError(str(exc)) from exc


def check_names(names: Mapping[str, str]) -> dict[str, str]:
    """The name map's plain entries (name -> loopback address), refused unless every address is loopback: the
    peers dial nothing else. `name:port -> address:port` entries (a stand-in on another port) are left to
    port_remaps."""
    out: dict[str, str] = {}
    for name, address in names.items():
        if ":" in name:
            continue
        out[name.lower().rstrip(".")] = _loopback(name, address)
    return out


def port_remaps(names: Mapping[str, str]) -> dict[str, tuple[str, int]]:
    """The map's `name:port -> address:port` entries, as "name:port" -> (address, port)."""
    out: dict[str, tuple[str, int]] = {}
    for key, value in names.items():
        if ":" not in key:
            continue
        name, _, port = key.rpartition(":")
        address, _, new_port = value.rpartition(":")
        if not (port.isdigit() and new_port.isdigit()):
            raise ConfigError(f"egress name {key!r} -> {value!r}: a remap is name:port -> address:port")
        out[f"{name.lower().rstrip('.')}:{int(port)}"] = (_loopback(key, address), int(new_port))
    return out


def remap_note(names: Mapping[str, str], peer: str) -> list[str]:
    """What a peer that maps names to addresses only says about the map's port remaps it cannot apply."""
    remaps = port_remaps(names)
    if not remaps:
        return []
    listed = ", ".join(f"{k} -> {a}:{p}" for k, (a, p) in sorted(remaps.items()))
    return [
        f"{peer} maps names to addresses only: these port remaps are not applied (it dials the name's port): {listed}"
    ]


def _loopback(name: str, address: str) -> str:
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError as exc:
        raise ConfigError(f"egress name {name!r} maps to {address!r}, which is not an IP address") from exc
    if not ip.is_loopback:
        raise ConfigError(f"egress name {name!r} maps to {address}, which is not a loopback address")
    return str(ip)


def hosts_file_text(names: Mapping[str, str]) -> str:
    """/etc/hosts syntax for the name map, and nothing else (not even localhost: no case needs it)."""
    lines = ["# blastradius egress: the only names this proxy may resolve, each to its loopback stand-in"]
    lines += [f"{address} {name}" for name, address in sorted(names.items())]
    return "\n".join(lines) + "\n"


def require(name: str) -> str:
    """The peer's executable, or EnvironmentMissing naming its install command."""
    exe = peers.binary(name)
    if exe is None:
        raise EnvironmentMissing(f"{name} is not installed; install it with: {peers.INSTALL[name]}")
    return exe


def rule_text(rule: Rule) -> str:
    """The rule as the policy file gives it, with the ports, methods and paths it carries."""
    text = f"{rule.action}: {rule.target} (ports {rule.ports.describe()}"
    if rule.methods is not None:
        text += f", methods {','.join(sorted(rule.methods))}"
    if rule.paths is not None:
        text += f", paths {' '.join(p.pattern for p in rule.paths)}"
    return text + ")"


def port_list(ports: PortSet) -> list[str]:
    """Ports as `443` and `8000-8100` items; every port is `1-65535`."""
    if ports.any_port:
        return ["1-65535"]
    return [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports.ranges]


def union_ports(rules: list[Rule]) -> PortSet:
    """Every port some rule names (a rule on every port makes it every port)."""
    if any(r.ports.any_port for r in rules):
        return PortSet((), any_port=True)
    ranges = sorted({rng for r in rules for rng in r.ports.ranges})
    merged: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return PortSet(tuple(merged))


def allows(policy: Policy) -> list[Rule]:
    return [r for r in policy.rules if r.action == "allow"]


def denies(policy: Policy) -> list[Rule]:
    return [r for r in policy.rules if r.action == "deny"]


@dataclass
class PeerEgress:
    """A peer proxy started from the policy: the Egress the conformance suite and the scenarios drive."""

    name: str
    peer: peers.Peer
    proxy: Endpoint
    untranslatable: list[Untranslatable]
    config_files: list[Path]
    resolution: str
    """How names resolve for it (only to the loopback stand-ins)."""
    tls: str
    """Whether it terminates TLS or tunnels it."""
    decision_log: Path | None = None
    """Where the running peer logs each request and its outcome (evidence beyond the canaries)."""
    ca_file: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [self.peer.pid] if self.running else []

    @property
    def running(self) -> bool:
        return any(r.pid == self.peer.pid for r in self.peer.supervisor.live())

    def stop(self) -> None:
        if self.running:
            self.peer.stop()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "version": peers.version(self.name),
            "config": [str(p) for p in self.config_files],
            "name_resolution": self.resolution,
            "tls": self.tls,
            "decision_log": str(self.decision_log) if self.decision_log else None,
            "untranslatable": [{"rule": u.rule, "why": u.why} for u in self.untranslatable],
            "notes": list(self.notes),
        }


def peer_error(name: str, exc: peers.PeerError) -> EnvironmentMissing:
    """A peer that would not start from its translated configuration, as one line naming the log."""
    return EnvironmentMissing(f"{name} did not start from the translated policy: {exc}")


def policy_wide(policy: Policy, peer: str) -> list[Untranslatable]:
    """The policy's settings beyond its rules that no peer here has."""
    out = []
    if policy.loop_threshold > 0:
        out.append(
            Untranslatable(
                f"loop_breaker: threshold {policy.loop_threshold} in {policy.loop_window_s:g}s",
                f"{peer} has no breaker for a client that retries a denied request in a loop",
            )
        )
    if policy.dns:
        out.append(Untranslatable("dns: enabled", f"{peer} serves no policy-gated DNS to the sandbox", ("dns",)))
    if policy.credentials:
        out.append(Untranslatable("credentials", f"{peer} is configured to inject no credential"))
    if policy.deny_mode == "reset":
        out.append(Untranslatable("deny_mode: reset", f"{peer} answers a denied request with its own 403 page"))
    return out
