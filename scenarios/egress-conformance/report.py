"""egress-conformance: one family x egress matrix (pass / fail / n-a, coloured), each failing case's evidence
behind <details>, the rules each egress could not express, and what the suite does not look at. Everything
that came from the wire is escaped here (markupsafe)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from markupsafe import escape

from harness.report import Section

ORDER = 45
EVIDENCE_CHARS = 4000
"""Evidence shown per failing case (the full record is in results.json)."""


def _cell(row: dict[str, int] | None) -> tuple[str, str]:
    """(css class, text) of one matrix cell."""
    if row is None:
        return "", "—"
    ran = row["pass"] + row["fail"]
    css = "fail" if row["fail"] else "pass" if ran else ""
    text = f"{row['pass']}/{ran} pass" + (f", {row['fail']} FAIL" if row["fail"] else "")
    return css, text + (f", {row['n/a']} n/a" if row["n/a"] else "")


def _matrix(conf: dict[str, Any]) -> str:
    results = conf.get("results") or {}
    names = list(results)
    head = "".join(f"<th>{escape(n)}</th>" for n in names)
    rows = []
    for family in conf.get("families") or []:
        cells = []
        for name in names:
            result = results[name]
            if result.get("status") != "ran":
                cells.append(f"<td>{escape(result.get('status', ''))}</td>")
                continue
            css, text = _cell(result["families"].get(family))
            cells.append(f'<td class="{css}">{escape(text)}</td>')
        rows.append(f"<tr><td>{escape(family)}</td>{''.join(cells)}</tr>")
    totals = []
    for name in names:
        result = results[name]
        if result.get("status") != "ran":
            totals.append("<td></td>")
            continue
        t = result["totals"]
        css = "fail" if t["fail"] or result.get("run_failures") else "pass"
        totals.append(
            f'<td class="{css}"><b>{t["pass"]} pass, {t["fail"]} fail, {t["n/a"]} n/a</b> ({result["wall_s"]} s)</td>'
        )
    return (
        "<table><caption>Cases per family and egress (n/a: a rule the egress cannot express, or a resolver it "
        f"does not offer)</caption><tr><th>family</th>{head}</tr>{''.join(rows)}"
        f"<tr><td><b>all</b></td>{''.join(totals)}</tr></table>"
    )


def _failure(failure: dict[str, Any]) -> str:
    evidence = failure.get("evidence") or {}
    saw = evidence.get("saw") or {}
    canaries = json.dumps(evidence.get("canaries") or [], indent=1)[:EVIDENCE_CHARS]
    return (
        f"<details><summary><code>{escape(failure['case'])}</code>: {escape('; '.join(failure['reasons']))}"
        f"</summary><p><i>Sent:</i></p><pre>{escape(str(evidence.get('sent', ''))[:EVIDENCE_CHARS])}</pre>"
        f"<p><i>Client saw:</i> {escape(saw.get('outcome', ''))} {escape(saw.get('detail', ''))}</p>"
        f"<pre>{escape(str(saw.get('answer', ''))[:EVIDENCE_CHARS])}</pre>"
        f"<p><i>Canaries reached:</i></p><pre>{escape(canaries)}</pre></details>"
    )


def section(data: dict[str, Any], run_dir: Path) -> Section | None:
    conf = ((data.get("scenario") or {}).get("data") or {}).get("conformance")
    if not conf or not conf.get("results"):
        return None
    result = Section(title="Egress conformance (egress-conformance)")
    result.notes.append(
        f"{conf['cases']} cases per egress, from the policy {conf['policy']}. Each case is scored by which loopback "
        "canary a connection reached, what the client saw (status, reset, timeout), and whether the model key (or "
        "its base64, hex or percent-encoded form) reached a canary other than the model API over verified TLS."
    )
    result.notes.append(conf.get("out_of_scope", ""))
    expected = conf.get("expected_failures") or {}
    for case, bug in expected.items():
        result.notes.append(f"Known gateway bug, expected to fail: {case}: {bug}")
    parts = [_matrix(conf)]
    for name, egress in conf["results"].items():
        if egress.get("status") != "ran":
            continue
        for line in egress.get("run_failures") or []:
            result.notes.append(f"Run failure: {line}")
        rules = egress.get("untranslatable") or []
        if rules:
            items = "".join(f"<li><code>{escape(r['rule'])}</code>: {escape(r['why'])}</li>" for r in rules)
            parts.append(f"<h4>{escape(name)}: rules it cannot express</h4><ul>{items}</ul>")
        failures = egress.get("failures") or []
        if failures:
            parts.append(f"<h4>{escape(name)}: {len(failures)} failing cases</h4>")
            parts += [_failure(f) for f in failures]
    result.html = "\n".join(parts)
    return result
