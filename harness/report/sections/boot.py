"""Boot time: distribution with phases stacked, summary with spread, failures with reasons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report import Section
from harness.report.charts import stacked_bars
from harness.report.format import ms

ORDER = 10

UNDESCRIBED = "(not described by the backend)"
"""Shown for a phase the run recorded but its backend did not describe (an older results.json)."""

BOOT_TARGET_MS = 1500.0
"""Issue #2's p50 target under TCG on 2 cores."""


def section(data: dict[str, Any], run_dir: Path) -> Section | None:
    sandboxes = data["sandboxes"]
    completed = (data.get("scenario") or {}).get("journal", {}).get("status") == "completed"
    if not sandboxes and completed:
        return None  # a scenario that finished without a boot boots none (a host-side client)
    if not sandboxes:
        return Section(title="Boot time", notes=["No measured boots were recorded."])
    ok = sorted((s for s in sandboxes if s["ok"]), key=lambda s: s["boot_ms"])
    summary = data["summary"]
    boot = summary["boot_ms"]
    result = Section(title="Boot time")
    result.notes.append(
        f"{len(ok)} of {len(sandboxes)} boots succeeded (success rate {summary['success_rate']:.0%}; "
        "failures are counted, never retried). Spawn to agent-ready, host monotonic clock."
    )
    if ok:
        target = "meets" if boot["p50"] <= BOOT_TARGET_MS else "misses"
        result.notes.append(
            f"p50 {ms(boot['p50'])} {target} the {BOOT_TARGET_MS:.0f} ms target "
            f"{'with no hypervisor' if data['accel'] == 'none' else 'under ' + data['accel']}; "
            f"stdev {ms(boot['stdev'])}, n={boot['n']}."
        )
        meanings = phase_meanings(data)
        phases = [p for p in meanings if any(p in s["phases_ms"] for s in ok)]
        result.charts.append(
            (
                "Each bar is one boot, sorted by total time; segments are its phases.",
                stacked_bars(
                    [s["id"] for s in ok],
                    {p: [s["phases_ms"].get(p, 0.0) for s in ok] for p in phases},
                    "ms",
                    "Boot time by phase",
                ),
            )
        )
        header = ["", "n", "p50", "p95", "p99", "min", "max", "mean", "stdev"]
        rows = [["total boot", *(_cells(boot))]]
        rows += [
            [f"{p}: {meanings[p]}", *_cells(summary["phases_ms"][p])]
            for p in phases
            if p in summary.get("phases_ms", {})
        ]
        result.tables.append(("Boot time (ms)", header, rows))
    failed = [s for s in sandboxes if not s["ok"]]
    if failed:
        result.tables.append(
            ("Failed boots", ["sandbox", "round", "reason"], [[s["id"], s["round"], s["error"]] for s in failed])
        )
    return result


def phase_meanings(data: dict[str, Any]) -> dict[str, str]:
    """Every phase the run recorded, in the backend's order, with the meaning the backend gave it;
    a phase it did not describe is still shown, never dropped."""
    described: dict[str, str] = dict(data.get("backend", {}).get("phases") or {})
    seen = dict.fromkeys(name for s in data["sandboxes"] for name in s.get("phases_ms", {}))
    return {**{p: m for p, m in described.items() if p in seen}, **{p: UNDESCRIBED for p in seen if p not in described}}


def _cells(stats: dict[str, Any]) -> list[Any]:
    return [
        stats["n"],
        *(
            f"{stats[k]:.0f}" if stats[k] is not None else "—"
            for k in ("p50", "p95", "p99", "min", "max", "mean", "stdev")
        ),
    ]
