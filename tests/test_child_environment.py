"""The host's keys never reach a child that does not need them: every process the harness starts
during a real bench (sandboxes, Locust, peer proxies, relays) is scanned for a planted key, by
reading its /proc/<pid>/environ while it runs. Only the gateway holds keys."""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

import psutil
import pytest

from harness.bench import BenchConfig, run_bench
from harness.load.bench import ProxyBenchConfig
from harness.supervisor import CHILD_ENV_ALLOWED, Supervisor, child_environment

SCAN_INTERVAL_S = 0.1


class EnvironScanner(threading.Thread):
    """Reads the environment of every descendant of this process until stopped."""

    def __init__(self, needle: bytes) -> None:
        super().__init__(daemon=True)
        self.needle = needle
        self.seen: dict[int, str] = {}
        """Every descendant looked at: pid -> its command line."""
        self.holders: dict[int, str] = {}
        """Descendants whose environment held the needle."""
        self._done = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self._done.wait(SCAN_INTERVAL_S):
            for child in me.children(recursive=True):
                try:
                    cmdline = " ".join(child.cmdline())
                    environ = Path(f"/proc/{child.pid}/environ").read_bytes()
                except (OSError, psutil.Error):
                    continue
                self.seen[child.pid] = cmdline
                if self.needle in environ:
                    self.holders[child.pid] = cmdline

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)


def test_child_environment_is_an_allowlist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-not-for-children")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = child_environment({"KUBECONFIG": "/tmp/kc"})
    assert "ANTHROPIC_API_KEY" not in env and env["PATH"] == "/usr/bin:/bin" and env["KUBECONFIG"] == "/tmp/kc"
    assert set(env) <= {*CHILD_ENV_ALLOWED, "KUBECONFIG"}


def test_a_supervised_child_inherits_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-proj-planted-for-this-test")
    with Supervisor(f"test-env-{os.getpid()}") as supervisor:
        proc = supervisor.spawn(["sleep", "5"], name="sleeper")
        assert b"sk-proj-planted" not in Path(f"/proc/{proc.pid}/environ").read_bytes()


@pytest.mark.slow
def test_no_child_of_a_real_bench_but_the_gateway_holds_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = f"sk-ant-api03-{secrets.token_hex(20)}"
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    proxy = ProxyBenchConfig(
        targets=["direct", "gateway", "squid", "tinyproxy"],
        users=2,
        spawn_rate=20,
        duration_s=1.5,
        rounds=1,
        warmup_s=0.5,
        capacity_s=0.2,
        capacity_levels=[2],
        capacity_rounds=1,
        download_bytes=4096,
    )
    scanner = EnvironScanner(key.encode())
    scanner.start()
    try:
        run_bench(BenchConfig(backend="host", sandboxes=2, warmup=0, out=tmp_path / "run", proxy=proxy))
    finally:
        scanner.stop()
    kinds = " ".join(scanner.seen.values())
    assert "locust" in kinds and "squid" in kinds and "tinyproxy" in kinds and "socat" in kinds, kinds
    assert "nginx" in kinds and "hey" in kinds, kinds
    outsiders = {pid: cmd for pid, cmd in scanner.holders.items() if "harness.gateway" not in cmd}
    assert outsiders == {}, outsiders
