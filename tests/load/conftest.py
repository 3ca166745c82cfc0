"""Fixtures for the load tests: a real loopback upstream, a supervisor, a per-test run dir."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.load.targets import Upstream
from harness.supervisor import Supervisor


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = Upstream.start()
    yield up
    up.server.stop()


@pytest.fixture
def load_supervisor(request: pytest.FixtureRequest) -> Iterator[Supervisor]:
    with Supervisor(f"test-load-{os.getpid()}-{request.node.name[:40]}") as sup:
        yield sup


@pytest.fixture(scope="session")
def gateway_ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-ca")
