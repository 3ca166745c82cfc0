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
        (["--backend", "nope"], "unknown backend 'nope'; choose one of: "),
        (["--accel", "hvf"], "--accel must be one of auto, kvm, tcg"),
        (["--mem-mib", "32"], "--mem-mib must be at least 96"),
        (["--boot-mode", "warm"], "--boot-mode must be one of snapshot, cold, not 'warm'"),
        (["--boot-timeout", "soon"], "--boot-timeout: expected a number, got 'soon'"),
        (["--memory-sharing", "shared"], "--memory-sharing must be one of off, file, ksm, file+ksm, not 'shared'"),
        (["--backend", "bwrap", "--memory-sharing", "file"], "the bwrap backend shares no memory that way"),
    ],
)
def test_bad_flags(tmp_path: Path, args: list[str], message: str) -> None:
    result = run("bench", "--out", str(tmp_path / "x"), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()  # checked before anything is written (no image build either)


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
        (["ram-pressure", "--memory-sharing", "file"], "add --set reclaim=off or use --memory-sharing off"),
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


@pytest.mark.parametrize(
    "name", ["egress-conformance", "isolation", "payments-service", "proxy-chaos", "ram-pressure", "retry-403"]
)
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


def test_no_proxy_runs_no_locust_and_keeps_the_other_flags(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--backend", "host", "--sandboxes", "2", "--warmup", "0", "--guest-samples", "2", "--no-proxy"]
    result = run("bench", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "results.json").read_text())
    assert data["partial"] is False and [s["ok"] for s in data["sandboxes"]] == [True, True]
    assert data["config"]["proxy"] is None and data["config"]["guest_samples"] == 2 and "proxy" not in data
    # Nothing of the Locust comparison started: no stage, no Locust or peer output, no proxy results.
    assert "proxy latency under load" not in result.stderr and not (out / "proxy").exists()
    assert (out / "report.html").exists()


def test_no_proxy_refuses_locust_flags(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run("bench", "--no-proxy", "--targets", "squid", "--duration", "5", "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--no-proxy runs no Locust comparison, so --duration, --targets" in lines[0]
    assert not out.exists()


def in_project(tmp_path: Path, invoke_yaml: str) -> Path:
    """A project directory with this repository's tasks.py and the given invoke.yaml beside it."""
    project = tmp_path / "project"
    project.mkdir(parents=True)
    (project / "tasks.py").write_text((REPO / "tasks.py").read_text())
    (project / "invoke.yaml").write_text(invoke_yaml)
    return project


def run_in(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "invoke", "--search-root", str(project), *args]
    return subprocess.run(
        argv, cwd=project, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


@pytest.mark.parametrize(
    ("task", "flag", "key", "yaml_value"),
    [("bench", "--backend", "backend", "from-yaml"), ("scenario", "--accel", "accel", "from-yaml")],
)
def test_flag_beats_environment_beats_invoke_yaml(
    tmp_path: Path, task: str, flag: str, key: str, yaml_value: str
) -> None:
    """Each layer gives a value that is refused, so the error shows which one won, and nothing is written."""
    project = in_project(tmp_path, f"{task}:\n  {key}: {yaml_value}\n")
    env_var = f"INVOKE_{task}_{key}".upper()
    task_args = [task, *(["retry-403"] if task == "scenario" else []), "--out", str(tmp_path / "out")]
    for env, flags, winner in [
        ({}, [], "from-yaml"),
        ({env_var: "from-env"}, [], "from-env"),
        ({env_var: "from-env"}, [flag, "from-flag"], "from-flag"),
    ]:
        result = run_in(project, *task_args, *flags, env=env)
        assert result.returncode == 2 and f"'{winner}'" in result.stderr, (winner, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_invoke_yaml_values_are_parsed_and_checked_like_flags(tmp_path: Path) -> None:
    project = in_project(tmp_path, "bench:\n  sandbxes: 2\n")
    result = run_in(project, "bench", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "bench.sandbxes is not a setting" in result.stderr
    assert "did you mean 'sandboxes'?" in result.stderr
    project = in_project(tmp_path / "b", "bench:\n  sandboxes: two\n")
    result = run_in(project, "bench", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "bench.sandboxes (invoke.yaml) or INVOKE_BENCH_SANDBOXES: expected a whole number" in result.stderr
    assert not (tmp_path / "out").exists()
