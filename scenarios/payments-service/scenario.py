"""payments-service: the memory-starved service from FINDINGS.md, broken on purpose and graded.

setup   boot a sandbox behind the gateway, push podrt + the broken manifests, roll out the Deployment
        (or, with --kube-context, create it on a real cluster)
run     observe the broken state (OOMKilled, probe failures, restarts), run the fixer (built-in
        reference / memory-only / probe-only, or --agent CMD inside the sandbox), observe the rollout
        over a soak window, grade it
rollback stop the sandbox and gateway (or delete the Deployment)
"""

from __future__ import annotations

import difflib
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from harness.config import RunConfig
from harness.errors import ConfigError
from harness.scenario.base import Needs

from . import embedded, grader, manifests

HERE = Path(__file__).resolve().parent

MANIFEST_FILES = ("deployment.yaml",)
"""The manifests planted in the sandbox (and applied to a cluster)."""


MIB = 1024 * 1024

GUEST_MEM_MIB = 384
"""Guest RAM: the fixed workload holds ~166 MiB in its cgroup on top of the kernel and busybox."""

MIN_GUEST_MEM_MIB = 320
"""Below this a correctly fixed pod would be OOM-killed by the guest, not by its own limit."""

LIMIT_STEP_MIB = 64
"""The reference fixer rounds a raised limit up to a multiple of this, as people do."""


@dataclass(frozen=True)
class Options:
    """`invoke scenario payments-service --set key=value`. The timings default to a realistic demo (the
    manifest's own probe periods, the kubelet's back-off); tests shorten them."""

    fixer: Literal["reference", "memory-only", "probe-only", "none"] = "reference"
    """Built-in fixer: both fixes, one of them (a partial fix the grade must fail), or nothing; ignored with agent."""
    agent: str | None = None
    """Command run inside the sandbox in /work/payments-service instead of a built-in fixer (kubectl talks to podrt)."""
    kube_context: str | None = None
    """Run on this kubeconfig context of a real cluster instead of the embedded pod runtime."""
    kubeconfig: Path | None = None
    """The kubeconfig file for kube_context; none: KUBECONFIG or ~/.kube/config."""
    broken_window_s: float = 90.0
    """Longest wait for the seeded pod to show both failures (an OOM kill and a liveness kill)."""
    soak_s: float = 60.0
    """Ready n/n must hold this long after the fix to pass."""
    ready_timeout_s: float = 120.0
    """Longest wait for the fixed pod to become Ready."""
    observe_period_s: float = 1.0
    """Seconds between observations of the pod."""
    probe_period_s: int | None = None
    """Override of the manifest's probe periods (seconds); none keeps the manifest's."""
    probe_initial_delay_s: int | None = None
    """Override of the manifest's probe initial delays (seconds); none keeps the manifest's."""
    backoff_base_s: int = 10
    """The pod runtime's first CrashLoopBackOff delay (the kubelet's), doubled per restart."""
    backoff_max_s: int = 300
    """The pod runtime's longest CrashLoopBackOff delay (the kubelet's)."""
    agent_timeout_s: float = 900.0
    """Seconds the agent command may run."""

    def validate(self) -> None:
        if self.kube_context and self.agent:
            raise ConfigError("payments-service: --agent runs inside an embedded sandbox; drop it or --kube-context")


TIMINGS = (
    "broken_window_s",
    "soak_s",
    "ready_timeout_s",
    "observe_period_s",
    "probe_period_s",
    "probe_initial_delay_s",
    "backoff_base_s",
    "backoff_max_s",
    "agent_timeout_s",
)
"""The options recorded as the run's timings in results.json."""


def _container_block(lines: list[str], name: str) -> tuple[int, int]:
    """Line range [start, end) of the container `- name: NAME` in a manifest."""
    start = next(i for i, line in enumerate(lines) if re.match(rf"^\s*- name:\s*{re.escape(name)}\s*$", line))
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = next(
        (
            i
            for i in range(start + 1, len(lines))
            if lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) <= indent
        ),
        len(lines),
    )
    return start, end


def _replace_after(lines: list[str], start: int, end: int, anchor: str, key: str, value: str) -> bool:
    """Set the first `key:` below the `anchor:` line within [start, end), keeping indentation and comments."""
    at = next((i for i in range(start, end) if lines[i].strip() == f"{anchor}:"), None)
    if at is None:
        return False
    for i in range(at + 1, end):
        match = re.match(rf"^(\s*{key}:\s*)(\S+)(.*)$", lines[i])
        if match:
            lines[i] = f"{match.group(1)}{value}{match.group(3)}"
            return True
    return False


def reference_fix(
    text: str, status: dict[str, Any] | None, events: list[dict[str, Any]], fix_memory: bool, fix_probe: bool
) -> tuple[str, list[str]]:
    """What a careful engineer does after `kubectl describe`: raise an OOMKilled container's limit above its
    workload's need, and point a liveness probe that gets "connection refused" at the port the container
    declares. Returns the new text and a note per change."""
    deployment = manifests.parse_deployment(text)
    lines = text.splitlines()
    notes: list[str] = []
    oom = {c["name"] for c in (status or {}).get("containers", []) if c.get("last_reason") == "OOMKilled"}
    oom |= {
        e["message"].split()[1]
        for e in events
        if e.get("reason") == "OOMKilled" and len(e.get("message", "").split()) > 1
    }
    refused = any(e.get("reason") == "Unhealthy" and "Liveness" in e.get("message", "") for e in events)
    for c in deployment.containers:
        start, end = _container_block(lines, c.name)
        if fix_memory and c.name in oom and c.memory_limit_bytes is not None:
            need = max(grader.memory_need_bytes(c) or 0, 2 * c.memory_limit_bytes)
            limit_mib = -(-need // (LIMIT_STEP_MIB * MIB)) * LIMIT_STEP_MIB
            if _replace_after(lines, start, end, "limits", "memory", f"{limit_mib}Mi"):
                _replace_after(lines, start, end, "requests", "memory", f"{limit_mib}Mi")
                notes.append(f"{c.name}: memory limit {c.memory_limit_bytes // MIB}Mi -> {limit_mib}Mi (OOMKilled)")
        if fix_probe and refused and c.liveness is not None and c.ports and c.liveness.port not in c.ports:
            start, end = _container_block(lines, c.name)
            if _replace_after(lines, start, end, "httpGet", "port", str(c.ports[0])):
                notes.append(f"{c.name}: liveness probe port {c.liveness.port} -> {c.ports[0]} (the port it serves)")
    return "\n".join(lines) + ("\n" if text.endswith("\n") else ""), notes


def unified_diff(before: dict[str, str], after: dict[str, str]) -> str:
    out: list[str] = []
    for name in sorted(set(before) | set(after)):
        out += difflib.unified_diff(
            before.get(name, "").splitlines(keepends=True),
            after.get(name, "").splitlines(keepends=True),
            f"a/{name}",
            f"b/{name}",
        )
    return "".join(out)


def count_model_calls(records: list[dict[str, Any]], sandbox_id: str) -> dict[str, Any]:
    """Requests the agent made through the gateway: each intercepted HTTP request, plus each tunnel the gateway
    could not look into (one CONNECT, at least one call)."""
    mine = [r for r in records if r.get("sandbox") == sandbox_id]
    requests = [r for r in mine if r.get("event") == "request"]
    opaque = [r for r in mine if r.get("event") == "connect" and not r.get("intercepted")]
    hosts: dict[str, int] = {}
    for r in requests + opaque:
        hosts[str(r.get("host"))] = hosts.get(str(r.get("host")), 0) + 1
    return {
        "total": len(requests) + len(opaque),
        "by_host": hosts,
        "denied": sum(1 for r in mine if r.get("decision") == "deny"),
    }


class PaymentsService:
    name = "payments-service"

    def __init__(self, options: Options) -> None:
        self.options = options
        self.stack = ExitStack()
        self.target: Any = None
        self.sandbox: Any = None
        self.fleet: Any = None
        self.grade: Any = None
        self.t0 = time.monotonic()
        self.before: dict[str, str] = {}

    # -- setup -------------------------------------------------------------------------------------------------
    def setup(self, ctx: Any) -> None:
        o = self.options
        ctx.data.update(
            target="kubernetes" if o.kube_context else "embedded",
            fixer="agent" if o.agent else o.fixer,
            agent_command=o.agent,
            timings={k: getattr(o, k) for k in TIMINGS},
            timeline=[],
            events=[],
        )
        originals = {name: (HERE / name).read_text() for name in MANIFEST_FILES}
        with ctx.journal.activity("seed-broken-deployment") as step:
            if o.kube_context:
                from . import kube  # the kubernetes client is only worth importing for a real cluster

                cluster = kube.KubeCluster.from_context(o.kube_context, str(o.kubeconfig) if o.kubeconfig else None)
                local = ctx.run_dir / "manifests"
                local.mkdir(parents=True, exist_ok=True)
                for name, text in originals.items():
                    (local / name).write_text(text)
                self.target = kube.KubeTarget(cluster, local)
                self.stack.callback(cluster.delete)
                pod = self.target.sync()
            else:
                self._boot(ctx)
                self.target = embedded.EmbeddedCluster(
                    self.sandbox,
                    embedded.RuntimeSettings(backoff_base_s=o.backoff_base_s, backoff_max_s=o.backoff_max_s),
                    manifests.Timing(probe_period_s=o.probe_period_s, probe_initial_delay_s=o.probe_initial_delay_s),
                    "payments-service",
                )
                self.target.install(originals)
                pod = self.target.sync()
                self.target.start()
                self.target.wait_for_status(30)
            self.before = self.target.manifests()
            step.output = {"deployment": "payments-service", "first_pod": pod, "target": ctx.data["target"]}
        ctx.data["manifests"] = {"before": self.before}
        self.t0 = time.monotonic()

    def _boot(self, ctx: Any) -> None:
        from harness.gateway.process import GatewayConfig

        ctx.data["guest_mem_mib"] = ctx.template.mem_mib  # sized by needs()
        gateway = GatewayConfig(
            policy="balanced", audit_path=ctx.run_dir / "gateway-audit.jsonl", state_dir=ctx.run_dir / "gateway"
        )
        self.fleet = self.stack.enter_context(ctx.fleet(gateway))
        self.sandbox = ctx.boot(self.fleet, "payments")

    # -- observing ---------------------------------------------------------------------------------------------
    def _observe(self, ctx: Any, phase: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        status, events = self.target.observe()
        if status is not None:
            ctx.data["timeline"].append(
                {
                    "t_s": round(time.monotonic() - self.t0, 2),
                    "phase": phase,
                    "pod": status["pod"]["name"],
                    "ready": status["pod"]["ready"],
                    "restarts": status["pod"]["restarts"],
                    "status": status["pod"]["status"],
                    "containers": {
                        c["name"]: {
                            k: c.get(k)
                            for k in ("state", "reason", "ready", "restarts", "last_reason", "memory_current")
                        }
                        for c in status["containers"]
                    },
                }
            )
        return status, events

    def steady_state(self, ctx: Any) -> dict[str, Any] | None:
        if self.grade is None:
            status, _ = self.target.observe()
            return {
                "met": status is not None,
                "hypothesis": "the sandbox, its pod runtime and the seeded payments-service Deployment are up",
                "pod": status and status["pod"],
            }
        return {
            "met": self.grade.passed,
            "hypothesis": "payments-service is Ready n/n with zero restarts over "
            f"a {self.options.soak_s:g} s soak after the fix",
            "grade": self.grade.summary,
        }

    # -- run ---------------------------------------------------------------------------------------------------
    def run(self, ctx: Any) -> None:
        o = self.options
        with ctx.journal.activity("observe-broken-state", "probe") as step:
            step.output = ctx.data["broken"] = self._observe_broken(ctx)
        ctx.save()
        with ctx.journal.activity("fix", "action") as step:
            step.output = ctx.data["fix"] = self._fix(ctx)
        ctx.save()
        with ctx.journal.activity("observe-rollout-and-soak", "probe") as step:
            statuses, events, rollout = self._observe_after_fix(ctx)
            step.output = {"rollout_pod": rollout, "observations": len(statuses)}
        with ctx.journal.activity("grade", "probe") as step:
            after = self.target.manifests()
            final = manifests.parse_deployment("\n---\n".join(after[n] for n in sorted(after)))
            self.grade = grader.grade(
                statuses,
                events,
                final,
                o.soak_s,
                changed=after != self.before,
                apply_errors=self.target.apply_errors,
            )
            step.output = ctx.data["grade"] = {**self.grade.to_dict(), "summary": self.grade.summary}
            fix = ctx.data["fix"]
            if self.grade.ready_after_s is not None:
                fix["time_to_healthy_s"] = round(fix["duration_s"] + self.grade.ready_after_s, 2)

    def _observe_broken(self, ctx: Any) -> dict[str, Any]:
        """Watch the seeded pod until it has shown both failures (an OOM kill and a liveness kill) or the window
        ends; a real cluster's kubelet back-off makes these minutes apart, so the window bounds it."""
        o = self.options
        deadline = time.monotonic() + o.broken_window_s
        status: dict[str, Any] | None = None
        events: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            status, events = self._observe(ctx, "broken")
            reasons = {e["reason"] for e in events}
            liveness_kill = any(e["reason"] == "Killing" and "liveness" in e["message"] for e in events)
            oom = "OOMKilled" in reasons or any(
                c.get("last_reason") == "OOMKilled" for c in (status or {}).get("containers", [])
            )
            if oom and liveness_kill:
                break
            time.sleep(o.observe_period_s)
        self.status_at_fix, self.events_at_fix = status, events
        self.broken_pods = {r["pod"] for r in ctx.data["timeline"]}
        ctx.data["events"] = list(events)
        # Guest-clock stamps (podrt); a cluster's events carry none at this resolution.
        scheduled = next((e["t_ms"] for e in events if e["reason"] == "Scheduled"), None)
        first_oom = next((e["t_ms"] for e in events if e["reason"] == "OOMKilled"), None)
        return {
            "observed_s": round(time.monotonic() - self.t0, 2),
            "time_to_first_oom_kill_s": round((first_oom - scheduled) / 1000, 2)
            if first_oom is not None and scheduled is not None
            else None,
            "oom_kills": sum(1 for e in events if e["reason"] == "OOMKilled"),
            "liveness_failures": sum(1 for e in events if e["reason"] == "Unhealthy" and "Liveness" in e["message"]),
            "liveness_kills": sum(1 for e in events if e["reason"] == "Killing" and "liveness" in e["message"]),
            "restarts_before_fix": status["pod"]["restarts"] if status else None,
            "restarts_by_container": {c["name"]: c["restarts"] for c in status["containers"]} if status else {},
            "last_reasons": {c["name"]: c.get("last_reason") for c in status["containers"]} if status else {},
            "status_at_fix": f"{status['pod']['ready']} {status['pod']['status']}" if status else None,
        }

    def _fix(self, ctx: Any) -> dict[str, Any]:
        o = self.options
        started = time.monotonic()
        out: dict[str, Any] = {"fixer": ctx.data["fixer"], "started_s": round(started - self.t0, 2), "notes": []}
        if o.agent:
            result = self.sandbox.exec(f"cd {embedded.GUEST_MANIFESTS} && {o.agent}", timeout=o.agent_timeout_s)
            out.update(
                agent_rc=result.rc,
                agent_timed_out=result.timed_out,
                agent_stdout_tail=result.text[-2000:],
                agent_stderr_tail=result.stderr.decode(errors="replace")[-2000:],
            )
        elif o.fixer != "none":
            for name, text in self.target.manifests().items():
                fixed, notes = reference_fix(
                    text,
                    self.status_at_fix,
                    self.events_at_fix,
                    fix_memory=o.fixer in ("reference", "memory-only"),
                    fix_probe=o.fixer in ("reference", "probe-only"),
                )
                if fixed != text:
                    self.target.write(name, fixed)
                out["notes"] += notes
        out["duration_s"] = round(time.monotonic() - started, 2)
        after = self.target.manifests()
        out["diff"] = unified_diff(self.before, after)
        out["changed"] = after != self.before
        ctx.data["manifests"]["after"] = after
        if self.fleet is not None and self.fleet.gateway is not None:
            out["model_calls"] = count_model_calls(self.fleet.gateway.audit_records(), self.sandbox.id)
        return out

    def _observe_after_fix(self, ctx: Any) -> tuple[list[tuple[float, dict[str, Any]]], list[dict[str, Any]], Any]:
        """Roll out (sync), then watch the new pod: until Ready n/n has held for the soak window, or the ready
        timeout passes without it. Problems seen meanwhile do not end the watch early, so every one is named."""
        o = self.options
        rollout = self.target.sync()
        started = time.monotonic()
        statuses: list[tuple[float, dict[str, Any]]] = []
        events: list[dict[str, Any]] = []
        ready_at: float | None = None
        while True:
            now = time.monotonic()
            status, all_events = self._observe(ctx, "after-fix")
            if status is not None and status["pod"]["name"] not in self.broken_pods:
                statuses.append((round(now - started, 2), status))
                events = [e for e in all_events if e["object"] == f"pod/{status['pod']['name']}"]
                pod = status["pod"]
                if ready_at is None and pod["ready_containers"] == pod["total_containers"]:
                    ready_at = now
            ctx.data["events"] = all_events
            if ready_at is not None and now - ready_at >= o.soak_s:
                break
            if ready_at is None and now - started >= o.ready_timeout_s:
                break
            time.sleep(o.observe_period_s)
        return statuses, events, rollout

    # -- rollback / exit ---------------------------------------------------------------------------------------
    def rollback(self, ctx: Any) -> None:
        with ctx.journal.activity("teardown", "rollback"):
            self.stack.close()

    def exit_code(self, ctx: Any) -> int:
        return 0 if self.grade is not None and self.grade.passed else 1


def needs(options: Options, config: RunConfig) -> Needs:
    """A guest kernel of its own (the pod runtime sets cgroup limits and gets OOM kills inside) the fixed workload
    fits in (GUEST_MEM_MIB unless --mem-mib gives at least MIN_GUEST_MEM_MIB); on a real cluster no sandbox
    boots, so no snapshot template is worth making."""
    if options.kube_context:
        return Needs(boot_mode="cold")
    mem_mib = config.mem_mib if config.mem_mib >= MIN_GUEST_MEM_MIB else GUEST_MEM_MIB
    return Needs(mem_mib=mem_mib, features=("own_kernel",))


def create(options: Options) -> PaymentsService:
    return PaymentsService(options)


def terminal_summary(data: dict[str, Any]) -> str:
    """The grade with what is still broken, and the timings, from the run's saved data."""
    grade, broken, fix = data.get("grade") or {}, data.get("broken") or {}, data.get("fix") or {}
    lines = [f"grade: {grade.get('verdict')} — {grade.get('summary', '')}"]
    lines += [
        f"still broken: {item['detail'] if isinstance(item, dict) else item}" for item in grade.get("still_broken", [])
    ]
    lines.append(
        f"first OOM kill after {broken.get('time_to_first_oom_kill_s')} s; restarts before the fix "
        f"{broken.get('restarts_before_fix')}; healthy {fix.get('time_to_healthy_s')} s after the fixer "
        f"started; model calls {fix.get('model_calls')}"
    )
    return "\n".join(lines)
