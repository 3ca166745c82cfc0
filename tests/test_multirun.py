"""Several backends in one run: a sub-run each, taking turns in a rotating order, one comparison on top;
and a run interrupted by SIGINT, SIGTERM or SIGKILL leaves no jail behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness.supervisor import pid_alive, process_create_time
from tests.conftest import REPO, IsolationComparison

INVOKE = str(Path(sys.executable).parent / "invoke")

pytestmark = pytest.mark.slow


def invoke(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([INVOKE, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_bench_takes_turns_between_backends(tmp_path: Path) -> None:
    out = tmp_path / "x"
    result = invoke("bench", "--backend", "bwrap,host", "--sandboxes", "2", "--warmup", "0", "--repeat", "2",
                    "--no-proxy", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    top = json.loads((out / "results.json").read_text())
    assert top["kind"] == "comparison" and not top["partial"]
    assert [run["label"] for run in top["runs"]] == ["bwrap", "host"]
    assert top["order"] == [["bwrap", "host"], ["host", "bwrap"]]
    for name in ("bwrap", "host"):
        sub = json.loads((out / name / "results.json").read_text())
        assert sub["backend"]["name"] == name and not sub["partial"]
        ok = [s for s in sub["sandboxes"] if s["ok"]]
        assert len(ok) == 4 and all(s["boot_ms"] and s["host_pss_bytes"] for s in ok)
        assert (out / name / "report.html").exists()


def test_isolation_runs_every_probe_on_every_backend(isolation_comparison: IsolationComparison) -> None:
    assert isolation_comparison.returncode == 1, isolation_comparison.stderr  # the host backend leaks: its job
    top = json.loads((isolation_comparison.out / "results.json").read_text())
    assert top["kind"] == "comparison" and [run["label"] for run in top["runs"]] == ["bwrap", "host", "command-bwrap"]
    verdicts = {}
    for name in ("bwrap", "host"):
        scorecards = isolation_comparison.sub_run(name)["scenario"]["data"]["scorecards"]
        assert len(scorecards) == 2
        verdicts[name] = {p["id"]: p["passed"] for p in scorecards[0]["probes"]}
    assert verdicts["bwrap"]["kernel"] is False and verdicts["host"]["kernel"] is False
    assert sum(v is False for v in verdicts["host"].values()) >= 5
    assert verdicts["bwrap"]["processes"] is True and verdicts["host"]["processes"] is False


@pytest.mark.parametrize(
    ("backends", "message"),
    [
        ("bwrap,nope", "unknown backend 'nope'"),
        ("bwrap,bwrap", "names a backend twice"),
        ("bwrap,", "no space or empty name"),
        ("bwrap, host", "no space or empty name"),
    ],
)
def test_a_bad_backend_list_is_one_line(tmp_path: Path, backends: str, message: str) -> None:
    result = invoke("bench", "--backend", backends, "--no-proxy", "--warmup", "0", "--out", str(tmp_path / "z"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "z").exists()


def _family(pid: int) -> set[tuple[int, float]]:
    """pid and its descendants, each with its start time (so a recycled pid is never mistaken for one)."""
    family = set()
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        for process in (root, *root.children(recursive=True)):
            with contextlib.suppress(psutil.NoSuchProcess):
                family.add((process.pid, process.create_time()))
    return family


def _names(seen: set[tuple[int, float]]) -> set[str]:
    names = set()
    for pid, _ in seen:
        with contextlib.suppress(psutil.Error):
            names.add(psutil.Process(pid).name())
    return names


def _still_running(seen: set[tuple[int, float]], grace_s: float = 10.0) -> list[str]:
    """Command lines of the processes in `seen` still running after `grace_s` (zombies count as gone)."""
    deadline = time.monotonic() + grace_s
    while True:
        left = [pid for pid, started in seen if pid_alive(pid) and process_create_time(pid) == started]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    lines = []
    for pid in left:
        with contextlib.suppress(psutil.Error):
            lines.append(f"{pid}: {' '.join(psutil.Process(pid).cmdline())}")
    return lines


JAIL_PROCESS = {"bwrap": "bwrap", "gvisor": "runsc"}
"""A process name that shows the backend's jail is up."""


@pytest.mark.parametrize("backend", sorted(JAIL_PROCESS))
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_an_interrupted_run_leaves_no_jail(tmp_path: Path, backend: str, signum: signal.Signals) -> None:
    out = tmp_path / "run"
    argv = [INVOKE, "bench", "--backend", f"{backend},host", "--sandboxes", "2", "--warmup", "0",
            "--repeat", "50", "--no-proxy", "--out", str(out)]  # fmt: skip
    run = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: set[tuple[int, float]] = set()
    deadline = time.monotonic() + 120
    # Until jails are up: the family then holds the jail, its init and the relays.
    while not any(name.startswith(JAIL_PROCESS[backend]) for name in _names(seen)):
        assert run.poll() is None and time.monotonic() < deadline, run.stderr.read() if run.stderr else ""
        seen |= _family(run.pid)
        time.sleep(0.05)
    seen |= _family(run.pid)
    os.kill(run.pid, signum)
    run.wait(timeout=60)
    if signum == signal.SIGKILL:
        cleaned = invoke("clean", timeout=120)
        assert cleaned.returncode == 0, cleaned.stderr
    else:
        assert run.returncode == 128 + signum
        top = json.loads((out / "results.json").read_text())
        assert top["partial"] and top["interrupted_by"] == signum.name
        sub = json.loads((out / backend / "results.json").read_text())
        assert sub["partial"]
    assert not _still_running({(pid, started) for pid, started in seen if pid != run.pid})
