"""A scenario run as plain data, in the spirit of Chaos Toolkit's journal: saved, then rendered."""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.supervisor import Interrupted

STATUSES = ("running", "completed", "failed", "aborted", "interrupted")
"""Journal status: completed = ran to the end (it may still have deviated), failed = a step raised,
aborted = a steady-state check before the run did not hold, interrupted = SIGINT/SIGTERM."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"


@dataclass
class Activity:
    """One action or probe of a scenario."""

    name: str
    """What it does, e.g. `plant-honeytokens` or `probe:env-has-no-key`."""
    type: str
    """action, probe or rollback."""
    start: str = field(default_factory=now)
    """UTC ISO timestamp."""
    end: str | None = None
    status: str = "running"
    """succeeded, failed, interrupted (a signal cancelled it) or running."""
    output: Any = None
    """Plain data the step produced (evidence, measurements)."""
    error: str | None = None
    """Exception text when status is failed; the signal when interrupted."""
    duration_s: float | None = None


@dataclass
class Journal:
    """Everything a scenario did, with the steady state before and after."""

    scenario: str
    status: str = "running"
    deviated: bool = False
    """True when the steady-state hypothesis did not hold after the run."""
    start: str = field(default_factory=now)
    end: str | None = None
    steady_states: dict[str, Any] = field(default_factory=lambda: {"before": None, "after": None})
    run: list[Activity] = field(default_factory=list)
    rollbacks: list[Activity] = field(default_factory=list)

    @contextmanager
    def activity(self, name: str, kind: str = "action") -> Iterator[Activity]:
        """Record one step; its output is whatever the body assigns to `.output`."""
        step = Activity(name=name, type=kind)
        (self.rollbacks if kind == "rollback" else self.run).append(step)
        started = time.monotonic()
        try:
            yield step
            step.status = "succeeded"
        except (KeyboardInterrupt, Interrupted) as exc:
            step.status = "interrupted"  # cancelled from outside: the step neither failed nor succeeded
            step.error = "SIGINT" if isinstance(exc, KeyboardInterrupt) else str(exc)
            raise
        except BaseException as exc:
            step.status = "failed"
            step.error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            raise
        finally:
            step.end = now()
            step.duration_s = round(time.monotonic() - started, 3)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
