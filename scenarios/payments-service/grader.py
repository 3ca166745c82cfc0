"""Grade a fix of payments-service: pass when the rolled-out pod is Ready n/n with zero restarts over a
soak window; otherwise fail, naming what is still broken (from what was observed and from the manifests).

Works on the shared vocabulary both targets report (pod ready n/m, per-container restarts, lastState
reason such as OOMKilled, Unhealthy events), so the embedded runtime and a real cluster grade the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MIB = 1024 * 1024

WORKLOAD_OVERHEAD_MIB = 16
"""Beyond HEAP_MIB the payments container holds awk's own heap, httpd and page tables (~10 MiB measured)."""

DEFAULT_HEAP_MIB = 150
"""What the payments workload allocates when HEAP_MIB is not set (FINDINGS.md: it needs about 150Mi)."""


@dataclass
class Problem:
    what: str
    """memory-limit, liveness-probe, readiness-probe, restarts, not-ready, manifests-unchanged, apply-error."""
    container: str | None
    detail: str


@dataclass
class Grade:
    passed: bool
    verdict: str
    """pass, partial-fix (one planted bug fixed, not both) or fail."""
    still_broken: list[Problem] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    """Planted bugs the final manifests no longer have: memory-limit, liveness-probe."""
    ready_after_s: float | None = None
    """Seconds from the rollout to the first Ready n/n."""
    soak_s: float = 0.0
    """How long the pod stayed Ready n/n with zero restarts, from its first Ready."""
    soak_required_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def summary(self) -> str:
        if self.passed:
            return f"PASS: Ready n/n with 0 restarts for {self.soak_s:.0f} s"
        broken = "; ".join(p.detail for p in self.still_broken)
        return f"FAIL ({self.verdict}): {broken}"


def memory_need_bytes(container: Any) -> int | None:
    """What the container's workload needs, when the harness knows its program; None otherwise."""
    if container.program != "payments-service":
        return None
    heap_mib = int(container.env.get("HEAP_MIB", DEFAULT_HEAP_MIB))
    return (heap_mib + WORKLOAD_OVERHEAD_MIB) * MIB


def static_problems(deployment: Any) -> list[Problem]:
    """What the manifests alone show: limits below need, probes aimed at ports nothing declares."""
    problems: list[Problem] = []
    for c in deployment.containers:
        need = memory_need_bytes(c)
        if need is not None and c.memory_limit_bytes is not None and c.memory_limit_bytes < need:
            problems.append(
                Problem(
                    "memory-limit",
                    c.name,
                    f"container {c.name}: memory limit {c.memory_limit_bytes // MIB}Mi is below the "
                    f"~{need // MIB}Mi its workload needs",
                )
            )
        for kind, probe in (("liveness-probe", c.liveness), ("readiness-probe", c.readiness)):
            if probe is not None and c.ports and probe.port not in c.ports:
                problems.append(
                    Problem(
                        kind,
                        c.name,
                        f"container {c.name}: {kind.replace('-', ' ')} targets :{probe.port} but the "
                        f"container listens on :{', :'.join(map(str, c.ports))}",
                    )
                )
    return problems


def observed_problems(statuses: list[tuple[float, dict[str, Any]]], events: list[dict[str, Any]]) -> list[Problem]:
    """What the rolled-out pod did: OOM kills, liveness kills, restarts."""
    problems: list[Problem] = []
    oom: set[str] = set()
    restarts: dict[str, int] = {}
    for _, status in statuses:
        for c in status["containers"]:
            if c.get("last_reason") == "OOMKilled":
                oom.add(c["name"])
            restarts[c["name"]] = max(restarts.get(c["name"], 0), int(c.get("restarts") or 0))
    for event in events:
        if event.get("reason") == "OOMKilled":
            name = str(event.get("message", "")).split()[1:2]
            oom.update(name)
    for name in sorted(oom):
        problems.append(Problem("memory-limit", name, f"container {name} was OOMKilled after the fix"))
    liveness = [e for e in events if e.get("reason") == "Unhealthy" and "Liveness" in str(e.get("message"))]
    if liveness:
        problems.append(
            Problem(
                "liveness-probe",
                None,
                f"{len(liveness)} liveness probe failures after the fix (last: {liveness[-1]['message'][:120]})",
            )
        )
    for name, count in sorted(restarts.items()):
        if count:
            problems.append(Problem("restarts", name, f"container {name} restarted {count} times after the fix"))
    return problems


def grade(
    statuses: list[tuple[float, dict[str, Any]]],
    events: list[dict[str, Any]],
    deployment: Any,
    soak_required_s: float,
    changed: bool = True,
    apply_errors: list[str] | None = None,
) -> Grade:
    """statuses: (seconds since the rollout, status) of the rolled-out pod, in time order; events: its events."""
    static = static_problems(deployment)
    problems = observed_problems(statuses, events)
    # Both kinds are kept: what was seen says it is still broken, the manifest line says where.
    problems += static
    if not changed:
        problems.insert(0, Problem("manifests-unchanged", None, "the fixer did not change the manifests"))
    for error in apply_errors or []:
        problems.append(Problem("apply-error", None, f"manifests were rejected: {error}"))
    ready_at: float | None = None
    soak = 0.0
    for t, status in statuses:
        pod = status["pod"]
        healthy = pod["ready_containers"] == pod["total_containers"] and not pod.get("restarts")
        if healthy and ready_at is None:
            ready_at = t
        elif not healthy and ready_at is not None:
            break  # the streak is over; any later recovery does not count as zero restarts
        if ready_at is not None:
            soak = t - ready_at
    if ready_at is None:
        problems.append(Problem("not-ready", None, "the rolled-out pod never became Ready n/n"))
    elif soak < soak_required_s and not any(p.what in ("restarts", "memory-limit", "liveness-probe") for p in problems):
        problems.append(
            Problem("not-ready", None, f"Ready n/n for only {soak:.0f} s of the {soak_required_s:.0f} s soak window")
        )
    planted = {"memory-limit", "liveness-probe"}
    static_kinds = {p.what for p in static}
    fixed = sorted(planted - static_kinds) if changed else []
    passed = not problems
    verdict = "pass" if passed else ("partial-fix" if fixed and len(fixed) < len(planted) else "fail")
    return Grade(
        passed=passed,
        verdict=verdict,
        still_broken=problems,
        fixed=fixed,
        ready_after_s=round(ready_at, 2) if ready_at is not None else None,
        soak_s=round(soak, 2),
        soak_required_s=soak_required_s,
    )
