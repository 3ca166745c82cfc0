"""The versioned results schema: the only thing the report reads."""

from __future__ import annotations

import json
import os
import platform
import secrets
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import psutil

from harness.errors import ResultsUnreadable
from harness.sandbox.base import SandboxRecord

SCHEMA = "blastradius/results/v1"
"""Bumped on any incompatible change to results.json."""

RESULTS_FILE = "results.json"
MEMORY_SAMPLES_FILE = "memory-samples.jsonl"
BOOT_SAMPLES_FILE = "boot-samples.jsonl"

REQUIRED_TOP = ("schema", "run_id", "created", "partial", "host", "backend", "accel", "config", "sandboxes", "summary")
REQUIRED_HOST = ("cpu_model", "cores", "memory_bytes", "kernel", "python")
OPTIONAL_SANDBOX = ("marks_ms", "provision_ms", "guest_mem_free_bytes", "host_shared_pss_bytes")
"""Fields of SandboxRecord that every entry written now has but a v1 reader must not require: provision_ms and
host_shared_pss_bytes came later within v1, and readers treat the others as optional (read with .get)."""
REQUIRED_SANDBOX = tuple(f.name for f in fields(SandboxRecord) if f.name not in OPTIONAL_SANDBOX)
REQUIRED_SUMMARY = ("boot_ms", "success_rate", "mem_available_delta_bytes_per_sandbox", "pss_bytes_per_sandbox_p50")
PERCENTILE_KEYS = ("p50", "p95", "p99", "min", "max", "mean")

COMPARISON_KIND = "comparison"
"""results.json["kind"] of a directory that compares runs (`invoke compare`, or a run over several backends,
whose sub-runs sit in directories of their own); a single run's results.json has no "kind"."""
REQUIRED_COMPARISON = ("schema", "kind", "run_id", "created", "partial", "runs")
REQUIRED_COMPARED_RUN = ("label", "dir")


RUN_ID_RANDOM_BYTES = 6
"""48 random bits after the second: runs started in the same second do not collide."""


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(RUN_ID_RANDOM_BYTES)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def host_info() -> dict[str, Any]:
    """The conditions every figure is measured under."""
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "hostname": platform.node(),
    }


def validate(data: dict[str, Any]) -> list[str]:
    """Problems that make `data` unreadable as results (a single run's, or a comparison's); empty when it
    conforms."""
    if data.get("kind") == COMPARISON_KIND:
        return validate_comparison(data)
    problems = []
    if data.get("schema") != SCHEMA:
        problems.append(f"schema is {data.get('schema')!r}, expected {SCHEMA!r}")
    problems += [f"missing top-level key {k!r}" for k in REQUIRED_TOP if k not in data]
    problems += [f"host lacks {k!r}" for k in REQUIRED_HOST if k not in data.get("host", {})]
    for index, sandbox in enumerate(data.get("sandboxes", [])):
        problems += [f"sandboxes[{index}] lacks {k!r}" for k in REQUIRED_SANDBOX if k not in sandbox]
    summary = data.get("summary", {})
    problems += [f"summary lacks {k!r}" for k in REQUIRED_SUMMARY if k not in summary]
    problems += [f"summary.boot_ms lacks {k!r}" for k in PERCENTILE_KEYS if k not in summary.get("boot_ms", {})]
    return problems


def validate_comparison(data: dict[str, Any]) -> list[str]:
    """Problems that make `data` unreadable as a comparison; empty when it conforms."""
    problems = []
    if data.get("schema") != SCHEMA:
        problems.append(f"schema is {data.get('schema')!r}, expected {SCHEMA!r}")
    problems += [f"missing top-level key {k!r}" for k in REQUIRED_COMPARISON if k not in data]
    runs = data.get("runs")
    if not isinstance(runs, list):
        return [*problems, "runs is not a list"] if "runs" in data else problems
    for index, run in enumerate(runs):
        if not isinstance(run, dict):
            problems.append(f"runs[{index}] is not an object")
            continue
        problems += [f"runs[{index}] lacks {k!r}" for k in REQUIRED_COMPARED_RUN if k not in run]
    return problems


def write_results(run_dir: Path, data: dict[str, Any]) -> Path:
    """Write results.json atomically, so an interrupt never leaves half a file."""
    path = run_dir / RESULTS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str))
    tmp.replace(path)
    return path


def load_results(run_dir: Path) -> dict[str, Any]:
    """results.json of a run directory (or of a comparison: "kind" is COMPARISON_KIND), checked against the
    schema; anything else is one line naming the fix."""
    path = run_dir / RESULTS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsUnreadable(f"{path} not found; pass a results/<run-id> directory") from None
    except OSError as exc:
        raise ResultsUnreadable(f"{path} cannot be read: {exc.strerror}") from None
    except ValueError as exc:
        raise ResultsUnreadable(
            f"{path} is not JSON ({exc}): it was cut short or damaged; run again to get a new one"
        ) from None
    if not isinstance(data, dict):
        raise ResultsUnreadable(f"{path} holds a JSON {type(data).__name__}, not a blastradius run")
    if data.get("schema") != SCHEMA:
        raise ResultsUnreadable(
            f"{path} is of schema {data.get('schema')!r}, not {SCHEMA!r}: "
            "render it with the blastradius version that wrote it"
        )
    problems = validate(data)
    if problems:
        raise ResultsUnreadable(
            f"{path} does not conform to {SCHEMA} ({len(problems)} problem(s): {'; '.join(problems[:3])})"
        )
    return data
