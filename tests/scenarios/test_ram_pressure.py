"""ram-pressure: each stop condition, checked before the boot it would prevent; everything torn down."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.metrics.memory import mem_available_bytes
from harness.scenario.loader import load_scenario_module
from harness.scenario.runner import run_scenario
from tests.conftest import qemu_pids_of

mod = load_scenario_module("ram-pressure")
MIB = 1024 * 1024
LIMITS = mod.Thresholds(min_mem_available_bytes=1000 * MIB, max_psi_some_avg10=10.0, cap=4)


def test_stop_reason_each_condition() -> None:
    calm = {"some_avg10": 0.5}
    assert mod.stop_reason(0, 4000 * MIB, calm, 200 * MIB, LIMITS) is None
    assert mod.stop_reason(4, 4000 * MIB, calm, 200 * MIB, LIMITS)[0] == "cap"
    # The *next* boot's cost counts: 1100 MiB available is above the floor but not after another sandbox.
    assert mod.stop_reason(1, 1100 * MIB, calm, 200 * MIB, LIMITS)[0] == "mem-available"
    assert mod.stop_reason(1, 4000 * MIB, {"some_avg10": 12.0}, 200 * MIB, LIMITS)[0] == "psi"
    assert mod.stop_reason(1, 4000 * MIB, None, 200 * MIB, LIMITS) is None  # no PSI on this kernel


def ramp(tmp_path: Path, **options: Any) -> tuple[int, dict[str, Any]]:
    code, run_dir = run_scenario(
        "ram-pressure",
        {"accel": "tcg", "reclaim": "on", "workload": "none", "settle_s": 0.5, **options},
        tmp_path / "run",
    )
    results = json.loads((run_dir / "results.json").read_text())
    assert not qemu_pids_of(results["run_id"]), "a sandbox outlived its ramp"
    return code, results


def test_memory_floor_stops_before_the_first_boot(tmp_path: Path) -> None:
    floor_mib = mem_available_bytes() // MIB  # the first sandbox would take the host below it
    code, results = ramp(tmp_path, min_mem_available_mib=floor_mib)
    arm = results["scenario"]["data"]["arms"][0]
    assert code == 0 and arm["stop"]["reason"] == "mem-available" and arm["density_limit"] == 0
    assert results["sandboxes"] == []  # checked before booting: nothing was started


def test_psi_ceiling_stops_the_ramp(tmp_path: Path) -> None:
    _, results = ramp(tmp_path, max_psi_some_avg10=-1.0)
    arm = results["scenario"]["data"]["arms"][0]
    assert arm["stop"]["reason"] == "psi" and results["sandboxes"] == []


@pytest.mark.qemu
def test_boot_failure_stops_the_ramp(tmp_path: Path) -> None:
    _, results = ramp(tmp_path, boot_timeout_s=0.3)
    arm = results["scenario"]["data"]["arms"][0]
    assert arm["stop"]["reason"] == "boot-failed" and arm["density_limit"] == 0
    assert [s["ok"] for s in results["sandboxes"]] == [False]


@pytest.mark.qemu
@pytest.mark.slow
def test_cap_with_both_reclaim_settings(tmp_path: Path) -> None:
    code, results = ramp(tmp_path, max_sandboxes=2, reclaim="both", workload="burst", burst_mib=96, settle_s=5)
    arms = results["scenario"]["data"]["arms"]
    assert code == 0 and [a["reclaim"] for a in arms] == [True, False]
    for arm in arms:
        assert arm["stop"]["reason"] == "cap" and arm["density_limit"] == 2
        assert [s["n"] for s in arm["steps"]] == [1, 2]
        last = arm["steps"][-1]
        assert len(last["pss_bytes"]) == 2 and all(v > 16 * MIB for v in last["pss_bytes"].values())
        assert last["newest_boot_ms"] > 0 and last["psi"] is not None
    assert (tmp_path / "run" / "report.html").exists() and "report_error" not in results
    # Free page reporting hands the freed burst back to the host; without it the guest keeps it resident.
    on, off = (arm["pss_mib_per_sandbox"] for arm in arms)
    assert results["config"]["mem_mib"] >= mod.RECLAIM_MIN_GUEST_MIB
    assert on < off - 40, (on, off)
