"""The protocol a scenario implements, and the context the runner hands it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from harness.config import RunConfig
from harness.errors import ConfigError
from harness.fleet import Fleet, boot_into, open_fleet
from harness.gateway.process import GatewayConfig
from harness.sandbox import Backend, Sandbox, SandboxSpec, available_backends, backend_features
from harness.sandbox.base import SandboxRecord
from harness.scenario.journal import Journal
from harness.supervisor import Supervisor

T = TypeVar("T")


class Scenario(Protocol):
    """setup → steady state before → run → observe (steady state after) → rollback (always)."""

    name: str
    """CLI name, also the folder under scenarios/."""

    def setup(self, ctx: ScenarioContext) -> None:
        """Seed faults, plant honeytokens, boot what the run needs."""

    def steady_state(self, ctx: ScenarioContext) -> dict[str, Any] | None:
        """Probe the hypothesis; {"met": bool, ...}. None when the scenario has none."""

    def run(self, ctx: ScenarioContext) -> None:
        """The experiment itself."""

    def rollback(self, ctx: ScenarioContext) -> None:
        """Undo setup; runs on every exit path."""

    def exit_code(self, ctx: ScenarioContext) -> int:
        """0 when the scenario passed (e.g. no leak); non-zero gates CI."""


@dataclass(frozen=True)
class Needs:
    """What a scenario's sandboxes need, declared by its `needs(options, config)` and applied by the runner
    before it creates the backend (so a snapshot template is made for the guest the scenario boots, and a
    backend that cannot do what the scenario asks is refused before anything is written)."""

    mem_mib: int | None = None
    """Guest RAM for every sandbox; None keeps --mem-mib."""
    boot_mode: str | None = None
    """Boot mode; None keeps --boot-mode."""
    features: tuple[str, ...] = ()
    """Backend features it cannot run without: names of `harness.sandbox.Features` fields (e.g. "weaken")."""
    image: str | None = None
    """The guest image its clients need (e.g. "debian"): a run that chose no --image gets it, with that image's
    default RAM unless --mem-mib was given; a run that chose another image is refused (`runner.prepare_scenario`)."""
    no_sandboxes: bool = False
    """It boots no sandbox (a host-side client): the run uses the `host` backend, which prepares nothing
    (no guest image, no accelerator probe, no snapshot template), whatever --backend says."""

    def apply(self, config: RunConfig, scenario: str) -> RunConfig:
        """`config` with these needs in place, validated again; a backend lacking a feature is a ConfigError."""
        overrides = {
            "mem_mib": self.mem_mib,
            "boot_mode": self.boot_mode,
            "backend": "host" if self.no_sandboxes else None,
        }
        changed = replace(config, **{k: v for k, v in overrides.items() if v is not None})
        changed.validate()
        missing = [name for name in self.features if not getattr(backend_features(changed.backend), name)]
        if missing:
            able = [b for b in available_backends() if all(getattr(backend_features(b), f) for f in missing)]
            raise ConfigError(
                f"{scenario} needs a backend with {', '.join(missing)}, which {changed.backend} lacks; "
                f"use --backend {' or '.join(able) or '(none has it)'}"
            )
        return changed


@dataclass
class ScenarioContext:
    """What a scenario gets to work with. Everything it starts belongs to `supervisor`."""

    run_dir: Path
    supervisor: Supervisor
    backend: Backend
    template: SandboxSpec
    """Spec every sandbox starts from."""
    journal: Journal
    data: dict[str, Any] = field(default_factory=dict)
    """Scenario-specific results, saved under results.json["scenario"]["data"]."""
    boots: list[SandboxRecord] = field(default_factory=list)
    """Boot records of every sandbox the scenario booted (results.json["sandboxes"])."""
    save: Callable[[], None] = lambda: None
    """Write results.json now (the runner wires this); call it after each meaningful step."""
    resources: ExitStack = field(default_factory=ExitStack)
    """Closed by the runner after rollback, on every exit path, last in first out."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def keep(self, resource: AbstractContextManager[T]) -> T:
        """Enter a context manager (a fleet, a stand-in server) for the rest of the run."""
        return self.resources.enter_context(resource)

    @contextmanager
    def fleet(
        self,
        gateway: GatewayConfig | None,
        backend: Backend | None = None,
        egress_port: int | None = None,
        **spec_overrides: Any,
    ) -> Iterator[Fleet]:
        """A gateway (if given; else the shared egress at `egress_port`, if given) plus sandboxes booted on
        demand (by the run's backend unless another, such as its weakened variant, is given), all stopped on
        exit."""
        template = replace(self.template, **spec_overrides)
        backend = backend or self.backend
        with open_fleet(backend, self.supervisor, self.run_dir, template, gateway, egress_port) as fleet:
            yield fleet

    def boot(self, fleet: Fleet, sandbox_id: str, **overrides: Any) -> Sandbox:
        """Boot one sandbox and record its boot like the bench does; raises BootFailed."""
        record = SandboxRecord(sandbox_id)
        with self._lock:
            self.boots.append(record)
        return boot_into(fleet, record, **overrides)
