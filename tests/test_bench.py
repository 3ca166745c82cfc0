"""`invoke bench` end to end on real guests, and every way a run can end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness.bench import BenchConfig, BenchEvents, run_bench
from harness.paths import pid_records_dir
from harness.results import load_results
from harness.sandbox.base import SandboxRecord
from tests.conftest import HOST_SECRET, HOST_SECRET_ENV, REPO, invoke_cmd, qemu_pids_of

pytestmark = pytest.mark.qemu


def test_bench_two_sandboxes_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOST_SECRET_ENV, HOST_SECRET)
    out = tmp_path / "smoke"
    run = run_bench(
        BenchConfig(sandboxes=2, out=out, warmup=0, accel="auto", idle_settle_s=0.5, proxy=None, guest_samples=3)
    )
    data = load_results(out)
    assert data["partial"] is False and data["accel"] in ("kvm", "tcg")
    assert data["backend"]["boot_mode"] == "snapshot"
    assert all(size > 0 for size in data["backend"]["snapshot_bytes"].values())
    assert [s["ok"] for s in data["sandboxes"]] == [True, True]
    for sandbox in data["sandboxes"]:
        assert sandbox["boot_ms"] > 0 and sandbox["host_pss_bytes"] > 0 and sandbox["guest_mem_total_bytes"] > 0
        # The default boot mode restores a snapshot: QEMU's start, the state load, the agent's first answer.
        assert set(sandbox["phases_ms"]) == {"qemu_start", "state_load", "first_answer"}
        assert sum(sandbox["phases_ms"].values()) == pytest.approx(sandbox["boot_ms"], abs=1.0)
    summary = data["summary"]
    assert summary["success_rate"] == 1.0 and summary["boot_ms"]["n"] == 2
    assert summary["mem_available_delta_bytes_per_sandbox"] is not None
    assert data["leftover_vmm_pids"] == [] and qemu_pids_of(run.run_id) == []
    for figures in data["guest_latency"]["sandboxes"].values():  # measured from inside, through the gateway
        assert figures["ok"] == 3 and figures["latency_ms"]["p50"] > 0, figures
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert (out / "memory-samples.jsonl").stat().st_size > 0
    assert len((out / "boot-samples.jsonl").read_text().splitlines()) == 2
    everything = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert HOST_SECRET.encode() not in everything


class FailAfterFirstBoot(BenchEvents):
    def sandbox_done(self, record: SandboxRecord) -> None:
        raise RuntimeError("injected failure in a bench step")


def test_exception_mid_round_writes_partial_results_and_stops_everything(tmp_path: Path) -> None:
    out = tmp_path / "exc"
    with pytest.raises(RuntimeError, match="injected"):
        run_bench(BenchConfig(sandboxes=2, out=out, warmup=0, accel="tcg", proxy=None), FailAfterFirstBoot())
    data = load_results(out)
    assert data["partial"] is True and "injected" in data["interrupted_by"]
    assert qemu_pids_of(data["run_id"]) == []
    assert (out / "report.html").exists()
    assert not (pid_records_dir() / f"{data['run_id']}.json").exists()


def test_guest_that_never_becomes_ready_is_a_counted_failure(tmp_path: Path) -> None:
    out = tmp_path / "slow"
    run_bench(BenchConfig(sandboxes=1, out=out, warmup=0, accel="tcg", boot_timeout_s=0.3, proxy=None))
    data = load_results(out)
    assert data["partial"] is False
    assert data["summary"]["success_rate"] == 0.0
    assert "did not answer within 0.3 s" in data["sandboxes"][0]["error"]
    assert qemu_pids_of(data["run_id"]) == []


def start_bench(out: Path, sandboxes: int = 2) -> subprocess.Popen[bytes]:
    argv = invoke_cmd(
        "bench", "--sandboxes", str(sandboxes), "--out", str(out), "--warmup", "0", "--accel", "tcg", "--no-proxy"
    )
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_qemu(out: Path, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> str:
    """The run id, once at least one of its QEMU processes is running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        if (out / "results.json").exists():
            run_id = json.loads((out / "results.json").read_text())["run_id"]
            if qemu_pids_of(run_id):
                return run_id
        time.sleep(0.05)
    raise AssertionError("bench never started a guest")


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_boot_writes_partial_results_and_leaves_nothing(tmp_path: Path, signum: int, status: int) -> None:
    out = tmp_path / "sig"
    proc = start_bench(out)
    run_id = wait_for_qemu(out, proc)
    os.kill(proc.pid, signum)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == status, output
    data = load_results(out)
    assert data["partial"] is True and data["interrupted_by"] == signal.Signals(signum).name
    assert qemu_pids_of(run_id) == []
    assert (out / "report.html").exists() and "PARTIAL RUN" in (out / "report.html").read_text()
    assert "partial results were written" in output


def test_clean_reaps_what_a_sigkilled_run_left(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = start_bench(out)
    run_id = wait_for_qemu(out, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the harness dies without cleanup; its guests live on
    proc.wait(timeout=10)
    assert qemu_pids_of(run_id), "expected orphaned guests after SIGKILL"
    cleaned = subprocess.run(invoke_cmd("clean"), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert cleaned.returncode == 0
    assert f"from run {run_id}" in cleaned.stderr
    deadline = time.monotonic() + 5
    while qemu_pids_of(run_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pids_of(run_id) == []
