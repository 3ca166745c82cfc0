"""mitmdump addon: an allowlist read from a JSON file, the way an admin scripts mitmproxy.

Runs inside mitmproxy's own venv (it imports nothing of blastradius). Loaded as
`mitmdump -s mitmproxy_addon.py --set egress_policy=policy.json`; the JSON is written by
harness/egress/mitmproxy.py from the gateway policy:

    {"rules": [{"action", "kind", "value", "network", "covers_loopback", "ports", "methods", "paths"}],
     "names": {"allowed.test": "127.0.0.2"}, "remaps": {"allowed.test:22": ["127.0.0.2", 2222]}}

Hooks: `http_connect` decides the CONNECT target (host and port) and answers 403 to a denied one; `request`
decides every request it sees (plain http, and each request inside an intercepted tunnel) with its method and
path; `server_connect` dials a name only at its address from `names`, and refuses any other destination, so
nothing is ever resolved through the host.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Rule:
    def __init__(self, data: dict[str, Any]) -> None:
        self.action: str = data["action"]
        self.kind: str = data["kind"]
        self.value: str = data["value"]
        self.network = ipaddress.ip_network(data["network"]) if data["network"] else None
        self.covers_loopback: bool = data["covers_loopback"]
        self.ports: list[list[int]] | None = data["ports"]  # None: every port
        self.methods: set[str] | None = set(data["methods"]) if data["methods"] is not None else None
        self.paths = [re.compile(p) for p in data["paths"]] if data["paths"] is not None else None
        self.name: str = data["name"]

    @property
    def conditional(self) -> bool:
        return self.methods is not None or self.paths is not None

    def matches_dest(self, host: str, port: int) -> bool:
        if self.ports is not None and not any(lo <= port <= hi for lo, hi in self.ports):
            return False
        address = _ip(host)
        if address is not None:
            if self.action == "deny" and self.covers_loopback and address.is_loopback:
                return True
            return self.network is not None and address in self.network
        if self.kind == "cidr":
            return False
        if self.kind == "exact":
            return host == self.value
        if self.kind == "all":
            return True
        suffix = "." + self.value
        return host.endswith(suffix) and (self.kind == "any" or "." not in host[: -len(suffix)])

    def matches_request(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self.paths is None or any(p.match(path) for p in self.paths)


class Allowlist:
    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.names: dict[str, str] = {}
        self.remaps: dict[str, list[Any]] = {}
        """"name:port" -> [address, port]: a stand-in that listens on another port than the one asked for."""
        self.tunnels: dict[str, str] = {}
        """Client connection id -> the name its CONNECT was allowed for."""

    def client_disconnected(self, client: Any) -> None:
        self.tunnels.pop(client.id, None)

    def load(self, loader: Any) -> None:
        loader.add_option("egress_policy", str, "", "JSON policy written by blastradius")

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx

        if "egress_policy" in updated and ctx.options.egress_policy:
            with open(ctx.options.egress_policy) as f:
                data = json.load(f)
            self.rules = [Rule(r) for r in data["rules"]]
            self.names = data["names"]
            self.remaps = data.get("remaps", {})

    def destination(self, host: str, port: int) -> tuple[bool, str]:
        matching = [r for r in self.rules if r.matches_dest(host, port)]
        for rule in matching:
            if rule.action == "deny" and not rule.conditional:
                return False, rule.name
        for rule in matching:
            if rule.action == "allow":
                return True, rule.name
        return False, "default-deny"

    def request_decision(self, host: str, port: int, method: str, path: str) -> tuple[bool, str]:
        matching = [r for r in self.rules if r.matches_dest(host, port) and r.matches_request(method, path)]
        for rule in matching:
            if rule.action == "deny":
                return False, rule.name
        if matching:
            return True, matching[0].name
        return False, "default-deny"

    @staticmethod
    def _deny(flow: Any, host: str, port: int, rule: str) -> None:
        from mitmproxy import http

        body = f"Blocked by network policy: {host}:{port} ({rule})\n"
        flow.response = http.Response.make(403, body, {"Content-Type": "text/plain", "Connection": "close"})

    def http_connect(self, flow: Any) -> None:
        host, port = flow.request.host.lower().rstrip("."), flow.request.port
        allowed, rule = self.destination(host, port)
        if not allowed:
            self._deny(flow, host, port, rule)
        else:
            self.tunnels[flow.client_conn.id] = host

    def request(self, flow: Any) -> None:
        if flow.response is not None:
            return
        # Inside a tunnel the request's host is the address server_connect dialled: decide on the CONNECT's name.
        host = self.tunnels.get(flow.client_conn.id) or flow.request.host
        host, port = host.lower().rstrip("."), flow.request.port
        allowed, rule = self.request_decision(host, port, flow.request.method.upper(), flow.request.path.split("?")[0])
        if not allowed:
            self._deny(flow, host, port, rule)

    def server_connect(self, data: Any) -> None:
        host, port = data.server.address
        host = host.lower().rstrip(".")
        remap = self.remaps.get(f"{host}:{port}")
        if remap is not None:
            data.server.address = (remap[0], remap[1])
            return
        if host in self.names:
            data.server.address = (self.names[host], port)
            return
        address = _ip(host)
        if address is None or not address.is_loopback:
            data.server.error = f"{host} is not in the egress name map: not resolved, not dialled"


addons = [Allowlist()]
