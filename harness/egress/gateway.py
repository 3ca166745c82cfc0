"""Our gateway as an egress under test: the policy as it is (nothing to translate), every name dialled at its
loopback stand-in through the gateway's upstream overrides, one listener for the client."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.egress import EgressSetup, Untranslatable
from harness.gateway.process import GatewayConfig, GatewayProcess
from harness.sandbox.base import Endpoint
from harness.supervisor import Supervisor

CLIENT_ID = "conformance"
"""The one sandbox identity the gateway gives its listener."""


@dataclass
class GatewayEgress:
    """The gateway, started from the policy file as given."""

    process: GatewayProcess
    supervisor: Supervisor
    proxy: Endpoint
    name: str = "gateway"
    untranslatable: list[Untranslatable] = field(default_factory=list)
    ca_file: Path | None = None
    pids: list[int] = field(default_factory=list)

    @property
    def audit_path(self) -> Path | None:
        """Its audit log (JSON lines), for evidence beyond the canaries."""
        return self.process.config.audit_path

    def stop(self) -> None:
        if self.process.running:
            pid = self.process.pid
            self.process.stop()
            self.supervisor.stop(pid)  # already gone; this drops its record

    def describe(self) -> dict[str, Any]:
        return {"kind": "gateway", "policy": str(self.process.config.policy), "translation": "none: its own policy"}


def start(setup: EgressSetup, supervisor: Supervisor) -> GatewayEgress:
    config = GatewayConfig(
        policy=setup.policy,
        state_dir=setup.workdir / "state",
        audit_path=setup.workdir / "audit.jsonl",
        upstream_overrides=dict(setup.names),
        upstream_ca_file=setup.upstream_ca,
        extra_env=dict(setup.credentials),
        log_level="WARNING",
    )
    process = GatewayProcess(config).start()
    supervisor.adopt(process.pid, "gateway:egress")
    egress = GatewayEgress(process, supervisor, Endpoint("127.0.0.1", 0), pids=[process.pid])
    try:
        egress.proxy = Endpoint("127.0.0.1", process.add_sandbox(CLIENT_ID))
        egress.ca_file = setup.workdir / "gateway-ca.pem"
        egress.ca_file.write_bytes(process.ca_cert_pem())
    except BaseException:
        egress.stop()
        raise
    return egress
