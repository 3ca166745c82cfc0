"""The latency an agent inside a sandbox sees through its gateway, measured from inside the guest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report import Section
from harness.report.format import counts

ORDER = 25


TCG_CAVEAT = (
    "Under TCG every guest instruction is emulated, so these figures are far above the host-side ones and "
    "say more about the accelerator than the gateway."
)


def section(data: dict[str, Any], run_dir: Path) -> Section | None:
    guest = data.get("guest_latency")
    if not guest:
        return None
    result = Section(title="Latency seen from inside the sandboxes")
    sandboxes = guest["sandboxes"]
    first = next(iter(sandboxes.values()), {})
    result.notes.append(
        f"GET {guest['url']} through each sandbox's own gateway listener, timed in the sandbox "
        f"(backend {data['backend'].get('name')}, accelerator {guest['accel']}). {first.get('note', '')}"
    )
    if guest["accel"] == "tcg":
        result.notes.append(TCG_CAVEAT)
    if first.get("clock") == "file-mtime":
        result.notes.append(
            "This sandbox refuses adjtimex (gVisor does), so each timestamp is the mtime of a file touched "
            "inside: as fine as its kernel keeps file times, and each costs two process starts (subtracted)."
        )
    rows = []
    for sandbox_id, figures in sandboxes.items():
        latency = figures.get("latency_ms") or {}
        rows.append(
            [
                sandbox_id,
                figures.get("n"),
                figures.get("ok"),
                counts(figures.get("failures")),
                *(latency.get(k) for k in ("p50", "p95", "p99", "max")),
                figures.get("clock_overhead_ms"),
            ]
        )
    result.tables.append(
        (
            "Per sandbox (ms)",
            ["sandbox", "n", "ok", "failures", "p50", "p95", "p99", "max", "clock overhead subtracted"],
            rows,
        )
    )
    return result
