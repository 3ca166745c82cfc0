"""density: clones diverge step by step from a shared template; every step measured, nothing left running."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.scenario.loader import load_scenario_module
from harness.scenario.runner import run_scenario
from tests.conftest import qemu_pids_of

mod = load_scenario_module("density")


@pytest.mark.parametrize("arms", ["", "off,off", "shared", "off,fil"])
def test_bad_arms_are_refused(arms: str) -> None:
    with pytest.raises(ConfigError, match="--set arms takes a comma list"):
        mod.Options(arms=arms).validate()


@pytest.mark.qemu
def test_a_file_backed_clone_diverges_step_by_step(tmp_path: Path) -> None:
    options = {"accel": "tcg", "sandboxes": 1, "arms": "file", "files_mib": 2, "burst_mib": 24, "hold_mib": 8}
    code, run_dir = run_scenario("density", {**options, "settle_s": 0.5}, tmp_path / "run")
    results = json.loads((run_dir / "results.json").read_text())
    assert code == 0 and not qemu_pids_of(results["run_id"])
    (arm,) = results["scenario"]["data"]["arms"]
    assert arm["error"] is None and [s["step"] for s in arm["steps"]] == ["idle", "files", "burst", "hold"]
    idle, *_, hold = arm["steps"]
    assert idle["shared_resident_bytes"] > 0  # the template's RAM file, mapped by the clone
    # Free page reporting is off with a shared file, so what the clone wrote stays its own: USS only grows.
    uss = [s["uss_bytes_per_sandbox"] for s in arm["steps"]]
    assert all(later > earlier - (1 << 20) for earlier, later in pairwise(uss))
    assert hold["uss_bytes_per_sandbox"] - idle["uss_bytes_per_sandbox"] > 24 << 20
    assert "density: host memory per clone" in (run_dir / "report.html").read_text()
