"""The isolation scorecard: one table per sandbox, green/red rows, evidence behind <details>.

Reads only results.json["scenario"]["data"] of an `isolation` run. Evidence there is already
redacted (markers appear as their id and hash); everything is HTML-escaped here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from markupsafe import escape

from harness.report import Section

ORDER = 4
"""Before the generic journal (5): the scorecard is what a reader of an isolation run wants first."""
FACTS_CHARS = 1500
"""Facts JSON shown per probe; the full record stays in results.json."""
ROW_CLASS = {True: "pass", False: "fail", None: ""}
VERDICT = {True: "pass", False: "FAIL", None: "n/a"}


def _yes_no(by_name: dict[str, bool]) -> str:
    """Each trap's self-test as words ("canary yes, sink NO"), not a Python dict."""
    return ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in by_name.items()) or "none"


def section(data: dict[str, Any], run_dir: Path) -> Section | None:
    scenario = data.get("scenario") or {}
    info = scenario.get("data") or {}
    if scenario.get("name") != "isolation" or "scorecards" not in info:
        return None
    result = Section(title="Isolation scorecard")
    leaks = info.get("leaks")
    mode = (
        "LEAKY set-up (weakened on purpose): " + "; ".join(info["weakenings"])
        if info.get("leaky")
        else "reference set-up"
    )
    result.notes.append(
        f"{mode}. Leaks: {leaks} (failed probes over all sandboxes); exit code {scenario.get('exit_code')}."
    )
    detector = info.get("detector") or {}
    if detector:
        scan = detector.get("host_scan", {})
        result.notes.append(
            f"Detector self-test: host scan found {len(scan.get('found', []))}/"
            f"{len(scan.get('expected', []))} planted markers; traps log connections: "
            f"{_yes_no(detector.get('traps_log_connections') or {})}."
        )
    clean = info.get("evidence_clean") or {}
    if clean:
        result.notes.append(
            f"Run directory checked for raw honeytoken values after the run: "
            f"{'clean' if clean.get('clean') else 'LEAKING ' + str(clean.get('leaking_files'))} "
            f"({clean.get('files_scanned')} files)."
        )
    if info.get("policy"):
        result.notes.append(f"Gateway policy: {info['policy'].get('name')} ({info['policy'].get('file')}).")
    parts = []
    for card in info["scorecards"]:
        parts.append(_scorecard(card))
        parts.append(_field_evaluation(card))
    parts.append(_honeytokens(info.get("honeytokens") or []))
    result.html = "\n".join(parts)
    return result


def _scorecard(card: dict[str, Any]) -> str:
    rows = []
    for probe in card["probes"]:
        evidence = "".join(
            f"<li><b>{escape(item.get('what', ''))}</b> (rc {escape(str(item.get('rc')))}"
            f"{', timed out' if item.get('timed_out') else ''})<br><code>{escape(item.get('command', ''))}</code>"
            f"<pre>{escape(item.get('output', ''))}</pre></li>"
            for item in probe.get("evidence", [])
        )
        facts = escape(json.dumps(probe.get("facts", {}), indent=1, default=str)[:FACTS_CHARS])
        rows.append(
            f'<tr class="{ROW_CLASS[probe["passed"]]}"><td>{escape(probe["id"])}</td>'
            f"<td>{escape(probe['title'])}</td><td><b>{VERDICT[probe['passed']]}</b></td>"
            f"<td>{escape(probe.get('reason', ''))}<details><summary>evidence</summary>"
            f"<p><i>Proves:</i> {escape(probe.get('proves', ''))}<br><i>Fails when:</i> "
            f"{escape(probe.get('fails_when', ''))}<br><i>How:</i> {escape(probe.get('method', ''))}"
            f"<br><i>Automates:</i> {escape(probe.get('finding', ''))}</p>"
            f"<pre>{facts}</pre><ol>{evidence}</ol></details></td></tr>"
        )
    return (
        f"<table><caption>{escape(card['sandbox'])} ({escape(card.get('backend', ''))}): "
        f"{card['leaks']} leak(s)</caption><tr><th>probe</th><th>claim</th><th>verdict</th>"
        f"<th>reason / evidence</th></tr>{''.join(rows)}</table>"
    )


BOUND_RE = re.compile(r"^timeout -s KILL \d+ ")
"""The bound put around each of the evaluation's commands, left out where they are shown as written."""
TOOL_CHECK = "the tools this probe needs, looked for inside"
"""The evidence item of a field probe's tool check: not one of the evaluation's commands."""


def _field_evaluation(card: dict[str, Any]) -> str:
    """The field evaluation's hand-run commands beside ours: its command and outcome, ours and our verdict."""
    rows = []
    for probe in card["probes"]:
        field = probe.get("field_evaluation")
        if not field:
            continue
        ours = [item for item in probe.get("evidence", []) if item.get("what") != TOOL_CHECK]
        commands = "".join(
            f"<li>{escape(item.get('what', ''))}: <code>{escape(BOUND_RE.sub('', item.get('command', '')))}</code> "
            f"&rarr; exit {escape(str(item.get('rc')))}{' (killed at its bound)' if item.get('rc') == 137 else ''}</li>"
            for item in ours
        )
        ran = f"<ul>{commands}</ul>" if commands else "<i>not run</i>"
        rows.append(
            # Coloured like the scorecard, but not another row of it: the scorecard above counts each verdict once.
            f'<tr class="{ROW_CLASS[probe["passed"]]} beside"><td>{escape(probe["id"])}</td>'
            f"<td><code>{escape(field['command'])}</code><br><small>{escape(field.get('source', ''))}</small></td>"
            f"<td>{escape(field['outcome'])}</td><td>{ran}</td>"
            # The reason is the scorecard's, above; here the verdict stands beside the two outcomes.
            f"<td>{escape(probe.get('observed', ''))}</td><td><b>{VERDICT[probe['passed']]}</b></td></tr>"
        )
    if not rows:
        return ""
    return (
        f"<table><caption>{escape(card['sandbox'])}: the field evaluation's hand-run probes, run here as written "
        "with its own tools (each bounded by <code>timeout</code>; n/a where the sandbox lacks them)</caption>"
        "<tr><th>probe</th><th>evaluation's command</th><th>evaluation's outcome</th>"
        f"<th>our commands</th><th>our outcome</th><th>verdict</th></tr>{''.join(rows)}</table>"
    )


def _honeytokens(tokens: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{escape(t['id'])}</td><td>{escape(t['kind'])}</td><td>{escape(t['where'])}</td>"
        f"<td><code>{escape(t['sha256'])}</code></td></tr>"
        for t in tokens
    )
    return (
        "<details><summary>Planted honeytokens (SHA-256 of each marker; values are never stored)</summary>"
        f"<table><tr><th>id</th><th>kind</th><th>where</th><th>sha256</th></tr>{rows}</table></details>"
    )
