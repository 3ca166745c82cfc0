"""The Locust glue: real short Locust runs (master + worker processes) through the real gateway."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import psutil
import pytest

from harness.load.analyse import read_samples
from harness.load.plan import LoadPlan
from harness.load.runner import PhaseSpec, run_phase
from harness.load.targets import GATEWAY, Upstream, start_target
from harness.supervisor import Supervisor

pytestmark = pytest.mark.slow


def _locust_counts(phase_dir: Path) -> dict[str, tuple[int, int]]:
    with open(phase_dir / "locust_stats.csv", newline="") as fh:
        return {row["Name"]: (int(row["Request Count"]), int(row["Failure Count"])) for row in csv.DictReader(fh)}


def test_locust_through_gateway_counts_requests_and_failures(
    upstream: Upstream, load_supervisor: Supervisor, tmp_path: Path, gateway_ca_dir: Path
) -> None:
    endpoint = start_target(
        GATEWAY,
        tmp_path / "gw",
        load_supervisor,
        upstream,
        ("model", "download", "blocked"),
        download_bytes=4096,
        stream_bytes=0,
        gateway_ca_dir=gateway_ca_dir,
    )
    try:
        ca = tmp_path / "ca.pem"
        ca.write_bytes(b"\n".join(endpoint.ca_pems))
        urls = dict(endpoint.urls)
        # nginx answers 404 here: every download must be counted as a failure of that kind.
        urls["download"] = urls["download"].rsplit("/bytes/", 1)[0] + "/missing"
        plan = LoadPlan(
            target="gateway", proxy=endpoint.proxy, urls=urls, ca_file=str(ca), samples_dir="", user_rps=20.0
        )
        spec = PhaseSpec(
            "paced",
            users=6,
            spawn_rate=20,
            warmup_s=1,
            duration_s=3,
            traffic=("model", "download", "blocked"),
            workers=1,
        )
        phase = run_phase(plan, spec, tmp_path / "phase", load_supervisor, endpoint.pids)
        gateway_pid = endpoint.pids[0]
    finally:
        endpoint.stop()

    assert phase["exit_code"] == 0
    traffic = phase["traffic"]
    assert traffic["model"]["ok"] > 10 and traffic["model"]["failures"] == {}
    assert traffic["blocked"]["ok"] > 0 and traffic["blocked"]["failures"] == {}  # the 403 is the answer
    assert traffic["download"]["ok"] == 0
    assert traffic["download"]["failures"] == {"http_404": traffic["download"]["requests"]} != {}
    assert phase["failures"]["http_404"] == traffic["download"]["requests"]
    assert phase["latency_ms"]["p50"] is not None and phase["latency_ms"]["p50"] <= phase["latency_ms"]["p99"]
    assert phase["rps"] > 0

    # Locust's own CSV saw exactly the requests our samples did (whole run, warm-up included).
    samples = read_samples(tmp_path / "phase" / "samples")
    locust = _locust_counts(tmp_path / "phase")
    for kind in ("model", "download", "blocked"):
        mine = [s for s in samples if s.name == kind]
        assert locust[kind] == (len(mine), sum(1 for s in mine if s.failure))
    # The gateway really carried them: its audit log has the denied and the forwarded requests.
    audit = [json.loads(line) for line in (tmp_path / "gw" / "audit.jsonl").read_text().splitlines()]
    assert any(r["host"] == "blocked.test" and r["decision"] == "deny" and r["status"] == 403 for r in audit)
    assert any(r["event"] == "connect" and r["decision"] == "allow" for r in audit)

    # CPU was sampled for the generator and the gateway; every process is gone afterwards.
    assert phase["cpu"]["generator"]["processes"] == 1 and phase["cpu"]["proxy"]["processes"] == 1
    assert phase["cpu"]["proxy"]["mean_pct"] is not None
    assert isinstance(phase["generator_saturated"], bool)
    assert not psutil.pid_exists(gateway_pid) or psutil.Process(gateway_pid).status() == psutil.STATUS_ZOMBIE
    assert load_supervisor.live() == []
    history = phase["history"]
    assert history and max(row[1] for row in history) == 6  # Locust's stats history saw all users


def test_standalone_locust_process_when_no_workers(
    upstream: Upstream, load_supervisor: Supervisor, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(upstream.ca_file.read_bytes())
    plan = LoadPlan(
        target="direct",
        proxy=None,
        urls={"model": upstream.url("model", 0, 0)},
        ca_file=str(ca),
        samples_dir="",
        user_rps=0.0,
    )
    phase = run_phase(
        plan, PhaseSpec("saturation", 2, 10, 0.5, 2, ("model",), workers=0), tmp_path, load_supervisor, []
    )
    assert phase["requests"] > 50 and phase["failures"] == {}
    assert "generator-master" not in phase["cpu"] and phase["cpu"]["generator"]["processes"] == 1
    assert load_supervisor.live() == []
