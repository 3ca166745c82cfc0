"""One sandbox connection as its protocol layers see it, and the bookkeeping every layer does.

A connection arrives on the listener of one sandbox; that listener is the only identity the
gateway trusts. The layers (layers/) read the shared GatewayState through this context, count,
audit and refuse through it, and reach upstreams through its pool.
"""

from __future__ import annotations

import ssl
from collections import Counter
from dataclasses import dataclass, field

from harness.gateway.audit import AuditRecord
from harness.gateway.config import Limits
from harness.gateway.deny import error_answer, raw_response
from harness.gateway.forward import UpstreamPool
from harness.gateway.state import GatewayState
from harness.gateway.streams import PlainStream, Stream
from harness.gateway.toxics import ToxicStream


@dataclass(slots=True, eq=False)
class Context:
    """One connection: who is speaking, on which stream, and what the gateway holds for it."""

    state: GatewayState
    """The gateway's shared state: policy, credentials, CA, audit, toxics, deny settings, counters."""
    sandbox: str
    """The sandbox whose listener accepted the connection."""
    conn_id: int
    """This connection's number, as the audit log names it."""
    client: PlainStream
    """The sandbox's end of the connection."""
    tls_profile: str
    """The guest-facing TLS profile of that listener (tls.TLS_PROFILES), for the TLS it intercepts."""
    limits: Limits = field(init=False)
    """The gateway's hardening limits (state.limits, kept at hand)."""
    counters: Counter[str] = field(init=False)
    """This sandbox's counters, beside the gateway-wide ones."""
    pool: UpstreamPool = field(init=False)
    """Keep-alive upstream connections of the requests this connection forwards."""

    def __post_init__(self) -> None:
        self.limits = self.state.limits
        self.counters = self.state.counters(self.sandbox)
        self.pool = UpstreamPool(
            self.state.overrides,
            self.state.upstream_tls,
            self.limits.connect_timeout_s,
            (self.take_fd, self.give_fd),
            self._toxic_stream,
        )

    def _toxic_stream(self, upstream: PlainStream, host: str, port: int) -> PlainStream:
        """Every forwarded upstream connection runs through the toxics (a no-op while there are none),
        so a toxic switched on mid-run reaches keep-alive connections too."""
        up, down = self.state.toxics.links(self.sandbox, host, port, [self.client, upstream])
        return ToxicStream(upstream, up, down)  # type: ignore[return-value]

    def take_fd(self) -> bool:
        """A descriptor for one more upstream connection of this sandbox (fds.FdBudget)."""
        return self.state.fds.take(self.sandbox)

    def give_fd(self) -> None:
        self.state.fds.give(self.sandbox)

    def count(self, name: str, n: int = 1) -> None:
        self.state.stats[name] += n
        self.counters[name] += n

    def audit(self, **fields: object) -> None:
        self.state.audit.write(AuditRecord(sandbox=self.sandbox, conn=self.conn_id, **fields))  # type: ignore[arg-type]

    async def refuse(self, stream: Stream, status: int, reason: str, **fields: object) -> None:
        """Malformed or mismatched input: an HTTP error, an audit record, and a closed connection."""
        self.count("refused", 1)
        self.audit(event="refused", decision="deny", status=status, reason=reason, **fields)
        try:
            stream.write(raw_response(error_answer(status, f"blastradius gateway: {reason}")))
            await stream.drain()
        except (ConnectionError, OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self.pool.close()
        self.client.close()
