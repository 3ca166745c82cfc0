"""What every run was measured under, side by side, with the rotation order of multi-backend runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.compare import CONDITIONS
from harness.report import Section
from harness.report.format import mib

ORDER = 0


def section(comparison: dict[str, Any], run_dir: Path) -> Section:
    runs = comparison["runs"]
    result = Section(title="Runs and their conditions")
    result.notes += comparison["notes"]
    if not runs:
        return result
    method = comparison["method"]
    result.notes.insert(
        0,
        f"Baseline: {comparison['baseline']}. Every other run's figures are compared with its: the difference "
        f"of the {method['statistic']} and their ratio, each with a {method['interval']}, and a "
        f"{method['test']}. A difference is called significant only when {method['significant']} "
        f"(alpha {method['alpha']}); with fewer than {method['min_samples']} samples on either side only the "
        "medians are given.",
    )
    header = ["", *(run["label"] + (" (baseline)" if run["label"] == comparison["baseline"] else "") for run in runs)]
    rows: list[list[Any]] = []
    for key, label in CONDITIONS:
        values = [run["conditions"].get(key) for run in runs]
        if all(v is None for v in values):
            continue
        shown = [mib(v) if key == "host_memory_bytes" and v is not None else "—" if v is None else v for v in values]
        differs = len({repr(v) for v in values if v is not None}) > 1
        rows.append([label + (" (differs)" if differs else ""), *shown])
    rows.append(["boots that reached agent-ready", *(_success(run["success"]) for run in runs)])
    rows.append(["run id", *(run["run_id"] for run in runs)])
    rows.append(["created", *(run["created"] for run in runs)])
    rows.append(["complete", *("yes" if not run["partial"] else "PARTIAL (see the note above)" for run in runs)])
    rows.append(["directory", *(run["dir"] for run in runs)])
    result.tables.append(("Conditions per run", header, rows))
    for rotation in comparison.get("rotations", []):
        result.notes.append(
            f"{rotation['dir']} ran its backends in turn, round by round ({rotation['what'] or 'run'}), in an "
            "order rotated from round to round so that no backend always runs first or always follows the same "
            "one (table below)."
        )
        result.tables.append(
            (
                f"Order per round in {rotation['dir']}",
                ["round", "order"],
                [[index, " → ".join(order)] for index, order in enumerate(rotation["order"])],
            )
        )
    return result


def _success(success: dict[str, Any]) -> str:
    if not success["boots"]:
        return "— (no boots)"
    return f"{success['ok']} of {success['boots']} ({success['rate']:.0%})"
