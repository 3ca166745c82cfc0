"""proxy-chaos: latency and error rate over time with the fault windows shaded, and whether the
steady-state hypothesis held before and after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report import Section
from harness.report.charts import time_series_windows

ORDER = 41
P95, ERRORS = 3, 4  # columns of a series row: t_s, rps, p50_ms, p95_ms, error_pct


def _probe_limit(journal: dict[str, Any], metric: str) -> float | None:
    before = (journal.get("steady_states") or {}).get("before") or {}
    for probe in before.get("probes") or []:
        if probe.get("metric") == metric:
            return float(str(probe["tolerance"]).lstrip("< "))
    return None


def section(data: dict[str, Any], run_dir: Path) -> Section | None:
    scenario = data.get("scenario") or {}
    chaos = (scenario.get("data") or {}).get("chaos")
    if not chaos:
        return None
    journal = scenario.get("journal") or {}
    result = Section(title=f"Proxy chaos: {chaos.get('title')}")
    held = chaos.get("steady_state_held")
    result.notes.append(
        f"Timeline {chaos.get('file')}. Steady state "
        f"{'held' if held else 'did not hold' if held is not None else 'not established'} "
        f"(journal status {journal.get('status')}, deviated {journal.get('deviated')})."
    )
    for when in ("before", "after"):
        state = (journal.get("steady_states") or {}).get(when)
        if state:
            probes = ", ".join(
                f"{p['name']} = {p['value']} ({p['tolerance']}: {'met' if p['met'] else 'NOT met'})"
                for p in state.get("probes", [])
            )
            result.notes.append(f"Steady state {when} (gateway audit log, {state.get('window_s')} s): {probes}")
    if chaos.get("client_failures"):
        result.notes.append(
            "Client-side failures by kind: "
            + ", ".join(f"{k} {v}" for k, v in sorted(chaos["client_failures"].items()))
        )
    windows = [(f["on_s"], f["off_s"], f"{f['name']} ({f['type']})") for f in chaos.get("faults", [])]
    windows += [(w["start_s"], w["end_s"], f"steady-state {w['when']}") for w in chaos.get("steady_windows", [])]
    client = chaos.get("client_series") or []
    gateway = chaos.get("gateway_series") or []
    if client or gateway:

        def xs(rows: list[list[Any]]) -> list[float]:
            return [float(r[0]) for r in rows]

        def col(rows: list[list[Any]], index: int) -> list[float | None]:
            return [r[index] for r in rows]

        panels = [
            (
                "p95 ms",
                {
                    "client (Locust)": (xs(client), col(client, P95)),
                    "gateway (audit)": (xs(gateway), col(gateway, P95)),
                },
            ),
            (
                "errors %",
                {
                    "client (Locust)": (xs(client), col(client, ERRORS)),
                    "gateway (audit)": (xs(gateway), col(gateway, ERRORS)),
                },
            ),
            (
                "requests/s",
                {"client (Locust)": (xs(client), col(client, 1)), "gateway (audit)": (xs(gateway), col(gateway, 1))},
            ),
        ]
        hlines = {}
        for index, metric in ((0, "p95_ms"), (1, "error_rate_pct")):
            limit = _probe_limit(journal, metric)
            if limit is not None:
                hlines[index] = (limit, "steady-state limit")
        result.charts.append(
            (
                "Model API through the gateway; shaded: fault and steady-state windows",
                time_series_windows(
                    panels, windows, "seconds since the timeline started", "Model API under faults", hlines
                ),
            )
        )
    result.tables.append(
        (
            "Faults",
            ["name", "type", "on s", "off s", "scope", "attributes", "connections hit"],
            [
                [
                    f["name"],
                    f["type"],
                    f["on_s"],
                    f["off_s"],
                    f"upstream={f['toxic'].get('upstream')} sandbox={f['toxic'].get('sandbox')} "
                    f"stream={f['toxic'].get('stream')} toxicity={f['toxic'].get('toxicity')}",
                    f["toxic"].get("attributes"),
                    (chaos.get("toxics_applied") or {}).get(f["name"], 0),
                ]
                for f in chaos.get("faults", [])
            ],
        )
    )
    return result
