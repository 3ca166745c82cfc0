"""The gateway's state in one place: what every sandbox connection reads, built once from a GatewayConfig.

Sessions and the DNS resolver are handed this one object, never the runtime that owns the
listeners (server.Gateway), so nothing below the listeners can reach back up. The control API
changes it in place between requests: the deny settings (set_deny) and the toxics.
"""

from __future__ import annotations

import ssl
from collections import Counter
from dataclasses import dataclass, field

from harness.gateway.audit import AuditLog
from harness.gateway.config import GatewayConfig, Limits, default_ca_dir
from harness.gateway.credentials import DEFAULT_CREDENTIALS, CredentialSpec, CredentialStore
from harness.gateway.dial import Overrides
from harness.gateway.loopbreaker import LOOP_ANSWERS, LoopBreaker, resolve_answer
from harness.gateway.policy import DENY_MODES, Policy, PolicyError, load_policy
from harness.gateway.tls import CertificateAuthority, upstream_client_context
from harness.gateway.toxics import ToxicRegistry


@dataclass(slots=True)
class GatewayState:
    """Everything a sandbox connection needs from the gateway, shared by all of them."""

    policy: Policy
    """The rules every CONNECT, request and DNS question is checked against."""
    limits: Limits
    """Hardening limits: head sizes, timeouts, connection caps."""
    credentials: CredentialStore
    """The secrets injected per exact host:port (the sandbox only ever holds the sentinel)."""
    audit: AuditLog
    """One JSONL record per decision, scrubbed of every credential's value."""
    ca: CertificateAuthority
    """The per-install CA whose leaves terminate intercepted TLS."""
    upstream_tls: ssl.SSLContext
    """How upstream TLS is verified: system trust plus GatewayConfig.upstream_ca_file."""
    overrides: Overrides
    """Host-side resolution overrides: where a name's TCP dial really goes."""
    toxics: ToxicRegistry
    """The faults switched on at run time by the control API."""
    deny_mode: str
    """How a denied request is answered: "403", "403-explained" or "reset"."""
    breaker: LoopBreaker
    """The retry-loop breaker; set_deny replaces it, so its memory starts afresh."""
    loop_answer: str
    """The breaker's answer style as configured (GatewayConfig, else the policy)."""
    stats: Counter[str] = field(default_factory=Counter)
    """Gateway-wide counters, reported by the control API's stats."""
    per_sandbox: dict[str, Counter[str]] = field(default_factory=dict)
    """The same counters per sandbox id."""

    @classmethod
    def from_config(cls, config: GatewayConfig) -> GatewayState:
        """Load the policy, credentials, CA and audit log; GatewayConfig settings win over the policy's."""
        policy = load_policy(config.policy)
        if config.deny_mode is not None and config.deny_mode not in DENY_MODES:
            raise PolicyError(f"deny_mode must be one of {DENY_MODES}")
        specs: list[CredentialSpec] | tuple[CredentialSpec, ...]
        if config.credentials is not None:
            specs = config.credentials
        elif policy.credentials is not None:
            specs = [CredentialSpec.from_dict(c) for c in policy.credentials]
        else:
            specs = DEFAULT_CREDENTIALS
        credentials = CredentialStore(specs)
        return cls(
            policy=policy,
            limits=config.limits,
            credentials=credentials,
            audit=AuditLog(config.audit_path, credentials.secrets()),
            ca=CertificateAuthority.load_or_create(config.ca_dir or default_ca_dir()),
            upstream_tls=upstream_client_context(config.upstream_ca_file),
            overrides=Overrides(config.upstream_overrides),
            toxics=ToxicRegistry(),
            deny_mode=config.deny_mode if config.deny_mode is not None else policy.deny_mode,
            breaker=LoopBreaker(
                config.loop_threshold if config.loop_threshold is not None else policy.loop_threshold,
                config.loop_window_s if config.loop_window_s is not None else policy.loop_window_s,
                enabled=config.loop_breaker,
            ),
            loop_answer=config.loop_answer if config.loop_answer is not None else policy.loop_answer,
        )

    def counters(self, sandbox: str) -> Counter[str]:
        """The counters of one sandbox, created on first use."""
        return self.per_sandbox.setdefault(sandbox, Counter())

    def effective_loop_answer(self) -> str:
        """The breaker's answer style: set at run time (set_deny), else as configured.
        Read only once a loop has tripped, so the per-request path never looks at it."""
        return resolve_answer(self.breaker.answer, self.loop_answer)

    def set_deny(
        self,
        deny_mode: str | None = None,
        loop_breaker: bool | None = None,
        loop_threshold: int | None = None,
        loop_window_s: float | None = None,
        loop_answer: str | None = None,
    ) -> None:
        """Switch the deny answer and the loop breaker at run time; None keeps a setting as it is.

        Everything is checked before anything changes: a refused call leaves the gateway as it was.
        """
        if deny_mode is not None and deny_mode not in DENY_MODES:
            raise PolicyError(f"deny_mode must be one of {DENY_MODES}")
        if loop_answer is not None and loop_answer not in LOOP_ANSWERS:
            raise PolicyError(f"loop_answer must be one of {LOOP_ANSWERS}")
        if deny_mode is not None:
            self.deny_mode = deny_mode
        old = self.breaker
        self.breaker = LoopBreaker(
            loop_threshold if loop_threshold is not None else old.threshold,
            loop_window_s if loop_window_s is not None else old.window_s,
            enabled=loop_breaker if loop_breaker is not None else old.enabled,
            answer=loop_answer if loop_answer is not None else old.answer,
        )
        self.breaker.trips = old.trips  # stats keep counting across reconfigurations
