"""`invoke compare`: runs side by side in a comparison directory of their own (results.json of kind
"comparison" pointing at the runs, with the comparison computed by harness.compare, and its report)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.compare import RunInput, compute_comparison, load_inputs, run_backend, run_kind
from harness.config import check_run_dir
from harness.errors import ConfigError
from harness.metrics import ab
from harness.report import render_report
from harness.results import COMPARISON_KIND, SCHEMA, host_info, new_run_id, write_results
from harness.run import prepare_run_dir

WHAT = "compare"
"""results.json["what"] of `invoke compare`'s directory (a run over several backends says "bench" or
"scenario:NAME")."""

MIN_RUNS = 2
"""Fewer is not a comparison."""


def default_out() -> Path:
    return Path("results") / f"compare-{new_run_id()}"


def check_out(out: Path, force: bool, runs: Sequence[RunInput], inputs: Sequence[Path]) -> None:
    """--out must be a directory of its own (check_run_dir), and neither one of the runs compared nor a
    directory they sit in: --force would empty it."""
    check_run_dir(out, force)
    target = out.expanduser().resolve()
    for path in [*(run.dir for run in runs), *(Path(p).expanduser().resolve() for p in inputs)]:
        if path == target or path.is_relative_to(target):
            raise ConfigError(f"--out {out} holds {path}, a run being compared; name a new directory")


def write_comparison(
    out: Path,
    inputs: Sequence[Path],
    runs: Sequence[RunInput],
    comparison: dict[str, Any],
) -> Path:
    """<out>/results.json of kind "comparison" pointing at the runs by absolute path, with the comparison."""
    run_id = out.name if out.name.startswith("compare-") else f"compare-{new_run_id()}"
    return write_results(
        out,
        {
            "schema": SCHEMA,
            "kind": COMPARISON_KIND,
            "run_id": run_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "partial": False,
            "interrupted_by": None,
            "host": host_info(),
            "config": {
                "inputs": [str(Path(p).expanduser().resolve()) for p in inputs],
                "baseline": comparison["baseline"],
                "resamples": comparison["method"]["resamples"],
                "seed": comparison["method"]["seed"],
            },
            "what": WHAT,
            "runs": [
                {
                    "label": run.label,
                    "backend": run_backend(run.data),
                    "dir": str(run.dir),
                    "what": run_kind(run.data),
                }
                for run in runs
            ],
            "order": [],
            "comparison": comparison,
        },
    )


def compare_runs(
    dirs: Sequence[Path],
    out: Path | None = None,
    baseline: str | None = None,
    force: bool = False,
    resamples: int = ab.RESAMPLES,
) -> Path:
    """`invoke compare`: load the runs in `dirs`, compute their comparison, write <out>/results.json and
    <out>/report.html (out: results/compare-<run-id> when None); returns the report's path. Bad input (a
    directory that is no run, fewer than two runs, an unknown baseline, an --out that is not free) is a
    HarnessError, raised before anything is written."""
    if not dirs:
        raise ConfigError("give the run directories to compare: invoke compare RUN_DIR RUN_DIR...")
    runs, rotations, _ = load_inputs(dirs)
    if len(runs) < MIN_RUNS:
        raise ConfigError(
            f"{len(runs)} run to compare in {', '.join(str(d) for d in dirs)}; give at least {MIN_RUNS} "
            "(a comparison directory counts as its runs)"
        )
    if resamples < 1:
        raise ConfigError(f"resamples must be at least 1, not {resamples}")
    out = out if out is not None else default_out()
    check_out(out, force, runs, dirs)
    comparison = compute_comparison(runs, rotations, baseline, resamples)
    prepare_run_dir(out, force)
    write_comparison(out, dirs, runs, comparison)
    return render_report(out)
