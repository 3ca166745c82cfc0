"""retry-403: clients x deny modes matrices of wasted requests, model calls and time, from the
gateway's audit log, with the recommendation the scenario derived from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report import Section
from harness.report.charts import heatmap

ORDER = 40


def _columns(data: dict[str, Any]) -> list[tuple[str, bool]]:
    return [(mode, breaker) for mode in data["deny_modes"] for breaker in (False, True)]


def _label(mode: str, breaker: bool) -> str:
    return f"{mode}\n{'breaker' if breaker else 'no breaker'}"


def _matrix(cells: list[dict[str, Any]], where: str, columns: list[tuple[str, bool]], key: str) -> tuple[
        list[str], list[list[float | None]]]:
    rows = sorted({c["client"] for c in cells if c["where"] == where},
                  key=lambda name: (name == "custom-agent", name))
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
        f"in {retry['window_s']:g} s, then 429. Attempt caps: guest {retry['caps']['guest']}, host "
        f"{retry['caps']['host']}, backoff {retry['caps']['backoff']}. naive and backoff stop only at their cap: "
        "no answer the gateway can give ends a loop that does not read it.")
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
    table = [[c["where"], c["client"], c["deny_mode"], "on" if c["breaker"] else "off", c["instances"],
              c["blocked_requests"], " ".join(f"{k}:{v}" for k, v in sorted(c["answers"].items())),
              c["loop_trips"], c["model_calls"], c["model_ok"], c["wall_s"],
              " ".join(f"{k}:{v}" for k, v in sorted(c["gave_up"].items())),
              "yes" if c["stopped_before_cap"] else "no"] for c in cells]
    result.tables.append(("Every cell (audit-log counts)",
                          ["where", "client", "deny mode", "breaker", "clients", "blocked requests", "answers",
                           "loop trips", "model calls", "model 2xx", "wall s", "gave up", "stopped before cap"],
                          table))
    collateral = retry.get("collateral") or {}
    if collateral:
        result.tables.append((
            "Legitimate traffic: allowed, denied, allowed on one keep-alive connection",
            ["deny mode", "statuses (0 = connection gone)", "allowed calls that succeeded"],
            [[mode, " ".join(str(s) for s in c["statuses"]), f"{c['allowed_ok']}/{c['allowed_sent']}"]
             for mode, c in collateral.items()]))
    return result
