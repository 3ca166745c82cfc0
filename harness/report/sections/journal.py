"""A scenario's journal: status, steady state before and after, each activity with its outcome."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.report import Section

ORDER = 5
OUTPUT_EXCERPT_CHARS = 400


def section(data: dict[str, Any], run_dir: Path) -> Section | None:
    scenario = data.get("scenario")
    if not scenario:
        return None
    journal = scenario["journal"]
    result = Section(title=f"Scenario {scenario['name']}: journal")
    result.notes.append(
        f"status {journal['status']}, deviated {journal['deviated']}, exit code "
        f"{scenario.get('exit_code')}; {journal['start']} → {journal.get('end')}"
    )
    for when in ("before", "after"):
        state = journal["steady_states"].get(when)
        if state is not None:
            result.notes.append(f"steady state {when}: {json.dumps(state, default=str)[:OUTPUT_EXCERPT_CHARS]}")
    rows = [
        [
            a["type"],
            a["name"],
            a["status"],
            a["start"],
            a.get("duration_s"),
            a.get("error") or json.dumps(a.get("output"), default=str)[:OUTPUT_EXCERPT_CHARS],
        ]
        for a in journal["run"] + journal["rollbacks"]
    ]
    result.tables.append(("Activities", ["type", "name", "status", "start", "s", "output / error"], rows))
    return result
