"""File descriptors: at a desktop's default soft limit (1024), idle tunnels of three sandboxes must not
leave a fourth without an answer. The test lowers the limit the gateway inherits itself (root's
here is 20000), floods three sandboxes with idle tunnels and times the fourth one's request."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.gateway.cli import READY_FILE
from harness.gateway.config import GatewayConfig
from harness.gateway.control import control_call
from harness.gateway.process import GatewayProcess, gateway_environment
from harness.standins.upstream import UpstreamServer

from .conftest import (
    SECRET_ENV,
    GatewayFactory,
    assert_dialled_loopback,
    connect_tunnel,
    credentials,
    http_get,
    parse_reply,
)

pytestmark = pytest.mark.timeout(180)

DESKTOP_SOFT_LIMIT = 1024
"""The common desktop default the issue measured at."""
TUNNELS_PER_SANDBOX = 256
"""The default per-sandbox connection cap: each flooding sandbox holds this many idle tunnels."""
SERVED_WITHIN_S = 3.0
READY_TIMEOUT_S = 15.0
REPO = Path(__file__).resolve().parents[2]


@contextmanager
def inherited_fd_limit(soft: int, hard: int | None = None) -> Iterator[None]:
    """Lower this process's descriptor limit while a gateway is spawned (it inherits it), then restore it."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1] if hard is None else hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def fd_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no descriptor limit in /proc")


def flood(port: int, count: int) -> tuple[list[socket.socket], int]:
    """Open `count` idle blind tunnels; returns the sockets and how many were established."""
    socks, established = [], 0
    for _ in range(count):
        try:
            sock, answer = connect_tunnel(port, "pypi.org:80")
        except OSError:
            continue
        socks.append(sock)
        established += answer.startswith(b"HTTP/1.1 200")
    return socks, established


def served_beside_floods(gw: GatewayProcess | Capped) -> list[int]:
    """Flood three sandboxes, then time a request from a fourth; returns the tunnels each flood got."""
    ports = [gw.add_sandbox(f"sb-flood-{i}") for i in range(3)]
    quiet = gw.add_sandbox("sb-quiet")
    held: list[socket.socket] = []
    try:
        counts = []
        for port in ports:
            socks, established = flood(port, TUNNELS_PER_SANDBOX)
            held += socks
            counts.append(established)
        t0 = time.monotonic()
        reply = http_get(quiet, "http://pypi.org/quiet")
        elapsed = time.monotonic() - t0
        assert reply.status == 200, reply
        assert elapsed < SERVED_WITHIN_S
        sock, answer = connect_tunnel(quiet, "pypi.org:80")
        sock.close()
        assert parse_reply(answer).status == 200
    finally:
        for sock in held:
            sock.close()
    assert gw.running and gw.stats().get("errors", 0) == 0
    return counts


def test_the_soft_limit_is_raised_to_the_hard_one(make_gateway: GatewayFactory) -> None:
    with inherited_fd_limit(DESKTOP_SOFT_LIMIT):
        gw = make_gateway()
    soft, hard = fd_limits(gw.pid)
    assert soft == hard > DESKTOP_SOFT_LIMIT
    assert gw.stats()["fd_limit"] == soft
    counts = served_beside_floods(gw)
    assert counts == [TUNNELS_PER_SANDBOX] * 3  # every tunnel fits once the limit is raised
    assert_dialled_loopback(gw)


@pytest.fixture
def capped_gateway(tmp_path: Path, ca_dir: Path, test_policy_file: Path, upstream: UpstreamServer) -> Iterator[Capped]:
    """A gateway daemon whose hard limit is the desktop default, so it cannot raise past it. The limit
    is lowered in the child only (preexec_fn): this process may not be able to raise its own back."""
    state = tmp_path / "state"
    state.mkdir()
    config = GatewayConfig(
        policy=test_policy_file,
        state_dir=state,
        audit_path=state / "audit.jsonl",
        ca_dir=ca_dir,
        credentials=credentials(),
        upstream_overrides=upstream.overrides(),
        upstream_ca_file=upstream.ca_file,
        extra_env=dict(SECRET_ENV),
    )
    (state / "config.json").write_text(config.to_json())

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (DESKTOP_SOFT_LIMIT, DESKTOP_SOFT_LIMIT))

    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.gateway", "--config", str(state / "config.json")],
        cwd=REPO,
        env=gateway_environment(config),
        preexec_fn=cap,  # setrlimit alone, between fork and exec
        start_new_session=True,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (state / READY_FILE).exists():
            assert proc.poll() is None and time.monotonic() < deadline, "capped gateway did not start"
            time.sleep(0.05)
        control = Path(json.loads((state / READY_FILE).read_text())["control"])
        yield Capped(proc.pid, control, config)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


@dataclass
class Capped:
    """A gateway daemon started by hand, driven through its control socket."""

    pid: int
    control: Path
    config: GatewayConfig

    def add_sandbox(self, sandbox: str) -> int:
        return int(control_call(self.control, "add_sandbox", sandbox=sandbox)["port"])

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = control_call(self.control, "stats")["stats"]
        return stats

    def audit_records(self) -> list[dict[str, Any]]:
        assert self.config.audit_path is not None
        return [json.loads(line) for line in self.config.audit_path.read_text().splitlines() if line]

    @property
    def running(self) -> bool:
        return Path(f"/proc/{self.pid}").exists()


def test_a_sandbox_is_served_when_the_hard_limit_is_the_desktop_default(capped_gateway: Capped) -> None:
    """The gateway cannot raise past a hard limit of 1024: the budget keeps each sandbox's share."""
    gw = capped_gateway
    assert fd_limits(gw.pid) == (DESKTOP_SOFT_LIMIT, DESKTOP_SOFT_LIMIT)
    counts = served_beside_floods(gw)
    stats = gw.stats()
    guaranteed_tunnels = stats["fd_guarantee_per_sandbox"] // 2
    assert counts[0] == TUNNELS_PER_SANDBOX  # the first flood borrows what the pool has
    assert all(c >= guaranteed_tunnels for c in counts)  # no flood starves a later one
    assert sum(counts) * 2 <= stats["fd_budget"]
    refused = [r for r in gw.audit_records() if r.get("status") == 503]
    assert refused  # the floods past their share were told so (503), not left hanging
    for record in gw.audit_records():
        if record.get("upstream_addr"):
            assert str(record["upstream_addr"]).startswith("127.0.0.1:")
