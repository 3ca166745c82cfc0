"""proxy-chaos end to end: a short timeline under a real Locust load through the real gateway;
the journal's shape, the fault windows, their effect, and that every toxic is gone at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.scenario.runner import run_scenario

LATENCY_MS = 300
TIMELINE = {
    "title": "test: latency then 503s",
    "load": {"users": 4, "user_rps": 5},
    "steady_state": {
        "window_s": 2,
        "probes": [
            {"name": "p95", "metric": "p95_ms", "below": 200},
            {"name": "errors", "metric": "error_rate_pct", "below": 1},
        ],
    },
    "faults": [
        {
            "name": "slow",
            "at_s": 1,
            "for_s": 3,
            "toxic": {"type": "latency", "upstream": "api.anthropic.com", "attributes": {"latency": LATENCY_MS}},
        },
        {
            "name": "flaky",
            "at_s": 5,
            "for_s": 2,
            "toxic": {"type": "http_status", "upstream": "api.anthropic.com", "attributes": {"status": 503}},
        },
    ],
    "recovery_s": 1,
}


def in_window(rows: list[list[Any]], start: float, end: float) -> list[list[Any]]:
    # Whole bins inside the window only: the edges mix fault and no-fault requests.
    return [r for r in rows if start <= r[0] and r[0] + 1 <= end]


@pytest.mark.timeout(180)
def test_chaos_timeline_journal_and_fault_windows(tmp_path: Path) -> None:
    timeline = tmp_path / "timeline.yaml"
    timeline.write_text(yaml.safe_dump(TIMELINE))
    code, run_dir = run_scenario("proxy-chaos", {"file": str(timeline)}, tmp_path / "run")
    results = json.loads((run_dir / "results.json").read_text())
    journal = results["scenario"]["journal"]
    # The journal's shape, Chaos Toolkit style.
    assert journal["status"] == "completed" and journal["deviated"] is False and code == 0
    for when in ("before", "after"):
        state = journal["steady_states"][when]
        assert state["met"] and {p["name"] for p in state["probes"]} == {"p95", "errors"}
        assert all({"value", "tolerance", "met"} <= set(p) for p in state["probes"])
    names = [a["name"] for a in journal["run"]]
    assert "fault:slow" in names and "fault:flaky" in names and "probe:steady-state-before" in names
    for activity in journal["run"] + journal["rollbacks"]:
        assert activity["status"] == "succeeded" and activity["start"] and activity["end"]
    [clear] = [a for a in journal["rollbacks"] if a["name"] == "clear-toxics"]
    assert clear["output"]["removed"] == []  # the timeline switched both off itself
    chaos = results["scenario"]["data"]["chaos"]
    windows = {f["name"]: f for f in chaos["faults"]}
    assert set(windows) == {"slow", "flaky"} and chaos["toxics_applied"]["slow"] >= 1
    # The faults show in the gateway's own series: slow answers, then errors, and not outside.
    slow = in_window(chaos["gateway_series"], windows["slow"]["on_s"], windows["slow"]["off_s"])
    assert slow and all(r[3] is not None and r[3] >= LATENCY_MS for r in slow)
    flaky = in_window(chaos["client_series"], windows["flaky"]["on_s"], windows["flaky"]["off_s"])
    assert flaky and all(r[4] == 100.0 for r in flaky)
    assert chaos["client_failures"].get("http_503", 0) > 0
    assert "Proxy chaos" in (run_dir / "report.html").read_text()


def test_bad_timeline_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"faults": [{"name": "x", "at_s": 0, "for_s": 1, "toxic": {"type": "nope"}}]}))
    with pytest.raises(ValueError):
        run_scenario("proxy-chaos", {"file": str(bad)}, tmp_path / "run")
