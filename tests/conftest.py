"""Shared fixtures: the real guest image, a supervisor, one booted guest per module."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.image import GuestImage, build_image
from harness.paths import cache_dir
from harness.sandbox.base import SandboxSpec
from harness.sandbox.qemu.vm import Microvm
from harness.supervisor import Supervisor

REPO = Path(__file__).resolve().parent.parent

HOST_SECRET_ENV = "BLASTRADIUS_TEST_HOST_SECRET"
HOST_SECRET = "br-host-secret-4f1c9d2e7a6b"
"""Planted in the test process's environment; must never show up in a guest or a run's files."""


@pytest.fixture(scope="session")
def image() -> GuestImage:
    return build_image(cache_dir())


@pytest.fixture
def supervisor(request: pytest.FixtureRequest) -> Iterator[Supervisor]:
    with Supervisor(f"test-{os.getpid()}-{request.node.name[:40]}") as sup:
        yield sup


@pytest.fixture(scope="module")
def guest(image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Microvm]:
    """One TCG guest shared by a module's read-only tests."""
    os.environ[HOST_SECRET_ENV] = HOST_SECRET
    with Supervisor(f"test-{os.getpid()}-guest") as sup:
        vm = Microvm(SandboxSpec(id="guest0", workdir=tmp_path_factory.mktemp("guest0")), image, sup, "tcg")
        vm.spawn()
        vm.wait_ready()
        yield vm
        vm.stop()


def qemu_pids_of(run_id: str) -> list[int]:
    """Pids of QEMU processes started by run `run_id` (their -name carries it)."""
    out = subprocess.run(["pgrep", "-f", f"blastradius-{run_id}-"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def all_blastradius_qemu() -> list[int]:
    out = subprocess.run(
        ["pgrep", "-f", "qemu-system-x86_64 -name blastradius-"], capture_output=True, text=True
    ).stdout
    return [int(p) for p in out.split()]


def invoke_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "invoke", "--search-root", str(REPO), *args]


BWRAP_EXAMPLE = "examples/command-backends/bwrap.yaml"
"""The command backend's bubblewrap example: a jail built from outside the harness."""


@dataclass
class IsolationComparison:
    """One `invoke scenario isolation --backend bwrap,host,command:...` run, shared by the tests that judge
    those backends (the isolation probes cost 5-10 s per backend; running them once keeps the suite short)."""

    returncode: int
    stderr: str
    out: Path
    planted_key: str
    """A real-looking key of the invoking user, in the run's environment: it must reach no file of the run."""

    def sub_run(self, label: str) -> dict[str, Any]:
        """results.json of the sub-run `label` (bwrap, host, command-bwrap)."""
        return json.loads((self.out / label / "results.json").read_text())


@pytest.fixture(scope="session")
def isolation_comparison(tmp_path_factory: pytest.TempPathFactory) -> IsolationComparison:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (install.sh installs it)")
    out = tmp_path_factory.mktemp("iso-comparison") / "run"
    key = f"sk-proj-{secrets.token_hex(16)}"
    backends = f"bwrap,host,command:{BWRAP_EXAMPLE}"
    result = subprocess.run(
        invoke_cmd("scenario", "isolation", "--backend", backends, "--sandboxes", "2", "--out", str(out)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OPENAI_API_KEY": key},
    )
    assert "Traceback" not in result.stderr, result.stderr
    return IsolationComparison(result.returncode, result.stderr, out, key)
