"""retry-403: clients x deny modes matrices of wasted requests, model calls and time, from the
gateway's audit log, with the recommendation the scenario derived from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report import Section
from harness.report.charts import heatmap

ORDER = 40


# Runs from before the breaker had an answer setting stored it as on/off.
LEGACY_BREAKERS: list[str | bool] = [False, True]


def _columns(data: dict[str, Any]) -> list[tuple[str, str | bool]]:
    breakers = data.get("breakers") or LEGACY_BREAKERS
    return [(mode, breaker) for mode in data["deny_modes"] for breaker in breakers]


def _breaker_text(breaker: str | bool) -> str:
    if breaker is True:
        return "breaker 429"
    if breaker is False or breaker == "off":
        return "no breaker"
    return f"breaker {breaker}"


def _label(mode: str, breaker: str | bool) -> str:
    return f"{mode}\n{_breaker_text(breaker)}"


def _matrix(
    cells: list[dict[str, Any]], where: str, columns: list[tuple[str, str | bool]], key: str
) -> tuple[list[str], list[list[float | None]]]:
    rows = sorted({c["client"] for c in cells if c["where"] == where}, key=lambda name: (name == "custom-agent", name))
    index = {(c["client"], c["deny_mode"], c["breaker"]): c for c in cells if c["where"] == where}
    values = [[index[(r, m, b)][key] if (r, m, b) in index else None for m, b in columns] for r in rows]
    return rows, values


def section(data: dict[str, Any], run_dir: Path) -> Section | None:
    scenario = data.get("scenario") or {}
    retry = (scenario.get("data") or {}).get("retry403")
    if not retry or not retry.get("cells"):
        return None
    cells = retry["cells"]
    result = Section(title="Retry loops on a blocked domain (retry-403)")
    if retry.get("recommendation"):
        result.notes.append(f"Recommendation: {retry['recommendation']}")
    result.notes.append(
        f"Counts come from the gateway's audit log. Loop breaker: {retry['threshold']} identical denied requests "
        f"in {retry['window_s']:g} s, then its answer: 429 (HTTP-correct), or 200-terminal (200 with the same "
        "permanent-block explanation). Attempt caps: guest "
        f"{retry['caps']['guest']}, host {retry['caps']['host']}, backoff {retry['caps']['backoff']}. naive and "
        "backoff stop on nothing but a 2xx: with the breaker off or answering 429 they run to their cap; only "
        "200-terminal ends their loop (and a client that trusts any 2xx body would take the explanation as "
        "content, which is why that answer is opt-in)."
    )
    for row in retry.get("breaker_ends_naive") or []:
        if row["breaker"] != "200-terminal":
            continue
        verdict = "ended its loop" if row["ended"] else "did NOT end its loop"
        gave = " ".join(f"{k}:{v}" for k, v in sorted(row["gave_up"].items()))
        result.notes.append(
            f"Self-check ({row['where']}, deny mode {row['deny_mode']}): 200-terminal {verdict}: "
            f"{row['blocked_per_client']:g} requests per naive client (threshold+1 = {retry['threshold'] + 1}, "
            f"cap {row['cap']}); gave up before its cap: {'yes' if row['stopped_before_cap'] else 'no'} ({gave})."
        )
    for failure in retry.get("checks") or []:
        result.notes.append(f"Check failed: {failure}")
    columns = _columns(retry)
    labels = [_label(m, b) for m, b in columns]
    for where in ("guest", "host"):
        if not any(c["where"] == where for c in cells):
            continue
        scale = next(c["instances"] for c in cells if c["where"] == where)
        who = f"{where} ({scale} client{'s' if scale != 1 else ''} per cell)"
        for key, title, unit, fmt in (
            ("blocked_per_client", "requests to the blocked host per client", "requests", "{:.0f}"),
            ("model_calls_per_client", "model calls wasted per client", "calls", "{:.0f}"),
            ("wall_s", "seconds until the client gave up (slowest client)", "s", "{:.1f}"),
        ):
            rows, values = _matrix(cells, where, columns, key)
            result.charts.append((f"{who}: {title}", heatmap(rows, labels, values, f"{who}: {title}", unit, fmt)))
    table = [
        [
            c["where"],
            c["client"],
            c["deny_mode"],
            _breaker_text(c["breaker"]),
            c["instances"],
            c["blocked_requests"],
            " ".join(f"{k}:{v}" for k, v in sorted(c["answers"].items())),
            c["loop_trips"],
            c["model_calls"],
            c["model_ok"],
            c["wall_s"],
            " ".join(f"{k}:{v}" for k, v in sorted(c["gave_up"].items())),
            "yes" if c["stopped_before_cap"] else "no",
            c.get("ended_by_breaker", ""),
        ]
        for c in cells
    ]
    result.tables.append(
        (
            "Every cell (audit-log counts)",
            [
                "where",
                "client",
                "deny mode",
                "breaker",
                "clients",
                "blocked requests",
                "answers",
                "loop trips",
                "model calls",
                "model 2xx",
                "wall s",
                "gave up",
                "stopped before cap",
                "ended by breaker's 200",
            ],
            table,
        )
    )
    collateral = retry.get("collateral") or {}
    if collateral:
        rows: list[list[Any]] = []
        for mode, by_mode in collateral.items():
            # Older runs kept one probe per deny mode; newer ones one per deny mode x breaker setting.
            probes = {"": by_mode} if "statuses" in by_mode else by_mode
            for breaker, c in probes.items():
                rows.append(
                    [
                        mode,
                        _breaker_text(breaker) if breaker else "",
                        " ".join(str(s) for s in c["statuses"]),
                        f"{c['allowed_ok']}/{c['allowed_sent']}",
                    ]
                )
        result.tables.append(
            (
                "Legitimate traffic: allowed, the same denied request threshold+1 times, allowed, on one keep-alive "
                "connection",
                ["deny mode", "breaker", "statuses (0 = connection gone)", "allowed calls that succeeded"],
                rows,
            )
        )
    return result
