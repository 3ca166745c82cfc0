"""The targets a bench compares, all started once and kept up for every round: `direct` (no proxy), `gateway`
(ours; allowed traffic is a blind CONNECT tunnel or a parsed plain-http forward), `gateway-intercept` (ours,
terminating TLS to inject the model API key), and the peers squid, tinyproxy and mitmproxy.

Every target gets the same four kinds of traffic against the same nginx upstream (harness.load.nginx):
  model     https POST through CONNECT;  gateway-intercept sends it to api.anthropic.com:443
            (the gateway's upstream override dials nginx, which checks the injected key) with the sentinel
  page      plain-http GET of 1 KiB, absolute-form through the proxy
  download  plain-http GET of a larger body (256 KiB by default)
  blocked   plain-http GET of blocked.test, which every proxy denies with a 403; `direct` has no proxy to
            deny it, so it asks nginx's deny listener, which answers 403 to everything (the stand-in)
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.gateway.process import SENTINEL, CredentialSpec, GatewayConfig, GatewayProcess
from harness.load import peers
from harness.load.nginx import KEY_HEADER, MODEL_HOST, MODEL_PATH, Nginx
from harness.load.peers import BLOCKED_HOST, PEERS
from harness.supervisor import Supervisor

DIRECT = "direct"
GATEWAY = "gateway"
GATEWAY_INTERCEPT = "gateway-intercept"
ALL_TARGETS = (DIRECT, GATEWAY, GATEWAY_INTERCEPT, *PEERS)
PAGE_BYTES = 1024
"""The `page` kind's body: a small plain-http answer (an API's JSON, a redirect, a metadata file)."""
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
    """The shared nginx upstream and the bench's model key (generated per run)."""

    nginx: Nginx
    """Our nginx on loopback."""
    key: str
    """The model key nginx expects from api.anthropic.com's callers (only the gateway holds it)."""

    @classmethod
    def start(cls, workdir: Path, supervisor: Supervisor, sizes: tuple[int, ...] = ()) -> Upstream:
        key = "sk-bench-" + secrets.token_hex(16)
        return cls(Nginx.start(workdir, supervisor, key, (PAGE_BYTES, *sizes)), key)

    @property
    def ca_file(self) -> Path:
        return self.nginx.ca_file

    def overrides(self) -> dict[str, str]:
        """The gateway's upstream override: api.anthropic.com:443 dials nginx's https listener."""
        return {f"{MODEL_HOST}:443": f"127.0.0.1:{self.nginx.https_port}"}

    def http_url(self, size: int) -> str:
        return f"http://127.0.0.1:{self.nginx.http_port}{self.nginx.add_bytes(size)}"

    def https_url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.nginx.https_port}{path}"

    def url(self, kind: str, download_bytes: int, stream_bytes: int) -> str:
        """The URL a proxied client asks for, per traffic kind."""
        if kind == "model":
            return self.https_url(self.nginx.add_bytes(stream_bytes) if stream_bytes else MODEL_PATH)
        if kind == "page":
            return self.http_url(PAGE_BYTES)
        if kind == "download":
            return self.http_url(download_bytes)
        return f"http://{BLOCKED_HOST}/"

    def deny_url(self) -> str:
        """`direct`'s blocked URL: nginx's deny listener (403 to everything)."""
        return f"http://127.0.0.1:{self.nginx.deny_port}/"

    def stop(self) -> None:
        self.nginx.stop()


@dataclass
class Endpoint:
    """A started target: where clients send traffic and how to stop it."""

    name: str
    proxy: tuple[str, int] | None
    """Loopback proxy address; None for direct."""
    urls: dict[str, str]
    """Traffic kind -> absolute URL."""
    headers: dict[str, dict[str, str]]
    """Traffic kind -> extra request headers."""
    ca_pems: list[bytes]
    """What a client must trust: nginx's CA, plus an intercepting proxy's."""
    pids: list[int]
    """Root pids of the proxy's processes (CPU is sampled over each tree)."""
    stop: Callable[[], None]
    describe: dict[str, Any] = field(default_factory=dict)
    tls_host: str = "127.0.0.1"
    """Host name the https workloads address (api.anthropic.com where the gateway intercepts)."""
    tls_headers: dict[str, str] = field(default_factory=dict)
    """Headers of the https workloads (the credential sentinel where the gateway injects the key)."""

    def https_url(self, upstream: Upstream, path: str) -> str:
        if self.tls_host == "127.0.0.1":
            return upstream.https_url(path)
        return f"https://{self.tls_host}{path}"


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
    pems = [upstream.ca_file.read_bytes()]
    if name == DIRECT:
        if "blocked" in urls:
            urls["blocked"] = upstream.deny_url()
        describe = {"kind": "none", "intercepts_tls": False, "notes": ["blocked traffic: nginx's deny listener"]}
        return Endpoint(name, None, urls, {}, pems, [], lambda: None, describe)
    if name in (GATEWAY, GATEWAY_INTERCEPT):
        return _start_gateway(name, workdir, supervisor, upstream, urls, gateway_ca_dir)
    peer = peers.start_peer(name, workdir, supervisor, upstream.ca_file)
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
        upstream_overrides=upstream.overrides(),
        upstream_ca_file=upstream.ca_file,
        log_level="WARNING",
        extra_env={KEY_ENV: upstream.key},
    )
    gw = GatewayProcess(cfg).start()
    supervisor.adopt(gw.pid, f"gateway:{name}")
    pid = gw.pid

    def stop() -> None:
        gw.stop()
        supervisor.stop(pid)  # already gone; this just forgets the record

    intercepts = name == GATEWAY_INTERCEPT
    try:
        port = gw.add_sandbox(f"load-{name}")
        pems = [upstream.ca_file.read_bytes()]
        headers: dict[str, dict[str, str]] = {}
        if intercepts:
            if "model" in urls:
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
            "notes": ["https is TLS-terminated and gets the key injected; plain http is parsed and forwarded"]
            if intercepts
            else ["allowed https is a blind CONNECT tunnel; plain http is parsed and forwarded"],
        },
        tls_host=MODEL_HOST if intercepts else "127.0.0.1",
        tls_headers={KEY_HEADER: SENTINEL} if intercepts else {},
    )
