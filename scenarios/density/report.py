"""density: host memory per clone after each work step, one line per sharing arm, and the density it implies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report import Section
from harness.report.charts import time_series
from harness.report.format import MIB, mib

ORDER = 32

FLOOR_FRACTION = 0.10
"""As scenario.FLOOR_FRACTION: host memory the projection keeps free."""


def section(data: dict[str, Any], run_dir: Path) -> Section | None:
    scenario = data.get("scenario") or {}
    if scenario.get("name") != "density" or not (scenario.get("data") or {}).get("arms"):
        return None
    d = scenario["data"]
    work = d["work"]
    result = Section(title="density: host memory per clone as clones diverge")
    result.notes.append(
        f"N={d['sandboxes']} clones per arm, guest RAM {d['guest_mem_mib']} MiB, accel {data.get('accel')}, "
        f"measured {d['settle_s']:g} s after each step: idle; files ({work['files_mib']} MiB of random files in "
        f"/tmp); burst ({work['burst_mib']} MiB allocated, touched, freed); hold ({work['hold_mib']} MiB kept). "
        "Arms ran one after another. Host memory per clone = PSS less its share of the template RAM file, plus "
        "the file's resident pages ÷ N: the figure the projection uses (every page once, the template whole, "
        "mapped or not; USS alone leaves shared pages out, RSS counts them N times). MemAvailable's fall since "
        "the arm began, plus the template pages resident then, ÷ N is beside it as a check: it also moves with "
        "everything else on the host."
    )
    panels: list[tuple[str, dict[str, tuple[list[float], list[float]]]]] = [
        ("host MiB per clone", {}),
        ("PSS MiB per clone", {}),
        ("USS MiB per clone", {}),
    ]
    rows = []
    total = d.get("host_mem_total_bytes") or 0
    for arm in d["arms"]:
        steps = arm.get("steps") or []
        xs = [float(i) for i in range(len(steps))]
        panels[0][1][arm["mode"]] = (xs, [s["host_bytes_per_sandbox"] / MIB for s in steps])
        panels[1][1][arm["mode"]] = (xs, [s["pss_bytes_per_sandbox"] / MIB for s in steps])
        panels[2][1][arm["mode"]] = (xs, [s["uss_bytes_per_sandbox"] / MIB for s in steps])
        for s in steps:
            cost = s["host_bytes_per_sandbox"]
            rows.append(
                [
                    arm["mode"],
                    s["step"],
                    mib(cost),
                    mib(s.get("mem_available_with_shared_bytes_per_sandbox")),
                    mib(s["pss_bytes_per_sandbox"]),
                    mib(s["uss_bytes_per_sandbox"]),
                    mib(s["shared_resident_bytes"]),
                    int(total * (1 - FLOOR_FRACTION) // cost) if cost > 0 and total else "—",
                ]
            )
        if arm.get("error"):
            result.notes.append(f"arm {arm['mode']} stopped: {arm['error']}")
    result.tables.append(
        (
            "After each step (projection: clones of this host at that cost, keeping 10 % of its memory free)",
            [
                "arm",
                "step",
                "host / clone (PSS - template share + template ÷ N)",
                "MemAvailable Δ (+ template) / clone",
                "PSS",
                "USS",
                "template RAM resident",
                "projected clones",
            ],
            rows,
        )
    )
    if any(series for _, series in panels):
        steps = ", ".join(f"{i} {name}" for i, name in enumerate(d["steps"]))
        result.charts.append(
            (f"x: work step ({steps}).", time_series(panels, "work step", "Host memory per clone as clones diverge"))
        )
    return result
