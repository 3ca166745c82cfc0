"""egress-conformance: the family x egress matrix, each failing case's evidence, the untranslatable rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report import Section

ORDER = 45


def section(data: dict[str, Any], run_dir: Path) -> Section | None:
    return None
