"""Shared fixtures: the real guest image, a supervisor, one booted guest per module."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

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
