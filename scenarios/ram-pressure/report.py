"""ram-pressure: density limit and why the ramp stopped, marginal memory per sandbox, curves vs N per arm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report import Section
from harness.report.charts import time_series
from harness.report.format import MIB, mib

ORDER = 31


def section(data: dict[str, Any], run_dir: Path) -> Section | None:
    scenario = data.get("scenario") or {}
    if scenario.get("name") != "ram-pressure" or not (scenario.get("data") or {}).get("arms"):
        return None
    d = scenario["data"]
    t = d["thresholds"]
    result = Section(title="ram-pressure: sandboxes before the host suffers")
    result.notes.append(
        f"Stop conditions, checked before each boot: MemAvailable minus the next sandbox's expected cost below "
        f"{mib(t['min_mem_available_bytes'])}, memory PSI some avg10 above {t['max_psi_some_avg10']:g} %, a failed "
        f"boot, or the cap of {t['cap']}. Guest RAM {d.get('guest_mem_mib')} MiB, workload {d['workload']['kind']}, "
        f"accel {data.get('accel')}, boot mode {data.get('backend', {}).get('boot_mode', '—')}."
    )
    rows = []
    for arm in d["arms"]:
        stop = arm.get("stop") or {}
        rows.append(
            [
                f"reclaim {'on' if arm['reclaim'] else 'off'}",
                arm["density_limit"],
                stop.get("reason"),
                stop.get("detail"),
                _f(arm.get("marginal_mib_per_sandbox")),
                _f(arm.get("pss_mib_per_sandbox")),
                arm.get("projected_limit", "—"),
            ]
        )
    result.tables.append(
        (
            "Density limit per arm",
            [
                "arm",
                "N reached",
                "stopped by",
                "detail",
                "marginal MiB / sandbox (MemAvailable)",
                "PSS MiB / sandbox",
                "projected N at the floor",
            ],
            rows,
        )
    )
    panels: list[tuple[str, dict[str, tuple[list[float], list[float]]]]] = [
        ("MemAvailable (MiB)", {}),
        ("memory PSI some avg10 (%)", {}),
        ("newest boot (ms)", {}),
        ("PSS per sandbox (MiB)", {}),
    ]
    for arm in d["arms"]:
        name = f"reclaim {'on' if arm['reclaim'] else 'off'}"
        steps = arm["steps"]
        if not steps:
            continue
        ns = [float(s["n"]) for s in steps]
        panels[0][1][name] = (ns, [s["mem_available_bytes"] / MIB for s in steps])
        panels[1][1][name] = (ns, [(s.get("psi") or {}).get("some_avg10", 0.0) for s in steps])
        panels[2][1][name] = (ns, [s["newest_boot_ms"] or 0.0 for s in steps])
        panels[3][1][name] = (ns, [s["pss_total_bytes"] / s["n"] / MIB for s in steps])
    if any(series for _, series in panels):
        result.charts.append(
            (
                "Measured after each boot (and its workload) settled; arms side by side.",
                time_series(panels, "sandboxes running (N)", "Host memory vs N"),
            )
        )
    return result


def _f(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"
