"""How many idle sandboxes each run's host could hold, by two measures of what one costs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report import Section
from harness.report.comparison import words
from harness.report.format import mib

ORDER = 30


def section(comparison: dict[str, Any], run_dir: Path) -> Section | None:
    entries = comparison["density"]
    if not entries or not any(basis["cost_bytes"] is not None for e in entries for basis in e["bases"]):
        return None
    runs = {run["label"]: run for run in comparison["runs"]}
    result = Section(title="Idle density this host implies")
    result.notes.append(
        "Sandboxes that fit = floor(host MemTotal / per-sandbox cost), the cost measured with the round's "
        "sandboxes booted and idle. By PSS: the sandbox's host processes' proportional set size (shared pages "
        "split fairly). By MemAvailable Δ: what the host's MemAvailable lost per sandbox, which also counts "
        "kernel memory the sandbox causes (page tables, caches) but is noisy at small N. Both are upper bounds: "
        "the host's own use is left out, and a sandbox at work costs more than an idle one."
    )
    header = ["run", "host MemTotal"]
    for basis in entries[0]["bases"]:
        header += [f"{basis['short']} p50", f"fit by {basis['short']}"]
    header.append("conditions")
    rows: list[list[Any]] = []
    for entry in entries:
        row: list[Any] = [entry["label"], mib(entry["host_memory_bytes"])]
        for basis in entry["bases"]:
            row.append(words.value(basis["cost_bytes"], "bytes"))
            if basis["sandboxes"] is None:
                row.append(f"— ({basis['reason']})")
            else:
                row.append(f"{basis['sandboxes']:,}" + (f" ({basis['reason']})" if basis["reason"] else ""))
        row.append(words.conditions(runs[entry["label"]]))
        rows.append(row)
    result.notes.append("Costs: " + "; ".join(f"{b['short']} = {b['by']}" for b in entries[0]["bases"]) + ".")
    result.tables.append(("Idle sandboxes that fit in the host's memory", header, rows))
    return result
