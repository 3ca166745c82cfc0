"""A gateway and the sandboxes behind it: the unit that the bench and every scenario boot.

The gateway starts first; each sandbox gets its own gateway listener (the only identity the
gateway trusts) and, once its agent answers, the gateway's CA certificate in its trust store.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from harness.gateway.process import GatewayConfig, GatewayProcess
from harness.sandbox import Backend, BootFailed, Sandbox, SandboxSpec
from harness.sandbox.base import Endpoint, SandboxRecord
from harness.supervisor import Supervisor, pid_alive


class Fleet:
    """Boots sandboxes behind one gateway and stops them, recording what it started."""

    def __init__(
        self,
        backend: Backend,
        supervisor: Supervisor,
        run_dir: Path,
        gateway: GatewayProcess | None,
        template: SandboxSpec,
        egress_port: int | None = None,
    ) -> None:
        self.backend = backend
        self.supervisor = supervisor
        self.run_dir = run_dir
        self.gateway = gateway
        self.template = template
        """Spec every sandbox starts from; id and workdir are filled in per sandbox."""
        self.egress_port = egress_port
        """Without a gateway: the host loopback port of the egress every sandbox shares (a peer proxy under
        test, which cannot tell sandboxes apart by listener); None: no egress at all."""
        self.live: dict[str, Sandbox] = {}
        self.listener_ports: dict[str, int | None] = {}
        """Each sandbox's gateway listener port on host loopback (None without a gateway)."""
        self.provision_ms: dict[str, float] = {}
        """Time spent after agent-ready installing the gateway CA, per sandbox."""
        self._lock = threading.Lock()
        self._ca_cache: bytes | None = None

    def boot(self, sandbox_id: str, **overrides: object) -> Sandbox:
        """Boot one sandbox behind its own gateway listener; raises BootFailed on failure."""
        # The listener's guest-facing TLS follows the image's clients: strict, but SHA-1 for busybox's ssl_client.
        gateway_port = (
            self.gateway.add_sandbox(sandbox_id, tls_profile=self.backend.tls_profile)
            if self.gateway
            else self.egress_port
        )
        with self._lock:
            self.listener_ports[sandbox_id] = gateway_port
        spec = replace(
            self.template,
            id=sandbox_id,
            workdir=self.workdir(sandbox_id),
            gateway_port=gateway_port,
            **overrides,
        )  # type: ignore[arg-type]
        try:
            sandbox = self.backend.boot(spec, self.supervisor)
        except BaseException:
            self._forget_listener(sandbox_id)
            raise
        with self._lock:
            self.live[sandbox_id] = sandbox
        if self.gateway and sandbox.ca_bundle is not None:
            started = time.monotonic()
            bundle = shlex.quote(sandbox.ca_bundle)
            # Appended: an image with a trust store of its own (debian) keeps its CAs beside the gateway's.
            installed = sandbox.exec(
                f"mkdir -p {shlex.quote(os.path.dirname(sandbox.ca_bundle))} && cat >> {bundle}",
                stdin=self._ca_pem(),
                timeout=10,
            )
            if installed.rc != 0:
                self.stop(sandbox_id)
                raise BootFailed(
                    f"installing the gateway CA failed: {installed.stderr.decode(errors='replace')}", sandbox.boot
                )
            self.provision_ms[sandbox_id] = round((time.monotonic() - started) * 1000, 2)
        return sandbox

    def _ca_pem(self) -> bytes:
        """The gateway CA's public certificate, asked for once per fleet."""
        if self._ca_cache is None:
            assert self.gateway is not None
            self._ca_cache = self.gateway.ca_cert_pem()
        return self._ca_cache

    def workdir(self, sandbox_id: str) -> Path:
        """The host-side directory of a sandbox (its logs and sockets; never shared into it)."""
        return self.run_dir / "sandboxes" / sandbox_id

    def egress_listener(self, sandbox_id: str) -> Endpoint | None:
        """The host-side address of a sandbox's gateway listener: its egress identity."""
        port = self.listener_ports.get(sandbox_id)
        return Endpoint("127.0.0.1", port) if port is not None else None

    def stop(self, sandbox_id: str) -> list[int]:
        """Stop one sandbox; return its host pids that are still alive afterwards."""
        with self._lock:
            sandbox = self.live.pop(sandbox_id, None)
        left: list[int] = []
        if sandbox is not None:
            pids = sandbox.pids()
            sandbox.stop()
            left = [pid for pid in pids if pid_alive(pid)]
        self._forget_listener(sandbox_id)
        return left

    def stop_all(self) -> list[int]:
        left: list[int] = []
        for sandbox_id in list(self.live):
            left += self.stop(sandbox_id)
        return left

    def pids(self) -> dict[str, list[int]]:
        with self._lock:
            return {sandbox_id: sandbox.pids() for sandbox_id, sandbox in self.live.items()}

    def _forget_listener(self, sandbox_id: str) -> None:
        if self.gateway and self.gateway.running:
            # A gateway that is going down takes its listeners with it.
            with contextlib.suppress(Exception):
                self.gateway.remove_sandbox(sandbox_id)


def boot_into(fleet: Fleet, record: SandboxRecord, **overrides: object) -> Sandbox:
    """Boot record.id and fill `record` in, failure included; re-raises BootFailed."""
    try:
        sandbox = fleet.boot(record.id, **overrides)
    except BootFailed as exc:
        record.error = exc.reason
        record.phases_ms = exc.boot.phases_ms
        record.marks_ms = exc.boot.marks_ms
        raise
    meminfo = sandbox.guest_memory() or {}
    record.ok = True
    record.boot_ms = sandbox.boot.boot_ms
    record.phases_ms = sandbox.boot.phases_ms
    record.marks_ms = sandbox.boot.marks_ms
    record.provision_ms = fleet.provision_ms.get(record.id)
    record.guest_mem_total_bytes = meminfo.get("MemTotal")
    record.guest_mem_free_bytes = meminfo.get("MemFree")
    return sandbox


def start_gateway(config: GatewayConfig, supervisor: Supervisor) -> GatewayProcess:
    """Start the gateway process and hand its process group to the supervisor."""
    gateway = GatewayProcess(config).start()
    supervisor.adopt(gateway.pid, "gateway")
    return gateway


@contextmanager
def open_fleet(
    backend: Backend,
    supervisor: Supervisor,
    run_dir: Path,
    template: SandboxSpec,
    gateway_config: GatewayConfig | None,
    egress_port: int | None = None,
) -> Iterator[Fleet]:
    """Gateway first, then sandboxes on demand; everything stopped on the way out, however it ends. Without a
    gateway, `egress_port` names the egress the sandboxes share instead (see Fleet.egress_port)."""
    gateway = start_gateway(gateway_config, supervisor) if gateway_config else None
    fleet = Fleet(backend, supervisor, run_dir, gateway, template, egress_port)
    try:
        yield fleet
    finally:
        fleet.stop_all()
        if gateway:
            pid = gateway.pid
            gateway.stop()
            supervisor.stop(pid)  # already gone; this drops its pid record
