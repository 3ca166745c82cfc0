"""payments-service: the broken state, the fix (diff, model calls), the grade, and the pod over time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report import Section
from harness.report.charts import time_series

ORDER = 30

DIFF_MAX_LINES = 60
"""The report shows this much of the fixer's diff; results.json has all of it."""


def section(data: dict[str, Any], run_dir: Path) -> Section | None:
    scenario = data.get("scenario") or {}
    if scenario.get("name") != "payments-service" or not scenario.get("data"):
        return None
    d = scenario["data"]
    result = Section(title="payments-service: graded fix")
    grade = d.get("grade")
    if grade:
        result.notes.append(grade["summary"])
    broken, fix = d.get("broken") or {}, d.get("fix") or {}
    result.notes.append(
        f"Target: {d.get('target')}; fixer: {d.get('fixer')}"
        + (f" ({d['agent_command']})" if d.get("agent_command") else "")
        + f"; guest RAM {d.get('guest_mem_mib', '—')} MiB."
    )
    rows = [
        ["time to first OOM kill", _s(broken.get("time_to_first_oom_kill_s"))],
        ["OOM kills before the fix", broken.get("oom_kills")],
        [
            "liveness probe failures / kills before the fix",
            f"{broken.get('liveness_failures')} / {broken.get('liveness_kills')}",
        ],
        ["restarts before the fix", f"{broken.get('restarts_before_fix')} {broken.get('restarts_by_container', '')}"],
        ["status when the fixer started", broken.get("status_at_fix")],
        ["time to fix (fixer run)", _s(fix.get("duration_s"))],
        ["time to healthy (fixer start → Ready n/n)", _s(fix.get("time_to_healthy_s"))],
        ["model calls through the gateway", (fix.get("model_calls") or {}).get("total", "— (no gateway)")],
        ["soak with 0 restarts", f"{_s(grade.get('soak_s'))} of {_s(grade.get('soak_required_s'))}" if grade else "—"],
    ]
    result.tables.append(("Measurements", ["what", "value"], rows))
    if grade and grade["still_broken"]:
        result.tables.append(
            (
                "Still broken",
                ["what", "container", "detail"],
                [[p["what"], p["container"] or "", p["detail"]] for p in grade["still_broken"]],
            )
        )
    if fix.get("diff"):
        lines = fix["diff"].splitlines()
        result.tables.append(("The fixer's diff", ["line"], [[line] for line in lines[:DIFF_MAX_LINES]]))
    timeline = d.get("timeline") or []
    if timeline:
        times = [r["t_s"] for r in timeline]
        ready = [int(str(r["ready"]).split("/")[0]) for r in timeline]
        restarts = [r["restarts"] for r in timeline]
        fix_at = fix.get("started_s")
        result.charts.append(
            (
                "Ready containers and restarts of the current pod, sampled every observe period"
                + (f"; the fixer started at {fix_at:.0f} s (a new pod then starts at 0 restarts)." if fix_at else "."),
                time_series(
                    [("ready containers", {"ready": (times, ready)}), ("restarts", {"restarts": (times, restarts)})],
                    "seconds since the Deployment was seeded",
                    "payments-service pod",
                ),
            )
        )
    events = d.get("events") or []
    if events:
        result.tables.append(
            (
                "Events (last 40)",
                ["t (guest s)", "type", "reason", "object", "message"],
                [
                    [
                        _s(e["t_ms"] / 1000 if e.get("t_ms") is not None else None),
                        e["type"],
                        e["reason"],
                        e["object"],
                        e["message"],
                    ]
                    for e in events[-40:]
                ],
            )
        )
    return result


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} s"
