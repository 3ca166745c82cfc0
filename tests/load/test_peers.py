"""Peer proxies: our own squid and tinyproxy start on loopback, carry traffic, deny the blocked host,
and stop; a missing peer is reported skipped with its install command."""

from __future__ import annotations

import socket
from pathlib import Path

import psutil
import pytest

from harness.load import peers
from harness.load.bench import ProxyBenchConfig, run_proxy_bench
from harness.load.client import ProxyClient
from harness.load.targets import Upstream
from harness.supervisor import Supervisor


def _port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


@pytest.mark.parametrize("name", ["squid", "tinyproxy"])
def test_peer_starts_carries_denies_and_stops(
    name: str, upstream: Upstream, load_supervisor: Supervisor, tmp_path: Path
) -> None:
    if peers.binary(name) is None:
        pytest.fail(f"{name} must be installed for this test: {peers.INSTALL[name]}")
    peer = peers.start_peer(name, tmp_path / name, load_supervisor)
    try:
        assert peer.address[0] == "127.0.0.1"
        assert [r.pid for r in load_supervisor.live()] == [peer.pid]
        # Its own config, pid file and logs, all in the run dir.
        assert (tmp_path / name / f"{name}.conf").exists()
        client = ProxyClient(peer.address, str(upstream.ca_file))
        assert client.request("POST", upstream.url("model", 0, 0), b"{}").status == 200
        download = client.request("GET", upstream.url("download", 5000, 0))
        assert (download.status, download.length) == (200, 5000)
        assert client.request("GET", f"http://{peers.BLOCKED_HOST}/").status == 403
        client.close()
    finally:
        peer.stop()
    assert load_supervisor.live() == []
    assert _port_closed(peer.port)
    assert not psutil.pid_exists(peer.pid) or psutil.Process(peer.pid).status() == psutil.STATUS_ZOMBIE


def test_missing_peer_is_skipped_with_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, load_supervisor: Supervisor
) -> None:
    monkeypatch.setenv(peers.MITMDUMP_ENV, str(tmp_path / "no-such-mitmdump"))
    assert peers.binary("mitmproxy") is None
    result = run_proxy_bench(
        ProxyBenchConfig(targets=["mitmproxy"], duration_s=1, warmup_s=0, seed=3), tmp_path, load_supervisor
    )
    target = result["targets"]["mitmproxy"]
    assert target["status"] == "skipped"
    assert target["install"] == peers.INSTALL["mitmproxy"] and "pip install" in target["install"]
    assert "not installed" in target["reason"]
    assert result["peers"]["mitmproxy"]["installed"] is False
    check = next(c for c in result["checks"] if c["name"].startswith("gateway-intercept capacity vs mitmproxy"))
    assert check["verdict"] == "skipped" and "mitmproxy" in check["reason"]
    assert (tmp_path / "proxy" / "proxy.json").exists()
    assert load_supervisor.live() == []
