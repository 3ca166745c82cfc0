"""Bad input gets one clear line naming the fix, and a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.image import GuestImage
from harness.paths import cache_dir
from harness.sandbox.qemu.accel import decide_accel, kvm_device_problem
from tests.conftest import REPO, invoke_cmd


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        invoke_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=120, env=env or os.environ.copy()
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sandboxes", "0"], "--sandboxes must be between 1 and"),
        (["--sandboxes", "two"], "expected a whole number, got 'two'"),
        (["--backend", "nope"], "unknown backend 'nope'; choose one of: host, qemu"),
        (["--accel", "hvf"], "--accel must be one of auto, kvm, tcg"),
        (["--mem-mib", "32"], "--mem-mib must be at least 96"),
    ],
)
def test_bad_flags(tmp_path: Path, args: list[str], message: str) -> None:
    result = run("bench", "--out", str(tmp_path / "x"), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_qemu_names_the_package(tmp_path: Path) -> None:
    env = os.environ.copy()
    env["PATH"] = str(Path(sys.executable).parent)  # the venv only: no qemu, no apt
    result = run("bench", "--out", str(tmp_path / "x"), env=env)
    assert result.returncode == 2
    assert "apt-get install qemu-system-x86" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.qemu
def test_broken_kvm_forced_is_a_clear_error(image: GuestImage, tmp_path: Path) -> None:
    if kvm_device_problem() is None and decide_accel("auto", image, cache_dir() / "accel-verdicts.json").accel == "kvm":
        pytest.skip("KVM works on this host")
    result = run("bench", "--accel", "kvm", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "--accel tcg" in result.stderr and "Traceback" not in result.stderr


def test_report_of_missing_run_dir(tmp_path: Path) -> None:
    result = run("report", str(tmp_path))
    assert result.returncode == 2 and "results.json not found" in result.stderr


@pytest.mark.parametrize("task", ["bench", "gateway"])
def test_policy_that_does_not_parse(tmp_path: Path, task: str) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - allow: [\n")
    result = run(task, "--policy", str(policy))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --policy: cannot read policy"), result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["retry-403", "--set", "nosuchoption=1"], "retry-403 has no option 'nosuchoption'"),
        (["retry-403", "--set", "scal=4"], "did you mean 'scale'?"),
        (["payments-service", "--set", "fixer=bogus"], "--set fixer must be one of reference, memory-only,"),
        (["payments-service", "--fixer", "memory-olny"], "did you mean 'memory-only'?"),
        (["ram-pressure", "--set", "burst_mib=lots"], "--set burst_mib: expected a whole number, got 'lots'"),
        (["retry-403", "--leaky"], "retry-403 has no option 'leaky' (given as --leaky)"),
        (["isolation", "--boot-mode", "snapshto"], "--boot-mode must be one of snapshot, cold"),
        (["isolation", "--accel", "xyz"], "--accel must be one of auto, kvm, tcg"),
        (["retry-403", "--set", "scale"], "--set takes KEY=VALUE, not 'scale'"),
        (["retry-40"], "unknown scenario 'retry-40'; did you mean 'retry-403'?"),
    ],
)
def test_bad_scenario_options_are_one_line_and_write_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "run"
    result = run("scenario", *args, "--out", str(out))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.parametrize("name", ["isolation", "payments-service", "proxy-chaos", "ram-pressure", "retry-403"])
def test_help_options_lists_every_option(name: str) -> None:
    from harness.config import settings
    from harness.scenario.loader import load_scenario_module

    result = run("scenario", name, "--help-options")
    assert result.returncode == 0, result.stderr
    for option in settings(load_scenario_module(name).Options):
        assert option.name in result.stdout
    for flag in ("--backend", "--accel", "--mem-mib", "--boot-mode", "--out"):
        assert flag in result.stdout


def test_set_reaches_the_scenario(tmp_path: Path) -> None:
    """retry-403 host-side only (no guest): --set scale and an alias flag land in the run, typed."""
    out = tmp_path / "run"
    result = run(
        "scenario", "retry-403", "--sandboxes", "0", "--set", "scale=2", "--set", "threshold=3", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "results.json").read_text())
    assert (data["config"]["scale"], data["config"]["threshold"], data["config"]["sandboxes"]) == (2, 3, 0)
    cells = data["scenario"]["data"]["retry403"]["cells"]
    assert cells and all(cell["instances"] == 2 and cell["where"] == "host" for cell in cells)
