"""A real signal to a real run, at the moments a CI timeout or a Ctrl-C really lands: during boots,
during the Locust phase, during the isolation probes. Each must end with 128+signal, results marked
partial with the signal named, no leak invented, and no process of the run left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness.results import load_results
from tests.conftest import REPO, invoke_cmd

WAIT_S = 120.0
"""Longest wait for the moment to interrupt at."""


class Run:
    """An `invoke` run in its own session, with every process it ever started remembered."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            invoke_cmd(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.seen: dict[int, float] = {}
        """pid -> create time of every descendant looked at."""

    def descendants(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for child in children:
            try:
                self.seen[child.pid] = child.create_time()
            except psutil.NoSuchProcess:
                continue
        return children

    def wait_for(self, what: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_S
        while not ready():
            assert self.proc.poll() is None, f"run ended before {what}: {self.output()}"
            assert time.monotonic() < deadline, f"no {what} within {WAIT_S:g} s"
            time.sleep(0.1)

    def interrupt(self, signum: int) -> str:
        self.descendants()
        os.kill(self.proc.pid, signum)
        return self.output()

    def output(self) -> str:
        out, _ = self.proc.communicate(timeout=120)
        return out.decode(errors="replace")

    def left_behind(self) -> list[int]:
        left = []
        for pid, created in self.seen.items():
            try:
                process = psutil.Process(pid)
                if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.NoSuchProcess:
                continue
        return left


def has_child(run: Run, fragment: str) -> bool:
    for child in run.descendants():
        try:
            if fragment in " ".join(child.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


def journal_has(out: Path, prefix: str) -> bool:
    try:
        data = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return False
    journal = data.get("scenario", {}).get("journal", {})
    return any(step["name"].startswith(prefix) for step in journal.get("run", []))


def assert_interrupted(run: Run, output: str, out: Path, signum: int) -> dict[str, Any]:
    assert run.proc.returncode == 128 + signum, output
    data = load_results(out)
    assert data["partial"] is True and data["interrupted_by"] == signal.Signals(signum).name, data["interrupted_by"]
    time.sleep(0.5)
    assert run.left_behind() == [], f"processes left: {run.left_behind()}"
    assert "Traceback" not in output, output
    return data


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "phase"), [(signal.SIGTERM, "-m locust"), (signal.SIGINT, "hey -z")])
def test_signal_during_the_proxy_bench_stops_everything(tmp_path: Path, signum: int, phase: str) -> None:
    out = tmp_path / "bench"
    names = ["direct", "gateway", "squid", "tinyproxy"]
    run = Run(
        "bench",
        "--backend",
        "host",
        "--sandboxes",
        "2",
        "--duration",
        "1",
        "--rounds",
        "1",
        "--targets",
        ",".join(names),
        "--out",
        str(out),
    )
    run.wait_for(f"a {phase} process", lambda: has_child(run, phase))
    time.sleep(1.0 if "locust" in phase else 2.5)
    output = run.interrupt(signum)
    data = assert_interrupted(run, output, out, signum)  # nginx, hey, Locust and every peer are gone
    proxy = data["proxy"]
    assert proxy["partial"] is True and proxy["interrupted_by"]
    assert sorted(proxy["targets"]) == sorted(names)  # all started before the load, all stopped
    assert all("Interrupted" not in str(t.get("reason", "")) for t in proxy["targets"].values())
    if "hey" in phase:  # the paced figures were kept, and the capacity cells measured so far
        assert proxy["targets"]["gateway"]["traffic"]["model"]["ok"] > 0
        assert proxy["capacity"]["cells"] >= 1


@pytest.mark.qemu
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_boots_stops_the_bench(tmp_path: Path, signum: int) -> None:
    out = tmp_path / "boots"
    run = Run("bench", "--sandboxes", "2", "--no-proxy", "--boot-mode", "cold", "--accel", "tcg", "--out", str(out))
    run.wait_for("a booting guest", lambda: has_child(run, "qemu-system"))
    time.sleep(0.5)
    output = run.interrupt(signum)
    assert_interrupted(run, output, out, signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_the_isolation_probes_is_no_leak(tmp_path: Path, signum: int) -> None:
    out = tmp_path / "iso"
    run = Run("scenario", "isolation", "--backend", "host", "--sandboxes", "2", "--out", str(out))
    run.wait_for("a probe", lambda: journal_has(out, "probe:"))
    output = run.interrupt(signum)
    data = assert_interrupted(run, output, out, signum)
    scenario = data["scenario"]
    assert scenario["journal"]["status"] == "interrupted" and not scenario["data"].get("leaks")
    steps = [step for step in scenario["journal"]["run"] if step["name"].startswith("probe:")]
    assert steps[-1]["status"] == "interrupted" and all(s["status"] == "succeeded" for s in steps[:-1]), steps
    assert all(
        "Interrupted" not in str(probe.get("reason")) and "KeyboardInterrupt" not in str(probe.get("reason"))
        for card in scenario["data"].get("scorecards", [])
        for probe in card["probes"]
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_the_report_renders_leaves_whole_files(tmp_path: Path, signum: int) -> None:
    out = tmp_path / "render"
    run = Run("bench", "--backend", "host", "--sandboxes", "2", "--no-proxy", "--out", str(out))

    def finished_not_rendered() -> bool:
        try:
            return json.loads((out / "results.json").read_text())["partial"] is False
        except (OSError, ValueError, KeyError):
            return False

    run.wait_for("the run's last save", finished_not_rendered)
    written = (out / "results.json").read_text()
    output = run.interrupt(signum)
    assert run.proc.returncode == 128 + signum, output
    assert (out / "results.json").read_text() == written
    # The signal waited for the report: it is whole, and no staging file is left.
    assert (out / "report.html").read_text().rstrip().endswith("</html>")
    assert list(out.glob(".report.html.*")) == []
    assert "Traceback" not in output and f"interrupted ({signal.Signals(signum).name})" in output
