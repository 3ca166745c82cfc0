"""`invoke clean` after a SIGKILLed run: its scratch directories and processes go, by record, and the
names it prints are printed as they are."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from harness.scratch import make_scratch_dir, remove_scratch_dir, sweep_scratch_dirs
from harness.supervisor import pid_alive
from tests.conftest import REPO

KILLED_RUN = """
import sys, time
from harness.scratch import make_scratch_dir
from harness.supervisor import Supervisor
path = make_scratch_dir("br-test-scratch-")
(path / "live.log").write_text("a run's live files")
supervisor = Supervisor("test-clean-" + sys.argv[1])
supervisor.spawn(["sleep", "300"], name="locust-master:squid:paced")
print(path, flush=True)
time.sleep(300)
"""


def test_clean_removes_scratch_dirs_and_processes_of_a_killed_run() -> None:
    run = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(os.getpid())], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert run.stdout is not None
    scratch = Path(run.stdout.readline().strip())
    assert (scratch / "live.log").exists()
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=10)
    cleaned = subprocess.run(
        [str(Path(sys.executable).parent / "invoke"), "clean"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert cleaned.returncode == 0, cleaned.stderr
    assert not scratch.exists() and f"removed scratch directory {scratch}" in cleaned.stderr
    assert "killed locust-master:squid:paced" in cleaned.stderr  # no emoji in a process name


def test_a_live_owners_scratch_dir_is_left_alone() -> None:
    mine = make_scratch_dir("br-test-live-")
    try:
        sweep_scratch_dirs()
        assert mine.exists()
    finally:
        remove_scratch_dir(mine)
    assert not mine.exists()


UNRECORDED_RUN = """
import sys, time
from harness.supervisor import Supervisor
supervisor = Supervisor("test-unrecorded-" + sys.argv[1])
child = supervisor.spawn(["sleep", "300"], name="late")
supervisor.record_path.unlink()  # as if the kill had come between the spawn and its record
print(child.pid, flush=True)
time.sleep(300)
"""


def test_clean_finds_a_killed_runs_process_that_was_never_recorded() -> None:
    run = subprocess.Popen(
        [sys.executable, "-c", UNRECORDED_RUN, str(os.getpid())], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert run.stdout is not None
    orphan = int(run.stdout.readline())
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=10)
    cleaned = subprocess.run(
        [str(Path(sys.executable).parent / "invoke"), "clean"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert cleaned.returncode == 0 and f"(pid {orphan})" in cleaned.stderr, cleaned.stderr
    assert not pid_alive(orphan)
