"""The targets a bench compares, each started fresh for its turn and stopped after it:
`direct` (no proxy), `gateway` (ours; allowed traffic is a blind CONNECT tunnel or a parsed
plain-http forward), `gateway-intercept` (ours, terminating TLS to inject the model API key),
and the peers squid, tinyproxy and mitmproxy.

Every target gets the same three kinds of traffic against the same loopback upstream:
  model     https POST through CONNECT;  gateway-intercept sends it to api.anthropic.com:443
            (the gateway's upstream override dials the local upstream) with the sentinel key
  download  plain-http GET, absolute-form through the proxy
  blocked   plain-http GET of blocked.test, which every proxy denies with a 403
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.gateway.process import SENTINEL, CredentialSpec, GatewayConfig, GatewayProcess
from harness.load import peers
from harness.load.peers import BLOCKED_HOST, PEERS
from harness.standins.upstream import UpstreamServer
from harness.supervisor import Supervisor

DIRECT = "direct"
GATEWAY = "gateway"
GATEWAY_INTERCEPT = "gateway-intercept"
ALL_TARGETS = (DIRECT, GATEWAY, GATEWAY_INTERCEPT, *PEERS)
MODEL_HOST = "api.anthropic.com"
MODEL_PATH = "/v1/messages"
KEY_HEADER = "x-api-key"
KEY_ENV = "BR_LOAD_MODEL_KEY"
"""The gateway reads the model key from this variable of its own environment only."""
GATEWAY_POLICY = f"""\
name: load-bench
deny_mode: 403-explained
rules:
  - allow: 127.0.0.1/32
    ports: ["1024-65535"]
  - allow: {MODEL_HOST}
  - deny: "{BLOCKED_HOST}:*"
"""
"""127.0.0.1 is allowed with no credential and no method/path rule, so the gateway tunnels it
blindly (like squid); api.anthropic.com carries a credential, so the gateway intercepts it."""


@dataclass
class Upstream:
    """The shared upstream and the bench's model key (generated per run, never written)."""

    server: UpstreamServer
    key: str

    @classmethod
    def start(cls) -> Upstream:
        key = "sk-bench-" + secrets.token_hex(16)
        return cls(UpstreamServer(expected={MODEL_HOST: (KEY_HEADER, key)}).start(), key)

    def url(self, kind: str, download_bytes: int, stream_bytes: int) -> str:
        s = self.server
        if kind == "model":
            path = f"/bytes/{stream_bytes}" if stream_bytes else MODEL_PATH
            return f"https://127.0.0.1:{s.https_port}{path}"
        if kind == "download":
            return f"http://127.0.0.1:{s.http_port}/bytes/{download_bytes}"
        return f"http://{BLOCKED_HOST}/"


@dataclass
class Endpoint:
    """A started target: where clients send traffic and how to stop it."""

    name: str
    proxy: tuple[str, int] | None
    urls: dict[str, str]
    headers: dict[str, dict[str, str]]
    ca_pems: list[bytes]
    pids: list[int]
    stop: Callable[[], None]
    describe: dict[str, Any] = field(default_factory=dict)


def start_target(
    name: str,
    workdir: Path,
    supervisor: Supervisor,
    upstream: Upstream,
    traffic: tuple[str, ...],
    download_bytes: int,
    stream_bytes: int,
    gateway_ca_dir: Path | None = None,
) -> Endpoint:
    """Start `name`; raises peers.PeerMissing for an uninstalled peer."""
    workdir.mkdir(parents=True, exist_ok=True)
    urls = {k: upstream.url(k, download_bytes, stream_bytes) for k in traffic}
    if name == DIRECT:
        urls.pop("blocked", None)  # nothing on the direct path can block: that kind does not apply
        return Endpoint(
            name,
            None,
            urls,
            {},
            [upstream.server.ca_file.read_bytes()],
            [],
            lambda: None,
            {"kind": "none", "intercepts_tls": False},
        )
    if name in (GATEWAY, GATEWAY_INTERCEPT):
        return _start_gateway(name, workdir, supervisor, upstream, urls, gateway_ca_dir)
    peer = peers.start_peer(name, workdir, supervisor, upstream.server.ca_file)
    pems = [upstream.server.ca_file.read_bytes()]
    if peer.ca_file is not None:
        pems.append(peer.ca_file.read_bytes())
    return Endpoint(
        name,
        peer.address,
        urls,
        {},
        pems,
        [peer.pid],
        peer.stop,
        {
            "kind": "peer",
            "version": peers.version(name),
            "intercepts_tls": peer.ca_file is not None,
            "config_dir": str(workdir),
            "notes": peer.notes,
        },
    )


def _start_gateway(
    name: str, workdir: Path, supervisor: Supervisor, upstream: Upstream, urls: dict[str, str], ca_dir: Path | None
) -> Endpoint:
    policy = workdir / "policy.yaml"
    policy.write_text(GATEWAY_POLICY)
    cfg = GatewayConfig(
        policy=policy,
        # The blocked user repeats one denied request on purpose: measure the 403 path, not the
        # loop-breaker's 429 (whose cost is the same lookup plus a counter).
        loop_breaker=False,
        state_dir=workdir / "state",
        audit_path=workdir / "audit.jsonl",
        ca_dir=ca_dir,
        credentials=[CredentialSpec("model", MODEL_HOST, KEY_HEADER, env=KEY_ENV)],
        upstream_overrides=upstream.server.overrides((MODEL_HOST,)),
        upstream_ca_file=upstream.server.ca_file,
        log_level="WARNING",
        extra_env={KEY_ENV: upstream.key},
    )
    gw = GatewayProcess(cfg).start()
    supervisor.adopt(gw.pid, f"gateway:{name}")
    pid = gw.pid

    def stop() -> None:
        gw.stop()
        supervisor.stop(pid)  # already gone; this just forgets the record

    try:
        port = gw.add_sandbox(f"load-{name}")
        pems = [upstream.server.ca_file.read_bytes()]
        headers: dict[str, dict[str, str]] = {}
        intercepts = name == GATEWAY_INTERCEPT and "model" in urls
        if intercepts:
            path = urls["model"].split("/", 3)[3]
            urls["model"] = f"https://{MODEL_HOST}/{path}"
            headers["model"] = {KEY_HEADER: SENTINEL}
            pems.append(gw.ca_cert_pem())
    except BaseException:
        stop()
        raise
    return Endpoint(
        name,
        ("127.0.0.1", port),
        urls,
        headers,
        pems,
        [pid],
        stop,
        {
            "kind": "gateway",
            "intercepts_tls": intercepts,
            "policy": GATEWAY_POLICY,
            "state_dir": str(workdir / "state"),
            "notes": ["model requests are TLS-terminated and get the key injected"]
            if intercepts
            else ["allowed https is a blind CONNECT tunnel; plain http is parsed and forwarded"],
        },
    )
