"""Fixtures for the load tests: a real nginx upstream, a supervisor, a per-test run dir."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.load.targets import Upstream
from harness.supervisor import Supervisor


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with Supervisor(f"test-load-nginx-{os.getpid()}") as supervisor:
        up = Upstream.start(tmp_path_factory.mktemp("nginx"), supervisor)
        try:
            yield up
        finally:
            up.stop()


@pytest.fixture
def load_supervisor(request: pytest.FixtureRequest) -> Iterator[Supervisor]:
    with Supervisor(f"test-load-{os.getpid()}-{request.node.name[:40]}") as sup:
        yield sup


@pytest.fixture(scope="session")
def gateway_ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-ca")
