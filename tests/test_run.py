"""The one run wrapper (harness/run.py) on the host backend: every way a run ends leaves results.json and a
report, and the run's own error is never hidden. The bench and every scenario go through it."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from harness.config import RunConfig
from harness.results import load_results
from harness.run import open_run
from harness.sandbox.base import SandboxRecord
from harness.supervisor import Interrupted

CONFIG_RECORD = {"backend": "host", "note": "test"}
SANDBOX_KEYS = [
    "id",
    "round",
    "ok",
    "error",
    "boot_ms",
    "phases_ms",
    "marks_ms",
    "provision_ms",
    "host_rss_bytes",
    "host_pss_bytes",
    "host_uss_bytes",
    "host_shared_pss_bytes",
    "guest_mem_total_bytes",
    "guest_mem_free_bytes",
]
"""results.json's sandbox entry, key for key, as fleet.boot_record() wrote it before the typed record."""


def test_a_complete_run_records_its_backend_sandboxes_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with open_run(RunConfig(backend="host", out=out), CONFIG_RECORD, {"extra": {"k": 1}}) as run:
        assert load_results(out)["partial"] is True  # written before the first step
        backend = run.open_backend()
        assert run.template is not None
        record = SandboxRecord("sb0")
        sandbox = backend.boot(replace(run.template, id="sb0", workdir=out / "sb0"), run.supervisor)
        record.ok, record.boot_ms = True, sandbox.boot.boot_ms
        run.sandboxes.append(record)
        sandbox.stop()
    data = load_results(out)
    assert data["partial"] is False and data["interrupted_by"] is None
    assert data["backend"]["name"] == "host" and data["config"] == CONFIG_RECORD and data["extra"] == {"k": 1}
    assert [s["id"] for s in data["sandboxes"]] == ["sb0"] and data["summary"]["success_rate"] == 1.0
    assert list(data["sandboxes"][0]) == SANDBOX_KEYS
    assert (out / "report.html").exists() and "report_error" not in data


def test_an_exception_is_recorded_and_propagates(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="step failed"), open_run(RunConfig(backend="host", out=out), {}) as run:
        run.open_backend()
        raise RuntimeError("step failed")
    data = load_results(out)
    assert data["partial"] is True and data["interrupted_by"] == "RuntimeError: step failed"
    assert (out / "report.html").exists()


def test_sigterm_is_recorded_as_an_interruption(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(Interrupted), open_run(RunConfig(backend="host", out=out), {}) as run:
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail(f"SIGTERM did not interrupt run {run.run_id}")
    data = load_results(out)
    assert data["partial"] is True and data["interrupted_by"] == "SIGTERM"


def test_a_report_bug_is_recorded_without_hiding_the_runs_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "report.html").mkdir(parents=True)  # the report cannot be written
    with pytest.raises(RuntimeError, match="the run's own"), open_run(RunConfig(backend="host", out=out), {}):
        raise RuntimeError("the run's own error")
    data = load_results(out)
    assert data["interrupted_by"] == "RuntimeError: the run's own error"
    assert data["report_error"].startswith("IsADirectoryError")
