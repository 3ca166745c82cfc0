"""mitmproxy (mitmdump) as an egress: the policy as a JSON file read by an allowlist addon
(harness/egress/mitmproxy_addon.py) that decides on `http_connect` (host and port: a CONNECT to a port the
host's rules do not name gets a 403) and on `request` (method and path, for plain http and inside tunnels).

It runs intercepting, mitmproxy's default and the only way its addon sees a request inside a tunnel: clients
must trust `ca_file`, and it verifies the stand-ins' certificates with EgressSetup.upstream_ca. A tunnel that
carries no TLS (ssh to an allowed :22) is passed through as raw TCP. Names are never resolved: the addon's
`server_connect` hook sets each connection's address from EgressSetup.names and refuses any other destination.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.egress import EgressSetup, Untranslatable
from harness.egress.translate import (
    PeerEgress,
    check_names,
    load,
    peer_error,
    policy_wide,
    port_remaps,
    require,
    rule_text,
)
from harness.gateway.policy import Policy
from harness.load import peers
from harness.sandbox.base import Endpoint
from harness.supervisor import Supervisor

ADDON = Path(__file__).with_name("mitmproxy_addon.py")
"""The allowlist addon, run by mitmdump's own Python (it imports nothing of blastradius)."""


def mitmproxy_policy(policy: Policy, names: dict[str, str]) -> tuple[dict[str, Any], list[Untranslatable]]:
    """The addon's JSON for `policy`, and what it cannot express."""
    out: list[Untranslatable] = []
    rules = []
    for rule in policy.rules:
        rules.append(
            {
                "action": rule.action,
                "kind": rule.host.kind,
                "value": rule.host.value,
                "network": str(rule.host.network) if rule.host.network is not None else None,
                "covers_loopback": rule.host.covers_loopback,
                "ports": None if rule.ports.any_port else [list(r) for r in rule.ports.ranges],
                "methods": sorted(rule.methods) if rule.methods is not None else None,
                "paths": [p.pattern for p in rule.paths] if rule.paths is not None else None,
                "name": rule.name,
            }
        )
        if rule.paths is not None:
            out.append(
                Untranslatable(
                    rule_text(rule),
                    "the addon matches flow.request.path as sent (query cut), without the gateway's dot-segment and"
                    " percent-escape normalisation",
                )
            )
    return {"policy": policy.name, "rules": rules, "names": names, "remaps": {}}, out


def start(setup: EgressSetup, supervisor: Supervisor) -> PeerEgress:
    exe = require("mitmproxy")
    policy = load(setup)
    names = check_names(setup.names)
    data, untranslatable = mitmproxy_policy(policy, names)
    data["remaps"] = {key: list(target) for key, target in port_remaps(setup.names).items()}
    untranslatable += policy_wide(policy, "mitmproxy")
    work = setup.workdir
    work.mkdir(parents=True, exist_ok=True)
    policy_json = work / "mitmproxy-policy.json"
    policy_json.write_text(json.dumps(data, indent=2) + "\n")
    confdir = work / "confdir"
    confdir.mkdir(exist_ok=True)
    port = peers.free_port()
    options = {
        "confdir": str(confdir),
        "egress_policy": str(policy_json),
        "connection_strategy": "eager",
        "flow_detail": "1",
        "termlog_verbosity": "info",
    }
    if setup.upstream_ca is not None:
        options["ssl_verify_upstream_trusted_ca"] = str(setup.upstream_ca)
    argv = [exe, "--listen-host", peers.LOOPBACK, "--listen-port", str(port), "-s", str(ADDON)]
    for key, value in options.items():
        argv += ["--set", f"{key}={value}"]
    (work / "mitmdump.args").write_text("\n".join(argv) + "\n")
    try:
        peer = peers.launch_peer(
            "mitmproxy",
            argv,
            port,
            work,
            supervisor,
            log_name="mitmdump.out",
            ca_file=confdir / "mitmproxy-ca-cert.pem",
            env={"PYTHONUNBUFFERED": "1"},  # its log is the decision log: line by line, as it happens
        )
    except peers.PeerError as exc:
        raise peer_error("mitmproxy", exc) from exc
    return PeerEgress(
        name="mitmproxy",
        peer=peer,
        proxy=Endpoint(peers.LOOPBACK, port),
        untranslatable=untranslatable,
        config_files=[policy_json, ADDON, work / "mitmdump.args"],
        resolution="none: the addon's server_connect hook dials each name at its address in the name map and"
        " refuses every other destination",
        tls="intercepted (mitmproxy's default): clients trust ca_file; a non-TLS tunnel passes as raw TCP",
        decision_log=work / "mitmdump.out",
        ca_file=confdir / "mitmproxy-ca-cert.pem",
        notes=["A denied request gets the addon's 403 'Blocked by network policy: host:port (rule)'."],
    )
