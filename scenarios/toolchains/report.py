"""toolchains: the recommendation per client family first, then the client x deny mode x breaker matrix, then
each cell's evidence (the command, what the gateway saw, what the client printed). Reads only results.json."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from harness.report import Section
from harness.report.charts import heatmap

ORDER = 4
"""Right after the conditions, before the generic journal (5): the recommendation is what a reader wants first."""


def _breaker(breaker: str) -> str:
    return "breaker off" if breaker == "off" else f"breaker {breaker}"


def _answers(answers: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(answers.items())) or "none"


def _yes(value: bool | None) -> str:
    return "—" if value is None else ("yes" if value else "NO")


def section(data: dict[str, Any], run_dir: Path) -> Section | None:
    scenario = data.get("scenario") or {}
    tc = (scenario.get("data") or {}).get("toolchains")
    if not tc or not tc.get("cells"):
        return None
    result = Section(title="Real toolchains under every deny mode (toolchains)")
    rec = tc.get("recommendation") or {}
    for family in rec.get("families") or []:
        result.notes.append(f"Recommendation, {family['text']}")
    if rec.get("overall"):
        result.notes.append(rec["overall"]["text"])
    result.notes += rec.get("findings") or []
    result.notes.append(
        "Counts come from the gateway's audit log; exit status, seconds and output from the client, inside a "
        f"debian sandbox. Loop breaker: {tc['threshold']} identical denied requests in {tc['window_s']:g} s, then "
        "its answer (a CONNECT always gets 429). 'Readable' means the client's output or exception named the policy "
        "(the gateway's deny or loop words reached the user); 'allowed after' means the client's allowed call right "
        f"after the denied one worked (the gateway saw a 2xx and the client succeeded). requests runs a "
        f"{tc['requests_retry']}; the SDKs their default retries. A cell still running after "
        f"{tc['cell_timeout_s']:g} s is 'still retrying at timeout'. The whole matrix took {tc.get('matrix_s', '?')} s."
    )
    for failure in tc.get("checks") or []:
        result.notes.append(f"Check failed: {failure}")
    rows = tc.get("matrix") or []
    columns = [(m, b) for m in tc["deny_modes"] for b in tc["breakers"]]
    clients = list(dict.fromkeys(r["client"] for r in rows))
    index = {(r["client"], r["deny_mode"], r["breaker"]): r for r in rows}
    labels = [f"{m}\n{_breaker(b)}" for m, b in columns]
    for key, title, unit, fmt in (
        ("requests", "requests to the denied destination (audit log)", "requests", "{:.0f}"),
        ("seconds", "seconds until the client gave up", "s", "{:.1f}"),
    ):
        values = [[index[(c, m, b)][key] if (c, m, b) in index else None for m, b in columns] for c in clients]
        result.charts.append((title, heatmap(clients, labels, values, title, unit, fmt)))
    result.tables.append(
        (
            "The matrix: the denied destination, then whether the allowed call after it worked",
            [
                "client",
                "deny mode",
                "breaker",
                "requests",
                "answers",
                "seconds",
                "exit",
                "readable",
                "took deny for success",
                "allowed after",
            ],
            [
                [
                    r["client"],
                    r["deny_mode"],
                    _breaker(r["breaker"]),
                    r["requests"],
                    _answers(r["answers"]),
                    r["seconds"],
                    r["exit"],
                    _yes(r["readable"]),
                    "YES" if r["false_success"] else "no",
                    _yes(r["collateral_ok"]),
                ]
                for r in rows
            ],
        )
    )
    parts = ["<h4>Each cell's evidence</h4>"]
    for cell in tc["cells"]:
        summary = (
            f"{cell['client']} · {cell['deny_mode']} · {_breaker(cell['breaker'])} · {cell['destination']}: "
            f"{cell['requests']} requests ({_answers(cell['answers'])}), loop trips {cell['loop_trips']}, "
            f"exit {cell['exit']}, {cell['seconds']} s"
        )
        parts.append(
            f"<details><summary>{html.escape(summary)}</summary>"
            f"<p>sandbox {html.escape(cell['sandbox'])} · audit span {cell['audit_span_s']} s · 2xx {cell['ok_2xx']}"
            f" · readable {_yes(cell['readable'])}</p>"
            f"<pre>$ {html.escape(cell['command'])}\n{html.escape(cell['output'])}</pre></details>"
        )
    result.html = "\n".join(parts)
    return result
