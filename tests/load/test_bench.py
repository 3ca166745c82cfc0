"""run_proxy_bench end to end (real Locust, real gateway, real squid): the results schema, the
report section, the saturation flag, and cleanup with partial results on interrupt."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness.load.bench import ProxyBenchConfig, load_partial, run_proxy_bench
from harness.load.cpu import CpuSampler, generator_saturated, host_saturated
from harness.report.sections import proxy as proxy_section
from harness.supervisor import Supervisor

SHORT = dict(
    users=4,
    spawn_rate=20,
    duration_s=2,
    warmup_s=1,
    user_rps=10,
    saturation_s=1.5,
    saturation_users=4,
    saturation_warmup_s=0.5,
    download_bytes=8192,
    seed=7,
)
LATENCY_KEYS = ("p50", "p90", "p95", "p99", "p99.9", "max")


@pytest.mark.slow
def test_schema_and_report(tmp_path: Path, load_supervisor: Supervisor, gateway_ca_dir: Path) -> None:
    cfg = ProxyBenchConfig(targets=["direct", "gateway", "squid"], gateway_ca_dir=gateway_ca_dir, **SHORT)
    data = run_proxy_bench(cfg, tmp_path, load_supervisor)
    assert load_supervisor.live() == []
    assert data["partial"] is False and sorted(data["conditions"]["order"]) == ["direct", "gateway", "squid"]
    for key in ("users", "duration_s", "workers", "cores", "seed", "traffic"):
        assert key in data["conditions"]
    for name in ("direct", "gateway", "squid"):
        t = data["targets"][name]
        assert t["status"] == "ok", t
        assert set(LATENCY_KEYS) <= set(t["latency_ms"]) and all(t["latency_ms"][k] > 0 for k in LATENCY_KEYS)
        assert t["requests"] > 0 and t["rps"] > 0 and t["failures"] == {}
        assert set(t["added_latency_ms"]) >= {"p50", "p99"}
        assert {"generator", "proxy", "host"} <= set(t["cpu"]) and isinstance(t["generator_saturated"], bool)
        assert t["saturation"]["rps"] > 0 and t["saturation"]["users"] == 4
        assert t["timeline"] and t["history"]
        assert (tmp_path / "proxy" / name / "paced" / "locust_stats_history.csv").exists()
    assert data["targets"]["direct"]["added_latency_ms"]["p50"] == 0.0
    assert "blocked" not in data["targets"]["direct"]["traffic"]  # nothing on the direct path blocks
    assert data["targets"]["squid"]["traffic"]["blocked"]["ok"] > 0
    assert data["targets"]["gateway"]["cpu"]["proxy"]["processes"] == 1
    names = [c["name"] for c in data["checks"]]
    assert "gateway added p50 vs squid (CONNECT)" in names and "gateway added p99 vs squid (plain http)" in names
    assert all(c["status"] in ("pass", "fail") for c in data["checks"] if "squid" in c["name"])
    assert json.loads((tmp_path / "proxy" / "proxy.json").read_text())["targets"].keys() == data["targets"].keys()

    section = proxy_section.section({"proxy": data}, tmp_path)
    assert section is not None
    assert len(section.charts) == 4  # percentiles, over time, rps vs users, added vs direct
    _caption, header, rows = section.tables[0]
    assert "generator CPU %" in header and "cores" in header
    assert {row[0] for row in rows} == {"direct", "gateway", "squid"}
    assert any("squid" in n and "CONNECT" in n for n in section.notes)


def _interrupt_at_second_target(calls: list[str]) -> Any:
    class Events:
        def stage(self, text: str) -> None:
            calls.append(text)
            if len(calls) == 2:
                raise KeyboardInterrupt

    return Events()


@pytest.mark.slow
def test_interrupt_stops_everything_and_keeps_what_was_measured(
    tmp_path: Path, load_supervisor: Supervisor, gateway_ca_dir: Path
) -> None:
    calls: list[str] = []
    cfg = ProxyBenchConfig(targets=["gateway", "squid"], gateway_ca_dir=gateway_ca_dir, **{**SHORT, "saturation_s": 0})
    with pytest.raises(KeyboardInterrupt):
        run_proxy_bench(cfg, tmp_path, load_supervisor, _interrupt_at_second_target(calls))
    assert load_supervisor.live() == []
    saved = load_partial(tmp_path)
    assert saved is not None and saved["partial"] is True and saved["interrupted_by"] == "KeyboardInterrupt"
    first = saved["conditions"]["order"][0]
    assert list(saved["targets"]) == [first] and saved["targets"][first]["requests"] > 0


def test_saturation_flags() -> None:
    busy = {"generator": {"per_process_mean_pct": {"1": 40.0, "2": 97.5}}}
    idle = {"generator": {"per_process_mean_pct": {"1": 40.0, "2": 60.0}}}
    assert generator_saturated(busy) and not generator_saturated(idle) and not generator_saturated({})
    assert host_saturated({"host": {"mean_pct": 10_000.0}}) and not host_saturated({"host": {"mean_pct": 1.0}})


def test_cpu_sampler_sees_a_busy_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        sampler = CpuSampler(groups={"generator": [child.pid]}, interval_s=0.2).start()
        time.sleep(1.5)
        sampler.stop()
    finally:
        child.kill()
        child.wait()
    figures = sampler.summary(0, float("inf"), per_root_of="generator")
    # A spinning process uses a core unless other tenants of the host take it: well above idle.
    assert figures["generator"]["mean_pct"] > 20.0
    assert figures["generator"]["per_process_mean_pct"][str(child.pid)] > 20.0
    assert figures["host"]["mean_pct"] >= figures["generator"]["mean_pct"] * 0.5
