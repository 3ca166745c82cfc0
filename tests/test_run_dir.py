"""The run directory: a run never mixes with another's files, --force empties only an earlier run, a
directory that cannot be written and a results.json that cannot be read are one line and exit 2."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, invoke_cmd

HOST_BENCH = ("bench", "--backend", "host", "--sandboxes", "1", "--no-proxy", "--guest-samples", "0")


def invoke(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(invoke_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=180)


def one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.stderr, result.stderr
    assert all(word in lines[0] for word in words), lines[0]


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A real read-only file system (a tmpfs mounted ro; root ignores file modes)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_an_earlier_run_is_refused_then_emptied_with_force(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert invoke(*HOST_BENCH, "--out", str(out)).returncode == 0
    stale = out / "sandboxes" / "r0-sb-stale"
    stale.mkdir()
    first_id = json.loads((out / "results.json").read_text())["run_id"]
    one_line_error(invoke(*HOST_BENCH, "--out", str(out)), "--force")
    assert stale.exists(), "a refused run writes nothing"
    assert invoke(*HOST_BENCH, "--out", str(out), "--force").returncode == 0
    assert not stale.exists() and json.loads((out / "results.json").read_text())["run_id"] != first_id
    assert len((out / "boot-samples.jsonl").read_text().splitlines()) == 1  # not appended to the earlier run's


def test_force_never_empties_a_directory_of_other_files(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("years of work")
    one_line_error(invoke(*HOST_BENCH, "--out", str(tmp_path), "--force"), "not a blastradius run")
    one_line_error(invoke("scenario", "isolation", "--backend", "host", "--out", str(tmp_path)), "new directory")
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_out_naming_a_file_or_a_read_only_place(tmp_path: Path, read_only: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(invoke(*HOST_BENCH, "--out", str(afile)), "is a file")
    one_line_error(invoke(*HOST_BENCH, "--out", str(read_only / "run")), "not writable")
    one_line_error(invoke("scenario", "isolation", "--backend", "host", "--out", str(read_only / "s")), "writable")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('{"schema": "blastradius/results/v1", "run_id": ', ("not JSON", "cut short")),
        ("", ("not JSON",)),
        ('{"schema": "someone-else/v3"}', ("schema", "someone-else/v3")),
        ('["a", "list"]', ("JSON list",)),
        ('{"schema": "blastradius/results/v1"}', ("does not conform",)),
    ],
)
def test_report_of_a_results_file_that_does_not_parse(tmp_path: Path, content: str, words: tuple[str, ...]) -> None:
    (tmp_path / "results.json").write_text(content)
    one_line_error(invoke("report", str(tmp_path)), *words)


def test_report_into_a_read_only_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert invoke(*HOST_BENCH, "--out", str(out)).returncode == 0
    view = tmp_path / "view"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(out), str(view)], check=True)
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        one_line_error(invoke("report", str(view)), "cannot write the report", "Read-only")
    finally:
        subprocess.run(["umount", str(view)], check=True)
