"""retry-403 end to end: a real gateway, the real stand-in model API, real clients; counts read
back from the audit log. The host-only run is fast; the guest run boots one TCG sandbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.scenario.runner import run_scenario

THRESHOLD = 3
SCALE = 3


def run(tmp_path: Path, **options: Any) -> tuple[int, dict[str, Any]]:
    code, run_dir = run_scenario("retry-403", {"threshold": THRESHOLD, "scale": SCALE, **options}, tmp_path / "run")
    assert (run_dir / "report.html").exists()
    return code, json.loads((run_dir / "results.json").read_text())


OFF, B429, TERMINAL = "off", "429", "200-terminal"


def cell(cells: list[dict[str, Any]], where: str, client: str, mode: str, breaker: str) -> dict[str, Any]:
    [found] = [
        c for c in cells if (c["where"], c["client"], c["deny_mode"], c["breaker"]) == (where, client, mode, breaker)
    ]
    return found


def check_matrix(data: dict[str, Any], where: str, instances: int) -> None:
    cells = data["cells"]
    assert data["breakers"] == [OFF, B429, TERMINAL]
    assert len([c for c in cells if c["where"] == where]) == 4 * 3 * 3  # clients x modes x breaker settings
    for mode in ("403", "403-explained", "reset"):
        naive_off = cell(cells, where, "naive", mode, OFF)
        naive_429 = cell(cells, where, "naive", mode, B429)
        naive_200 = cell(cells, where, "naive", mode, TERMINAL)
        # The gateway saw every attempt: the audit count equals what the clients say they sent.
        assert naive_off["blocked_requests"] == naive_off["client_attempts"] == naive_off["cap"] * instances
        assert naive_off["loop_trips"] == 0
        # The breaker's threshold: exactly THRESHOLD plain denies per client, then 429s, one trip each --
        # and 429 does not end the naive loop: it runs to its cap.
        assert naive_429["loop_trips"] == instances
        assert naive_429["answers"]["429"] == (naive_429["cap"] - THRESHOLD) * instances
        assert naive_429["gave_up"] == {"cap": instances} and not naive_429["stopped_before_cap"]
        assert naive_429["ended_by_breaker"] == 0
        # 200-terminal ends it: THRESHOLD denies, one 200 carrying the explanation, and the client stops.
        assert naive_200["loop_trips"] == instances
        assert naive_200["blocked_per_client"] == THRESHOLD + 1
        assert naive_200["answers"]["200"] == instances
        assert naive_200["gave_up"] == {"ok": instances} and naive_200["stopped_before_cap"]
        assert naive_200["ended_by_breaker"] == instances
        # backoff stops on a 2xx too; 429 only slows it to its cap.
        assert cell(cells, where, "backoff", mode, TERMINAL)["blocked_per_client"] == THRESHOLD + 1
        assert cell(cells, where, "backoff", mode, B429)["gave_up"] == {"cap": instances}
        # llm-loop pays one model call per failed attempt, and every one of them was let through.
        llm = cell(cells, where, "llm-loop", mode, OFF)
        assert llm["model_calls"] == llm["blocked_requests"] and llm["model_ok"] == llm["model_calls"]
    # The self-check rows: 200-terminal ended every naive loop, 429 and off none.
    ends = {(r["deny_mode"], r["breaker"]): r["ended"] for r in data["breaker_ends_naive"] if r["where"] == where}
    assert ends == {(m, b): b == TERMINAL for m in ("403", "403-explained", "reset") for b in (OFF, B429, TERMINAL)}
    # A client that reads the answer stops at once on an explained deny, and at threshold+1 with
    # the breaker under reset (the breaker's answer is the first thing it can read).
    assert cell(cells, where, "reads-body", "403-explained", OFF)["blocked_per_client"] == 1
    assert cell(cells, where, "reads-body", "reset", OFF)["gave_up"] == {"cap": instances}
    assert cell(cells, where, "reads-body", "reset", B429)["blocked_per_client"] == THRESHOLD + 1
    assert cell(cells, where, "llm-loop", "403", B429)["blocked_per_client"] == THRESHOLD + 1
    # With 200-terminal llm-loop stops on the 200 itself, before asking the model about it.
    llm_200 = cell(cells, where, "llm-loop", "403", TERMINAL)
    assert llm_200["blocked_per_client"] == THRESHOLD + 1 and llm_200["model_calls_per_client"] == THRESHOLD


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
    collateral = data["collateral"]
    for breaker in (OFF, B429, TERMINAL):
        assert collateral["reset"][breaker]["allowed_ok"] == 1 and collateral["403"][breaker]["allowed_ok"] == 2
    # The loop answer keeps the connection: the allowed call after it still gets through.
    assert collateral["403-explained"][TERMINAL]["statuses"] == [200] + [403] * THRESHOLD + [200, 200]
    assert collateral["403-explained"][B429]["statuses"] == [200] + [403] * THRESHOLD + [429, 200]
    assert data["recommendation"].startswith("Use deny mode 403-explained with the loop breaker answering 200-terminal")


@pytest.mark.qemu
@pytest.mark.timeout(420)
def test_retry403_in_guest(tmp_path: Path) -> None:
    code, results = run(tmp_path, sandboxes=1, accel="tcg")
    assert code == 0
    check_matrix(results["scenario"]["data"]["retry403"], "guest", 1)
    check_journal(results)
