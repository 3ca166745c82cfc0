"""Several backends in one run: a sub-run per backend, never two at once, and one comparison on top.

with open_comparison(config, "bench", config.backends) as comparison:   # X/results.json (kind comparison)
    for backend in comparison.rotation(round_index): ...              # X/<label>/ is an ordinary run
# on the way out, however it ends: partial and interrupted_by recorded, results.json saved and X/report.html
# rendered, comparing the sub-runs side by side (harness/compare.py reads the same files).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config import RunConfig
from harness.report import render_report
from harness.results import SCHEMA, host_info, new_run_id, write_results
from harness.run import interrupted_by, prepare_run_dir
from harness.sandbox import backend_label
from harness.supervisor import Interrupted, Supervisor, interruption, signals_deferred, signals_raise

COMPARISON_KIND = "comparison"
"""results.json's `kind` for a directory whose runs are its sub-directories."""


@dataclass
class Comparison:
    """A multi-backend run in progress: the top-level results.json, written after every sub-run's step."""

    run_dir: Path
    """X: holds X/<label>/ per backend, X/results.json and X/report.html."""
    backends: list[str]
    """--backend's names, in the order given."""
    supervisor: Supervisor
    """Owns what the comparison itself starts (the proxy comparison's processes); each sub-run has its own."""
    data: dict[str, Any] = field(default_factory=dict)
    """The top-level results.json as plain data."""

    def label(self, backend: str) -> str:
        return backend_label(backend)

    def sub_dir(self, backend: str) -> Path:
        """Where `backend`'s own run goes."""
        return self.run_dir / self.label(backend)

    def rotation(self, round_index: int) -> list[str]:
        """The backends in the order they take round `round_index` (0 = the first round run, warm-ups included):
        rotated by one each round, so no backend always follows the same one; recorded in `order`."""
        shift = round_index % len(self.backends)
        order = self.backends[shift:] + self.backends[:shift]
        self.data["order"].append([self.label(name) for name in order])
        return order

    def save(self) -> Path:
        return write_results(self.run_dir, self.data)


@contextmanager
def open_comparison(config: RunConfig, what: str, config_record: dict[str, Any]) -> Iterator[Comparison]:
    """Create X and its partial results.json, and yield the Comparison with SIGTERM raising. However the body
    ends, X/results.json says whether every sub-run finished and what interrupted it, and X/report.html
    compares what the sub-runs wrote; the body's own exception propagates unchanged."""
    run_dir = config.out or Path("results") / new_run_id()
    prepare_run_dir(run_dir, config.force)
    run_id = new_run_id()
    comparison = Comparison(run_dir=run_dir, backends=config.backends, supervisor=Supervisor(run_id))
    comparison.data = {
        "schema": SCHEMA,
        "kind": COMPARISON_KIND,
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "partial": True,
        "interrupted_by": None,
        "what": what,
        "host": host_info(),
        "config": config_record,
        "runs": [
            {"label": comparison.label(name), "backend": name, "dir": comparison.label(name)}
            for name in config.backends
        ],
        "order": [],
    }
    comparison.save()
    try:
        with signals_raise():
            yield comparison
            comparison.data["partial"] = False
    except (KeyboardInterrupt, Interrupted, Exception) as exc:
        comparison.data["interrupted_by"] = interrupted_by(exc)
        raise
    finally:
        with signals_deferred() as late:
            comparison.supervisor.shutdown()
            comparison.data["runs"] = [
                {**entry, "missing": not (run_dir / entry["dir"] / "results.json").exists()}
                for entry in comparison.data["runs"]
            ]
            comparison.save()
            try:
                render_report(run_dir)
            except Exception as exc:  # the sub-runs are safe on disk; a report bug must not hide the run's error
                comparison.data["report_error"] = f"{type(exc).__name__}: {exc}"
                comparison.save()
        if late:
            raise interruption(late[0])
