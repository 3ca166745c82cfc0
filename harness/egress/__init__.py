"""Egress proxies judged alike: our gateway and the peers (squid, tinyproxy, mitmproxy), each started from
the same gateway policy file and pointed only at loopback stand-ins.

    egress = start_egress("squid", EgressSetup(policy=..., workdir=..., names={"github.com": "127.0.0.2"}), sup)
    egress.proxy            # where a client sends its proxy requests (loopback)
    egress.untranslatable   # rules of the policy this egress cannot express, each with why
    egress.stop()

The one policy is the gateway's own YAML (harness/gateway/policy.py). Each egress module translates it
into its proxy's configuration (harness/egress/<name>.py exposes `start(setup, supervisor) -> Egress`);
where a proxy cannot express a rule it says so in `untranslatable` instead of guessing. Every name the
policy or a client uses resolves, for every egress, through `EgressSetup.names` only (loopback
addresses), never through the host's resolver, so no case can reach the internet.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from harness.errors import ConfigError
from harness.sandbox.base import Endpoint
from harness.supervisor import Supervisor

EGRESSES = ("gateway", "squid", "tinyproxy", "mitmproxy")
"""Every egress by its name on the command line (the bench's --targets use the same names)."""


@dataclass(frozen=True)
class EgressSetup:
    """What every egress is started from."""

    policy: Path
    """The gateway policy YAML that every egress is configured from."""
    workdir: Path
    """Host directory for this egress's configuration, logs and state."""
    names: Mapping[str, str] = field(default_factory=dict)
    """Host name → loopback address: the only name resolution any egress may use (its stand-in)."""
    upstream_ca: Path | None = None
    """CA of the loopback stand-ins' TLS certificates, for an egress that verifies upstream TLS."""
    credentials: Mapping[str, str] = field(default_factory=dict)
    """Credential env name → value, for an egress that injects keys (the gateway); never written to disk."""


@dataclass(frozen=True)
class Untranslatable:
    """A rule of the policy that an egress cannot express."""

    rule: str
    """The rule as the policy gives it."""
    why: str
    """What the proxy lacks."""
    cases: tuple[str, ...] = ()
    """What conformance cases need (a case's `requires`: "paths", "dns", ...) that this gap takes away, so
    they are n/a here; empty: the cases still run and show what the gap lets through."""


class Egress(Protocol):
    """One running egress proxy."""

    name: str
    """Its name (one of EGRESSES)."""
    proxy: Endpoint
    """Where clients send proxy requests (HTTP proxy, CONNECT for TLS), on loopback."""
    untranslatable: list[Untranslatable]
    """Rules of the policy it cannot express (empty for the gateway)."""
    ca_file: Path | None
    """The CA a client must trust when this egress terminates TLS (mitmproxy, the gateway's interception)."""
    pids: list[int]
    """Its host processes."""

    def stop(self) -> None:
        """Stop it and everything it started. Idempotent."""
        ...

    def describe(self) -> dict[str, Any]:
        """Version, configuration files, and how the policy was translated: for results.json."""
        ...


def check_egress_names(names: list[str]) -> None:
    """A one-line error for a name that is not an egress."""
    unknown = [name for name in names if name not in EGRESSES]
    if unknown:
        raise ConfigError(f"unknown egress {', '.join(unknown)}; choose from {', '.join(EGRESSES)}")


def start_egress(name: str, setup: EgressSetup, supervisor: Supervisor) -> Egress:
    """Start egress `name` from `setup`; a missing binary is EnvironmentMissing naming its install command."""
    check_egress_names([name])
    module = importlib.import_module(f"{__name__}.{name}")
    egress: Egress = module.start(setup, supervisor)
    return egress
