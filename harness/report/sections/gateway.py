"""Gateway decisions per sandbox, from the audit log summary in results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report import Section

ORDER = 30

COLUMNS = (
    "allow",
    "deny",
    "error",
    "retry_loop_detected",
    "dns_allow",
    "dns_deny",
    "intercepted",
    "credential_injections",
    "credential_exfiltration",
)


def section(data: dict[str, Any], run_dir: Path) -> Section | None:
    gateway = data.get("gateway")
    if not gateway:
        return None
    decisions = gateway.get("decisions") or {}
    result = Section(title="Gateway decisions")
    result.notes.append(
        f"Policy {gateway.get('policy')}; every decision is a line in {gateway.get('audit_file')} "
        "(credential names only, never values)."
    )
    if not decisions:
        result.notes.append("No sandbox sent traffic through the gateway in this run.")
        return result
    rows = [[sandbox, *(counts.get(c, 0) for c in COLUMNS)] for sandbox, counts in sorted(decisions.items())]
    result.tables.append(("Decisions per sandbox", ["sandbox", *COLUMNS], rows))
    return result
