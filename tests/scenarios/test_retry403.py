"""retry-403 end to end: a real gateway, the real stand-in model API, real clients; counts read
back from the audit log. The host-only run is fast; the guest run boots one TCG sandbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.scenario import run_scenario

THRESHOLD = 3
SCALE = 3


def run(tmp_path: Path, **options: Any) -> tuple[int, dict[str, Any]]:
    code, run_dir = run_scenario("retry-403", {"threshold": THRESHOLD, "scale": SCALE, **options}, tmp_path / "run")
    assert (run_dir / "report.html").exists()
    return code, json.loads((run_dir / "results.json").read_text())


def cell(cells: list[dict[str, Any]], where: str, client: str, mode: str, breaker: bool) -> dict[str, Any]:
    [found] = [c for c in cells if (c["where"], c["client"], c["deny_mode"], c["breaker"]) == (where, client, mode,
                                                                                                  breaker)]
    return found


def check_matrix(data: dict[str, Any], where: str, instances: int) -> None:
    cells = data["cells"]
    assert len([c for c in cells if c["where"] == where]) == 4 * 3 * 2  # clients x modes x breaker
    for mode in ("403", "403-explained", "reset"):
        naive_off = cell(cells, where, "naive", mode, False)
        naive_on = cell(cells, where, "naive", mode, True)
        # The gateway saw every attempt: the audit count equals what the clients say they sent.
        assert naive_off["blocked_requests"] == naive_off["client_attempts"] == naive_off["cap"] * instances
        assert naive_off["loop_trips"] == 0
        # The breaker's threshold: exactly THRESHOLD plain denies per client, then 429s, one trip each.
        assert naive_on["loop_trips"] == instances
        assert naive_on["answers"]["429"] == (naive_on["cap"] - THRESHOLD) * instances
        # llm-loop pays one model call per failed attempt, and every one of them was let through.
        llm = cell(cells, where, "llm-loop", mode, False)
        assert llm["model_calls"] == llm["blocked_requests"] and llm["model_ok"] == llm["model_calls"]
    # A client that reads the answer stops at once on an explained deny, and at threshold+1 with
    # the breaker under reset (the 429 is the first thing it can read).
    assert cell(cells, where, "reads-body", "403-explained", False)["blocked_per_client"] == 1
    assert cell(cells, where, "reads-body", "reset", False)["gave_up"] == {"cap": instances}
    assert cell(cells, where, "reads-body", "reset", True)["blocked_per_client"] == THRESHOLD + 1
    assert cell(cells, where, "llm-loop", "403", True)["blocked_per_client"] == THRESHOLD + 1


def check_journal(results: dict[str, Any]) -> None:
    journal = results["scenario"]["journal"]
    assert journal["status"] == "completed" and journal["deviated"] is False
    assert journal["steady_states"]["before"]["met"] and journal["steady_states"]["after"]["met"]
    for activity in journal["run"] + journal["rollbacks"]:
        assert {"name", "type", "start", "end", "status", "output", "duration_s"} <= set(activity)
        assert activity["status"] == "succeeded" and activity["end"] is not None


@pytest.mark.timeout(180)
def test_retry403_host_clients(tmp_path: Path) -> None:
    code, results = run(tmp_path, sandboxes=0)
    assert code == 0
    data = results["scenario"]["data"]["retry403"]
    check_matrix(data, "host", SCALE)
    check_journal(results)
    assert data["checks"] == []
    assert data["collateral"]["reset"]["allowed_ok"] == 1 and data["collateral"]["403"]["allowed_ok"] == 2
    assert data["recommendation"].startswith("Use deny mode 403-explained")


@pytest.mark.qemu
@pytest.mark.timeout(420)
def test_retry403_in_guest(tmp_path: Path) -> None:
    code, results = run(tmp_path, sandboxes=1, accel="tcg")
    assert code == 0
    check_matrix(results["scenario"]["data"]["retry403"], "guest", 1)
    check_journal(results)
