"""The `host` backend (no isolation, the negative control) against the backend contract, and the whole
pipeline on it: bench, the isolation scenario, the report. Real processes, real sockets, no QEMU."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import psutil
import pytest

from harness.bench import BenchConfig, run_bench
from harness.fleet import open_fleet
from harness.gateway.process import GatewayConfig
from harness.paths import cache_dir
from harness.sandbox import BackendOptions, Sandbox, SandboxSpec, backend_features, create_backend
from harness.sandbox.base import Features
from harness.sandbox.host import HostBackend
from harness.supervisor import Supervisor, pid_alive
from tests.conftest import IsolationComparison


@pytest.fixture(scope="module")
def backend() -> HostBackend:
    made = create_backend("host", BackendOptions(cache=cache_dir()))
    assert isinstance(made, HostBackend)
    return made


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    with Supervisor(f"test-host-{os.getpid()}-{secrets.token_hex(2)}") as sup:
        yield sup


def test_backend_declares_what_it_can_do(backend: HostBackend) -> None:
    assert backend_features("host") == backend.features
    assert {f.name for f in fields(Features)} <= set(vars(backend.features))
    assert not backend.features.own_kernel and not backend.features.weaken and backend.accel == "none"
    assert backend_features("qemu").own_kernel and backend_features("qemu").min_mem_mib == 96


def test_sandbox_keeps_the_contract_and_gets_nothing_of_the_hosts_environment(
    backend: HostBackend, supervisor: Supervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host_secret = f"sk-ant-host-{secrets.token_hex(12)}"
    monkeypatch.setenv("BR_TEST_HOST_API_KEY", host_secret)
    home = tmp_path / "careless-home"
    spec = SandboxSpec(
        id="h0", workdir=tmp_path / "h0", gateway_port=3999, user_home=home, user_env={"DEMO_TOKEN": "honey"}
    )
    sandbox = backend.boot(spec, supervisor)
    try:
        assert isinstance(sandbox, Sandbox)
        assert set(sandbox.boot.phases_ms) <= set(backend.phases) and sandbox.boot.boot_ms
        env = sandbox.exec("env").text
        assert host_secret not in env and "DEMO_TOKEN=honey" in env
        assert f"HOME={home}" in env and "HTTP_PROXY=http://127.0.0.1:3999" in env
        assert str(sandbox.network.egress) == "127.0.0.1:3999" and sandbox.network.host_alias == "127.0.0.1"
        # busybox applets come first, so probes run as they do in a guest
        assert sandbox.exec("readlink -f $(which nc)").text.strip().endswith("/busybox")
        listener = sandbox.pids()[0]
        assert host_secret.encode() not in Path(f"/proc/{listener}/environ").read_bytes()
        assert sandbox.guest_memory() is None and "agent" in sandbox.host_endpoints()
    finally:
        sandbox.stop()


def test_timeout_and_stop_leave_no_process(backend: HostBackend, supervisor: Supervisor, tmp_path: Path) -> None:
    sandbox = backend.boot(SandboxSpec(id="h1", workdir=tmp_path), supervisor)
    slow = sandbox.exec("sleep 30; echo late", timeout=1)
    assert slow.timed_out and slow.rc == 137 and b"late" not in slow.stdout
    # A command that leaves a daemon behind: the sandbox owns it all the same.
    assert (
        sandbox.exec("(setsid sleep 300 </dev/null >/dev/null 2>&1 &); echo started", timeout=5).text.strip()
        == "started"
    )
    daemon = [p for p in sandbox.pids() if _cmdline(p) == "sleep 300"]
    assert daemon, "the orphaned daemon must stay a descendant of the sandbox"
    pids = sandbox.pids()
    sandbox.stop()
    time.sleep(0.2)
    assert [p for p in pids if pid_alive(p)] == [] and sandbox.pids() == []


def test_gateway_ca_goes_into_the_sandbox_not_the_hosts_trust_store(
    backend: HostBackend, supervisor: Supervisor, tmp_path: Path
) -> None:
    system_bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    before = system_bundle.read_bytes() if system_bundle.exists() else b""
    config = GatewayConfig(policy="balanced", audit_path=tmp_path / "audit.jsonl", state_dir=tmp_path / "gw")
    with open_fleet(backend, supervisor, tmp_path, SandboxSpec(id="", workdir=tmp_path), config) as fleet:
        sandbox = fleet.boot("h2")
        assert sandbox.ca_bundle is not None and sandbox.ca_bundle.startswith(str(tmp_path))
        assert b"BEGIN CERTIFICATE" in Path(sandbox.ca_bundle).read_bytes()
        assert fleet.egress_listener("h2") == sandbox.network.egress
        # The listener has the guest-facing TLS profile of the backend's image.
        assert fleet.gateway is not None
        profile = backend.tls_profile
        assert fleet.gateway.stats()["sandboxes"]["h2"]["tls_profile"] == profile
    assert (system_bundle.read_bytes() if system_bundle.exists() else b"") == before


def test_bench_runs_end_to_end_on_the_host_backend(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = run_bench(BenchConfig(backend="host", sandboxes=2, warmup=0, out=out, proxy=None, guest_samples=2))
    data = json.loads((out / "results.json").read_text())
    assert data["partial"] is False and data["accel"] == "none"
    assert [s["ok"] for s in data["sandboxes"]] == [True, True]
    assert data["backend"]["phases"] == {"agent": data["backend"]["phases"]["agent"]}
    assert all(s["phases_ms"].keys() == {"agent"} and s["host_pss_bytes"] for s in data["sandboxes"])
    assert all(figures["ok"] == 2 for figures in data["guest_latency"]["sandboxes"].values())
    assert "proxy" not in data and run.data["leftover_vmm_pids"] == []
    report = (out / "report.html").read_text()
    assert "spawn of the agent listener" in report  # the backend's own phase meaning, not dropped


def test_isolation_on_the_host_backend_is_red_and_leaks_no_real_key(isolation_comparison: IsolationComparison) -> None:
    data = isolation_comparison.sub_run("host")
    verdicts = {
        (card["sandbox"], probe["id"]): probe["passed"]
        for card in data["scenario"]["data"]["scorecards"]
        for probe in card["probes"]
    }
    red = {probe for (_, probe), passed in verdicts.items() if passed is False}
    assert data["scenario"]["exit_code"] == 1 and data["partial"] is False
    assert {"processes", "kernel", "home", "host-loopback", "env", "peers"} <= red, verdicts
    assert data["scenario"]["data"]["evidence_clean"]["clean"]
    # The invoking user's key (a laptop's OPENAI_API_KEY) reaches no file of any backend's run.
    for path in isolation_comparison.out.rglob("*"):
        if path.is_file():
            assert isolation_comparison.planted_key not in path.read_text(errors="replace"), path


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""
