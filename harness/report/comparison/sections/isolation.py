"""The isolation matrix: every probe against every isolation run, each cell its verdict with its evidence.

Evidence in results.json is already redacted (honeytoken markers appear as their id and hash); everything
is HTML-escaped here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from markupsafe import Markup

from harness.report import Section

ORDER = 40
FACTS_CHARS = 1200
"""Facts JSON shown per sandbox in a cell; the full record stays in the run's results.json."""
CELL_CLASS = {"pass": "pass", "fail": "fail", "n/a": "na", "missing": "missing"}
CELL_WORD = {"pass": "pass", "fail": "FAIL", "n/a": "n/a", "missing": "not run"}
SANDBOX_WORD = {True: "pass", False: "FAIL", None: "n/a"}


def section(comparison: dict[str, Any], run_dir: Path) -> Section | None:
    matrix = comparison.get("isolation")
    if not matrix:
        return None
    runs = matrix["runs"]
    result = Section(title="Isolation matrix")
    result.notes.append(
        "Each cell: the probe's verdict over the run's sandboxes — FAIL (red) if any sandbox failed it, pass "
        "(green) if none failed, n/a (grey) if it applied to none, with the reason; open a cell for each "
        "sandbox's reason and evidence (redacted: honeytoken markers appear as their id and hash)."
    )
    for run in runs:
        flags = []
        if run["leaky"]:
            flags.append("LEAKY set-up (weakened on purpose, so red is expected)")
        if run["partial"]:
            flags.append("PARTIAL run: probes it did not reach show as not run")
        if run["detector_armed"] is False:
            flags.append("the detector self-test did NOT hold before the probes: a green cell proves nothing")
        if run["evidence_clean"] is False:
            flags.append("a raw honeytoken value was found in its run directory")
        if flags:
            result.notes.append(f"{run['label']}: {'; '.join(flags)}.")
    head = "".join(
        Markup("<th>{}<br><small>{} · {} sandbox(es) · exit {}</small></th>").format(
            run["label"], run["backend"], run["sandboxes"], run["exit_code"]
        )
        for run in runs
    )
    body = []
    for probe in matrix["probes"]:
        cells = "".join(_cell(run["cells"].get(probe["id"])) for run in runs)
        field = probe.get("field_evaluation")
        evaluation = (
            Markup("<br><i>Field evaluation:</i> <code>{}</code> &rarr; {}").format(field["command"], field["outcome"])
            if field
            else ""
        )
        body.append(
            Markup(
                "<tr><td><b>{}</b><br>{}<details><summary>claim</summary><p><i>Proves:</i> {}<br>"
                "<i>Fails when:</i> {}{}</p></details></td>{}</tr>"
            ).format(probe["id"], probe["title"], probe["proves"], probe["fails_when"], evaluation, Markup(cells))
        )
    red = "".join(_red(run, len(matrix["probes"])) for run in runs)
    result.html = Markup(
        '<div class="wide"><table class="matrix"><caption>Probe by run ({} probes)</caption>'
        "<tr><th>probe</th>{}</tr>{}<tr><th>red probes</th>{}</tr></table></div>"
    ).format(len(matrix["probes"]), Markup(head), Markup("".join(body)), Markup(red))
    return result


def _red(run: dict[str, Any], probes: int) -> Markup:
    """The red probes of a run; a run that reached no probe has none to count."""
    ran = run.get("ran", probes)
    if not ran:
        return Markup('<td class="missing">no probe run</td>')
    of = f"{probes}" if ran == probes else f"{ran} run of {probes}"
    return Markup('<td class="{}"><b>{} red</b> of {}</td>').format("fail" if run["red"] else "pass", run["red"], of)


def _cell(cell: dict[str, Any] | None) -> Markup:
    if cell is None or cell["verdict"] == "missing":
        return Markup('<td class="missing">not run</td>')
    verdict = cell["verdict"]
    total = len(cell["sandboxes"])
    counts = {"pass": cell["passed"], "fail": cell["failed"], "n/a": cell["not_applicable"]}[verdict]
    reasons = list(dict.fromkeys(s["reason"] for s in cell["sandboxes"] if s["reason"]))
    shown = reasons[0] if reasons else ""
    details = "".join(_sandbox(s) for s in cell["sandboxes"])
    return Markup(
        '<td class="{}"><b>{}</b> ({}/{})<br><small>{}</small><details><summary>evidence</summary>{}</details></td>'
    ).format(CELL_CLASS[verdict], CELL_WORD[verdict], counts, total, shown, Markup(details))


def _sandbox(result: dict[str, Any]) -> Markup:
    evidence = "".join(
        Markup("<li><b>{}</b> (rc {}{})<br><code>{}</code><pre>{}</pre></li>").format(
            item.get("what", ""),
            item.get("rc"),
            ", timed out" if item.get("timed_out") else "",
            item.get("command", ""),
            item.get("output", ""),
        )
        for item in result.get("evidence", [])
    )
    facts = json.dumps(result.get("facts", {}), indent=1, default=str)[:FACTS_CHARS]
    return Markup("<p><b>{}: {}</b> — {}</p><pre>{}</pre><ol>{}</ol>").format(
        result["sandbox"], SANDBOX_WORD.get(result["passed"], "?"), result["reason"], facts, Markup(evidence)
    )
