"""The gateway runtime: one asyncio loop and one listener per sandbox; their sessions share state.GatewayState."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.gateway.audit import AuditRecord
from harness.gateway.config import GatewayConfig, default_ca_dir
from harness.gateway.deny import error_answer, raw_response
from harness.gateway.dns import DnsServer
from harness.gateway.fds import raise_fd_limit
from harness.gateway.session import run_session
from harness.gateway.state import GatewayState
from harness.gateway.streams import STREAM_LIMIT
from harness.gateway.tls import STRICT, TlsProfileError, check_profile

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 512


@dataclass
class SandboxListener:
    sandbox: str
    server: asyncio.Server
    port: int
    tls_profile: str  # guest-facing TLS of the connections it intercepts (tls.TLS_PROFILES)
    dns: DnsServer | None = None  # when the policy-gated resolver is on
    active: set[asyncio.Task[None]] = field(default_factory=set)


class Gateway:
    """The listeners: one per sandbox, each handing its connections to run_session over the shared state."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.state = GatewayState.from_config(config, fd_limit=raise_fd_limit())
        log.info("descriptors: %s", self.state.fds.snapshot())
        self.dns_enabled = self.state.policy.dns if config.dns is None else config.dns
        self.listeners: dict[str, SandboxListener] = {}
        self.down: set[str] = set()  # sandboxes whose listener a `down` toxic holds closed
        self._conn_ids = 0
        self._active_total = 0

    # ---- sandboxes -----------------------------------------------------------------------
    async def add_sandbox(self, sandbox: str, port: int = 0, tls_profile: str = STRICT) -> SandboxListener:
        """Open sandbox's listener; adding it again returns the open one, if it has the same TLS profile.
        Raises TlsProfileError for an unknown profile or one that differs from the open listener's."""
        check_profile(tls_profile)
        if sandbox in self.listeners:
            listener = self.listeners[sandbox]
            if listener.tls_profile != tls_profile:
                raise TlsProfileError(
                    f"sandbox {sandbox} already listens with TLS profile {listener.tls_profile}, not {tls_profile}"
                )
            return listener
        server = await self._listen(sandbox, port)
        bound = server.sockets[0].getsockname()[1]
        listener = SandboxListener(sandbox, server, bound, tls_profile)
        if self.dns_enabled:
            listener.dns = DnsServer(self.state, sandbox)
            await listener.dns.start(self.config.listen_host)
        self.listeners[sandbox] = listener
        self.state.fds.add_sandbox(sandbox)
        self.state.counters(sandbox)
        log.info("sandbox %s: listening on %s:%d (TLS %s)", sandbox, self.config.listen_host, bound, tls_profile)
        return listener

    async def _listen(self, sandbox: str, port: int) -> asyncio.Server:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.listen_host, port))

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._on_client(sandbox, reader, writer)

        return await asyncio.start_server(on_client, sock=sock, limit=STREAM_LIMIT, backlog=LISTEN_BACKLOG)

    async def sync_down(self) -> None:
        """Close or reopen listeners so they match the `down` toxics ("gateway down" for a sandbox).

        Down: the listener closes (new connections are refused) and open connections are cut.
        Back up: it listens again on the same port, which the guest's guestfwd still points at.
        """
        want = self.state.toxics.down_sandboxes(list(self.listeners))
        for sandbox in want - self.down:
            listener = self.listeners[sandbox]
            listener.server.close()
            for task in list(listener.active):
                task.cancel()
            await asyncio.gather(*listener.active, return_exceptions=True)
            log.warning("sandbox %s: gateway down (toxic)", sandbox)
        for sandbox in self.down - want:
            back = self.listeners.get(sandbox)
            if back is not None:
                back.server = await self._listen(sandbox, back.port)
                log.warning("sandbox %s: gateway back up", sandbox)
        self.down = want

    async def remove_sandbox(self, sandbox: str) -> bool:
        listener = self.listeners.pop(sandbox, None)
        if listener is None:
            return False
        self.state.fds.remove_sandbox(sandbox)
        listener.server.close()
        if listener.dns is not None:
            listener.dns.close()
        for task in list(listener.active):
            task.cancel()
        await asyncio.gather(*listener.active, return_exceptions=True)
        log.info("sandbox %s: removed", sandbox)
        return True

    async def _on_client(self, sandbox: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state = self.state
        listener = self.listeners.get(sandbox)
        self._conn_ids += 1
        conn_id = self._conn_ids
        counters = state.counters(sandbox)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if listener is None:
            writer.transport.abort()
            return
        if (
            len(listener.active) >= state.limits.max_connections_per_sandbox
            or self._active_total >= state.limits.max_connections_total
        ):
            await self._refuse(sandbox, conn_id, writer, "connection limit")
            return
        if not state.fds.take(sandbox):
            await self._refuse(sandbox, conn_id, writer, "descriptor share used up")
            return
        task = asyncio.current_task()
        assert task is not None
        listener.active.add(task)  # type: ignore[arg-type]
        self._active_total += 1
        state.stats["connections"] += 1
        counters["connections"] += 1
        try:
            await run_session(state, sandbox, conn_id, reader, writer, listener.tls_profile)
        finally:
            self._active_total -= 1
            listener.active.discard(task)  # type: ignore[arg-type]
            state.fds.give(sandbox)

    async def _refuse(self, sandbox: str, conn_id: int, writer: asyncio.StreamWriter, reason: str) -> None:
        """503 to a connection over its sandbox's cap: the sandbox that floods itself is the one that waits."""
        state = self.state
        state.stats["connection_limit"] += 1
        state.audit.write(
            AuditRecord(event="refused", sandbox=sandbox, decision="deny", status=503, conn=conn_id, reason=reason)
        )
        try:
            writer.write(raw_response(error_answer(503, "blastradius gateway: too many connections")))
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        writer.transport.abort()

    # ---- control -------------------------------------------------------------------------
    def snapshot_stats(self) -> dict[str, Any]:
        state = self.state
        return {
            **dict(state.stats),
            "active_connections": self._active_total,
            "sandboxes": {
                sid: {
                    "port": lst.port,
                    "tls_profile": lst.tls_profile,
                    "active": len(lst.active),
                    **dict(state.per_sandbox.get(sid, {})),
                }
                for sid, lst in self.listeners.items()
            },
            "loop_trips": state.breaker.trips,
            "audit_records": state.audit.records,
            "audit_redactions": state.audit.redactions,
            "toxics": state.toxics.snapshot(),
            **state.fds.snapshot(),
        }

    async def close(self) -> None:
        for sandbox in list(self.listeners):
            await self.remove_sandbox(sandbox)
        self.state.audit.close()


def ca_cert_path(config: GatewayConfig) -> Path:
    return (config.ca_dir or default_ca_dir()) / "ca.pem"
