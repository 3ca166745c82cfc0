"""run_proxy_bench end to end (real nginx, real Locust, real hey, real gateway and squid): the results schema,
the same load for every target, intervals on every check, the report section, and cleanup with partial
results on interrupt."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness.load.bench import ProxyBenchConfig, load_partial, run_proxy_bench
from harness.load.checks import FAIL, NOISE, PASS, SKIPPED
from harness.load.cpu import CpuSampler, generator_saturated, host_saturated
from harness.report.sections import proxy as proxy_section
from harness.supervisor import Supervisor

SHORT = dict(
    users=6,
    spawn_rate=30,
    duration_s=1.2,
    settle_s=0.2,
    rounds=3,
    warmup_s=0,
    user_rps=10,
    capacity_s=0.25,
    capacity_levels=[8],
    capacity_rounds=3,
    download_bytes=8192,
    seed=7,
)
KINDS = ("model", "page", "download", "blocked")
VERDICTS = {PASS, FAIL, NOISE, SKIPPED}


def _no_negative_number(text: str) -> bool:
    """A figure that starts with a minus sign (an interval's bounds in brackets may be negative)."""
    return re.match(r"^\s*-\d", text) is None


@pytest.mark.slow
def test_schema_same_load_intervals_and_report(
    tmp_path: Path, load_supervisor: Supervisor, gateway_ca_dir: Path
) -> None:
    names = ["direct", "gateway", "squid"]
    cfg = ProxyBenchConfig(targets=names, gateway_ca_dir=gateway_ca_dir, **SHORT)
    data = run_proxy_bench(cfg, tmp_path, load_supervisor)
    assert load_supervisor.live() == []
    assert data["partial"] is False and sorted(data["conditions"]["order"]) == names
    orders = data["conditions"]["round_orders"]
    assert len(orders) == 3 and all(sorted(o) == names for o in orders)
    for key in ("users", "duration_s", "rounds", "workers", "cores", "seed", "bootstrap", "capacity_levels"):
        assert key in data["conditions"]
    targets = data["targets"]
    for name in names:
        t = targets[name]
        assert t["status"] == "ok", t
        assert set(t["traffic"]) == set(KINDS)  # direct too: blocked goes to nginx's deny listener
        for kind in KINDS:
            fig = t["traffic"][kind]
            assert fig["ok"] > 0 and fig["failures"] == {}, (name, kind, fig)
            assert [r["round"] for r in fig["rounds"]] == [0, 1, 2]
        cell = t["capacity"]["connect-1k"]["8"]
        assert cell["rps"] > 0 and cell["p50_ms"] <= cell["p99_ms"] and len(cell["rounds"]) == 3
        assert cell["generator_cpu"] > 0 and cell["limit"] in (
            "proxy",
            "upstream",
            "generator",
            "host",
            "other load",
            "none",
        )
        assert (cell["proxy_cpu"] is None) == (name == "direct")
    # The same offered load for every target: per kind, as many requests as direct's, within pacing jitter.
    for kind in KINDS:
        base = targets["direct"]["traffic"][kind]["requests"]
        for name in names:
            assert 0.75 <= targets[name]["traffic"][kind]["requests"] / base <= 1.33, (name, kind)
    added = targets["gateway"]["traffic"]["page"]["added_latency_ms"]["p50"]
    assert added["rounds"] == 3 and len(added["ci"]) == 2 and added["ci"][0] <= added["ci"][1]
    assert added["verdict"] in ("added", "within noise", "below direct")
    assert targets["direct"]["traffic"]["page"]["added_latency_ms"] is None
    assert targets["squid"]["traffic"]["blocked"]["ok"] > 0
    for check in data["checks"]:
        assert check["verdict"] in VERDICTS and check["compared"] and check["limit"]
        if "mitmproxy" in check["name"] or "gateway-intercept" in check["name"]:
            assert check["verdict"] == SKIPPED and check["reason"]
        else:
            assert check["ci"] is not None and len(check["ci"]) == 2, check
    assert json.loads((tmp_path / "proxy" / "proxy.json").read_text())["targets"].keys() == targets.keys()

    sections = proxy_section.section({"proxy": data}, tmp_path)
    assert sections is not None and len(sections) == 3  # checks, latency, capacity
    head = sections[0]
    _caption, header, rows = head.tables[0]
    assert header == ["check", "what it compared", "limit", "measured (95 % interval)", "verdict"]
    assert len(rows) == len(data["checks"]) and all("{" not in str(cell) for row in rows for cell in row)
    _caption, header, rows = sections[1].tables[0]
    assert all(_no_negative_number(str(cell)) for row in rows for cell in row[1:])
    assert len(sections[1].charts) == 1 and len(sections[2].charts) == 1
    assert any("Conditions" in note and "seed 7" in note for note in head.notes)


def _interrupt_at(prefix: str) -> Any:
    class Events:
        def stage(self, text: str) -> None:
            if text.startswith(prefix):
                raise KeyboardInterrupt

    return Events()


@pytest.mark.slow
def test_interrupt_in_capacity_keeps_paced_figures_and_stops_everything(
    tmp_path: Path, load_supervisor: Supervisor, gateway_ca_dir: Path
) -> None:
    cfg = ProxyBenchConfig(
        targets=["direct", "gateway"], gateway_ca_dir=gateway_ca_dir, **{**SHORT, "rounds": 1, "duration_s": 1.0}
    )
    with pytest.raises(KeyboardInterrupt):
        run_proxy_bench(cfg, tmp_path, load_supervisor, _interrupt_at("capacity"))
    assert load_supervisor.live() == []
    saved = load_partial(tmp_path)
    assert saved is not None and saved["partial"] is True and saved["interrupted_by"] == "KeyboardInterrupt"
    assert saved["targets"]["gateway"]["traffic"]["model"]["ok"] > 0
    assert all(c["verdict"] in VERDICTS for c in saved["checks"])
    conf = (tmp_path / "proxy" / "nginx" / "nginx.conf").read_text()
    live = re.search(r"pid (\S+)/nginx.pid;", conf)
    assert live is not None and not Path(live.group(1)).exists()  # nginx's scratch dir (key, TLS key) is gone
    assert "<redacted>" in conf


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
