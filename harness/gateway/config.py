"""GatewayConfig: everything the gateway process needs, serialisable to JSON without secrets."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.gateway.credentials import CredentialSpec
from harness.gateway.loopbreaker import check_loop_answer

# Hardening defaults. Generous enough for real agents and package managers, tight enough that a
# misbehaving guest cannot hold the gateway's memory or sockets.
MAX_HEADER_BYTES = 32 * 1024  # whole request head (line + headers)
MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_COUNT = 100
HEADER_TIMEOUT_S = 10.0  # from the first byte of a head to its end (slowloris)
IDLE_TIMEOUT_S = 60.0  # keep-alive wait for the next request, and any stalled body read
TUNNEL_IDLE_TIMEOUT_S = 300.0  # a CONNECT tunnel with no bytes either way
CONNECT_TIMEOUT_S = 10.0
TLS_HANDSHAKE_TIMEOUT_S = 10.0
UPSTREAM_RESPONSE_TIMEOUT_S = 120.0  # model APIs can think for a long time before answering
MAX_CONNECTIONS_PER_SANDBOX = 256
MAX_CONNECTIONS_TOTAL = 4096


@dataclass
class Limits:
    max_header_bytes: int = MAX_HEADER_BYTES
    max_request_line: int = MAX_REQUEST_LINE
    max_header_count: int = MAX_HEADER_COUNT
    header_timeout_s: float = HEADER_TIMEOUT_S
    idle_timeout_s: float = IDLE_TIMEOUT_S
    tunnel_idle_timeout_s: float = TUNNEL_IDLE_TIMEOUT_S
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    tls_handshake_timeout_s: float = TLS_HANDSHAKE_TIMEOUT_S
    upstream_response_timeout_s: float = UPSTREAM_RESPONSE_TIMEOUT_S
    max_connections_per_sandbox: int = MAX_CONNECTIONS_PER_SANDBOX
    max_connections_total: int = MAX_CONNECTIONS_TOTAL


def default_ca_dir() -> Path:
    """The per-install CA lives outside any run directory so guests' trust stays valid."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "blastradius" / "gateway-ca"


@dataclass
class GatewayConfig:
    """How to run one gateway.

    policy: a preset name ("open", "balanced", "locked") or a path to a policy YAML file.
    deny_mode: None keeps the policy's own; else "403", "403-explained" or "reset".
    loop_breaker: enable the retry-loop breaker; threshold/window/answer default to the policy's.
    loop_answer: once tripped, "429" (HTTP-correct) or "200-terminal" (200 + the same permanent-block
        explanation, which ends the loop of a client that retries every non-2xx); None: the policy's.
    audit_path: JSONL audit log; None means <state_dir>/gateway-audit.jsonl.
    state_dir: control socket, ready file, gateway.log, config.json. None: a fresh temp dir.
    ca_dir: the per-install CA (ca.pem public, ca-key.pem private); None: ~/.local/state/...
    credentials: None uses the policy's `credentials:` or else the defaults (anthropic, openai).
    upstream_overrides: host-side resolution override. Keys "host:port", "host", "*:port" or
        "*"; values "ip:port" or "ip". Policy, credential binding, SNI and leaf certificates
        keep using the real name; only the TCP dial goes to the override address. This is how
        tests and benchmarks point api.anthropic.com:443 at a loopback upstream.
    upstream_ca_file: extra CA (PEM) the gateway trusts when it verifies upstream TLS.
    dns: None keeps the policy's; True opens a policy-gated DNS resolver per sandbox.
    exit_with_parent: the gateway process exits when the process that started it dies.
    parent_pid: that process (set by GatewayProcess.start): a gateway whose parent died before it could
        look is already an orphan, and must not take its adoptive parent (init) for its starter.
    extra_env: environment for the gateway process only (e.g. the secret a credential's `env`
        names). Never serialised, never written to disk.
    """

    policy: str | Path = "balanced"
    deny_mode: str | None = None
    loop_breaker: bool = True
    loop_threshold: int | None = None
    loop_window_s: float | None = None
    loop_answer: str | None = None
    audit_path: Path | None = None
    state_dir: Path | None = None
    ca_dir: Path | None = None
    credentials: list[CredentialSpec] | None = None
    upstream_overrides: dict[str, str] = field(default_factory=dict)
    upstream_ca_file: Path | None = None
    dns: bool | None = None
    listen_host: str = "127.0.0.1"
    limits: Limits = field(default_factory=Limits)
    log_level: str = "INFO"
    exit_with_parent: bool = True
    parent_pid: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict, repr=False)
    startup_timeout_s: float = 15.0

    def __post_init__(self) -> None:
        # Fail in the harness, not later in a gateway process whose log nobody is reading.
        if self.loop_answer is not None:
            check_loop_answer(self.loop_answer)

    def to_json(self) -> str:
        data: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key in ("extra_env",):
                continue
            data[key] = str(value) if isinstance(value, Path) else value
        data["credentials"] = None if self.credentials is None else [c.to_dict() for c in self.credentials]
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> GatewayConfig:
        data = json.loads(text)
        paths = ("audit_path", "state_dir", "ca_dir", "upstream_ca_file")
        for key in paths:
            if data.get(key) is not None:
                data[key] = Path(data[key])
        if data.get("credentials") is not None:
            data["credentials"] = [CredentialSpec.from_dict(c) for c in data["credentials"]]
        data["limits"] = Limits(**data.get("limits", {}))
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
