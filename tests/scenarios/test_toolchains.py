"""toolchains: the counting and the recommendation over recorded audit records, bad input (one line, exit 2), and
one real subset in debian guests (curl and pip under 403-explained with the breaker answering 429)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.scenario.loader import load_scenario_module
from harness.scenario.runner import prepare_scenario, run_scenario
from tests.conftest import REPO, invoke_cmd

NAME = "toolchains"
clients = load_scenario_module(NAME, "clients")
scenario = load_scenario_module(NAME)
DATA = Path(__file__).parent / "data"
RECORDED = DATA / "toolchains-audit-403-explained-429.jsonl"
"""The gateway's audit records of one phase of a real run (deny mode 403-explained, breaker answering 429),
every client, sandboxes as the scenario names them."""


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        invoke_cmd("scenario", NAME, *args), cwd=REPO, capture_output=True, text=True, timeout=timeout, env=os.environ
    )


def recorded() -> list[dict[str, Any]]:
    return [json.loads(line) for line in RECORDED.read_text().splitlines() if line.strip()]


def counts(name: str, destination: str) -> dict[str, Any]:
    client = clients.BY_NAME[name]
    return clients.count_cell(recorded(), client, f"tc-{client.group}", destination)


# ---- counting from recorded audit records -------------------------------------------------------------------
def test_denied_connects_are_counted_per_client_with_the_breakers_answer() -> None:
    # curl --retry 5 --retry-all-errors: five 403s, then the breaker's 429 (a CONNECT never gets 200-terminal).
    retry_all = counts("curl-retry-all", "denied")
    assert retry_all["requests"] == 6 and retry_all["answers"] == {"403": 5, "429": 1}
    assert retry_all["loop_trips"] == 1 and retry_all["ok_2xx"] == 0
    # Plain curl shares the sandbox and the deny, but its own denied host: one request, no trip.
    plain = counts("curl", "denied")
    assert plain == {**plain, "requests": 1, "answers": {"403": 1}, "loop_trips": 0}
    # pip's urllib3 retries the failed tunnel five times: the breaker's answer is its sixth.
    pip = counts("pip", "denied")
    assert pip["requests"] == 6 and pip["answers"] == {"403": 5, "429": 1} and pip["loop_trips"] == 1
    assert pip["audit_span_s"] > 0


def test_allowed_cells_count_the_requests_inside_the_intercepted_tunnels() -> None:
    # pip's allowed install: the index pages on pypi.org and the wheels on files.pythonhosted.org, all 2xx.
    pip = counts("pip", "allowed")
    assert pip["requests"] == 4 and pip["ok_2xx"] == 4
    # git's dumb HTTP protocol asks for loose objects and packs it may not find: 404s are part of a good clone.
    git = counts("git", "allowed")
    assert git["ok_2xx"] >= 3 and set(git["answers"]) <= {"200", "404"}


def test_an_sdks_denied_path_and_allowed_call_on_one_host_are_told_apart() -> None:
    denied, allowed = counts("anthropic", "denied"), counts("anthropic", "allowed")
    assert denied["requests"] >= 1 and denied["ok_2xx"] == 0 and set(denied["answers"]) <= {"403", "429"}
    assert allowed["requests"] == 1 and allowed["ok_2xx"] == 1
    # Another sandbox's records are no cell's: the same client counted against a sandbox that did not run it.
    client = clients.BY_NAME["anthropic"]
    assert clients.count_cell(recorded(), client, "tc-shell", "denied")["requests"] == 0


def test_every_recorded_dial_was_loopback() -> None:
    dialled = clients.dialled_addresses(recorded())
    assert dialled and all(clients.is_loopback_address(a) for a in dialled)
    assert clients.is_loopback_address("[::1]:443") and clients.is_loopback_address("[::ffff:127.0.0.1]:80")
    assert not clients.is_loopback_address("10.0.0.1:443") and not clients.is_loopback_address("example.com:443")


def test_the_dial_sampler_sees_a_process_loopback_peers() -> None:
    import socket
    import time

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)), scenario.DialSampler(os.getpid()) as sampler:
            deadline = time.monotonic() + 5
            while f"127.0.0.1:{port}" not in sampler.peers and time.monotonic() < deadline:
                time.sleep(0.05)
    assert f"127.0.0.1:{port}" in sampler.peers and sampler.samples >= 1


# ---- cells, matrix and recommendation ----------------------------------------------------------------------
def cell(name: str, mode: str, breaker: str, destination: str, **ran: Any) -> dict[str, Any]:
    client = clients.BY_NAME[name]
    audit = {"requests": ran.pop("requests", 1), "answers": {}, "loop_trips": 0, "audit_span_s": 0.0}
    audit["ok_2xx"] = ran.pop("ok_2xx", 1 if destination == "allowed" else 0)
    return clients.make_cell(client, mode, breaker, destination, "tc-x", audit, {"exit": 0, "seconds": 1.0, **ran})


def test_a_cell_says_timeout_readable_and_false_success_from_what_ran() -> None:
    late = cell("curl-retry-all", "403", "off", "denied", exit=124, timed_out=True)
    assert late["exit"] == clients.TIMEOUT_EXIT and not late["succeeded"]
    said = cell(
        "anthropic", "403", "off", "denied", exit="PermissionDeniedError", output="Blocked by network policy: x"
    )
    assert said["readable"] and not said["false_success"]
    fooled = cell("anthropic", "403", "200-terminal", "denied", exit="ok", output="SyncPage(data=[])")
    assert fooled["false_success"] and not fooled["readable"]
    # An allowed call worked only if the client said so and the gateway saw a 2xx for it.
    assert not cell("pip", "reset", "off", "allowed", exit=0, ok_2xx=0)["worked"]
    assert cell("pip", "reset", "off", "allowed", exit=0, ok_2xx=2)["worked"]


def both(name: str, mode: str, breaker: str, allowed_ok: bool = True, **denied: Any) -> list[dict[str, Any]]:
    return [
        cell(name, mode, breaker, "denied", **{"exit": 1, **denied}),
        cell(name, mode, breaker, "allowed", exit=0 if allowed_ok else 1),
    ]


def test_the_recommendation_is_computed_from_the_rows() -> None:
    cells = [
        # pip: reset keeps it retrying to the timeout; 403 costs 6 requests; 403-explained with the breaker the same
        # 6 but faster.
        *both("pip", "reset", "off", requests=40, exit=124, timed_out=True, seconds=90.0),
        *both("pip", "403", "off", requests=6, seconds=20.0),
        *both("pip", "403-explained", "429", requests=6, seconds=12.0),
        # the SDK: its policy message reaches the user under 403-explained, and 200-terminal fools it.
        *both("anthropic", "403", "off", requests=3, output="Error code: 403"),
        *both("anthropic", "403-explained", "429", requests=3, output="blocked_by_policy"),
        *both("anthropic", "403-explained", "200-terminal", requests=1, exit="ok"),
        *both("anthropic", "reset", "off", allowed_ok=False, requests=3),
    ]
    rows = clients.matrix_rows(cells)
    assert [(r["client"], r["deny_mode"], r["breaker"]) for r in rows][:3] == [
        ("pip", "403", "off"),
        ("pip", "403-explained", "429"),
        ("pip", "reset", "off"),
    ]
    rec = clients.recommend(rows)
    by_family = {f["family"]: f for f in rec["families"]}
    assert by_family["pip"]["best"] == ["403-explained", "429"] and by_family["pip"]["worst"] == ["reset", "off"]
    assert "6 requests, 12 s to give up" in by_family["pip"]["text"]
    assert "1 still retrying at the timeout" in by_family["pip"]["text"]
    sdk = by_family["model SDKs"]
    assert sdk["best"] == ["403-explained", "429"] and "reached 1 of 1 client" in sdk["text"]
    assert rec["overall"]["best"] == ["403-explained", "429"]


def test_ties_go_to_the_breaker_on_and_then_to_429() -> None:
    cells = [c for breaker in clients.BREAKERS for c in both("git", "403", breaker)]
    assert clients.recommend(clients.matrix_rows(cells))["families"][0]["best"] == ["403", "429"]


def test_the_probe_names_what_is_missing_and_what_is_there() -> None:
    missing, versions = scenario.parse_probe(
        "missing anthropic\nversion curl curl 7.88.1 (x86_64)\nversion pip 23.0.1\n"
    )
    assert missing == ["anthropic"] and versions == {"curl": "curl 7.88.1 (x86_64)", "pip": "23.0.1"}
    command = scenario.probe_command({"curl"}, {"anthropic"})
    assert "command -v curl" in command and "find_spec" in command and "import anthropic" not in command


# ---- options and bad input ---------------------------------------------------------------------------------
def test_the_scenario_gets_the_debian_image_unless_told_otherwise(tmp_path: Path) -> None:
    prepared = prepare_scenario(NAME, {"out": tmp_path / "run"})
    assert prepared.config.image == "debian" and prepared.config.mem_mib == 512
    assert prepare_scenario(NAME, {"out": tmp_path / "run", "mem_mib": 384}).config.mem_mib == 384
    assert prepared.options.client_list == [c.name for c in clients.CLIENTS]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--set", "clients=curl,bogus"], "unknown client bogus"),
        (["--set", "modes=402"], "unknown deny mode 402"),
        (["--set", "breakers=sometimes"], "unknown breaker setting sometimes"),
        (["--image", "busybox"], "runs its clients on the debian image, not busybox"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], says: str, tmp_path: Path) -> None:
    proc = cli(*args, "--out", str(tmp_path / "run"))
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2 and says in output and len(output.splitlines()) == 1, output
    assert not (tmp_path / "run").exists()


def host_has(module: str) -> bool:
    python = shutil.which("python3")
    if python is None:
        return False
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", probe], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(host_has("anthropic"), reason="this host's python3 has the anthropic SDK: nothing is missing")
def test_a_client_missing_inside_the_sandbox_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # The host backend runs the host's own tools: here its python3 has no anthropic SDK.
    proc = cli("--backend", "host", "--set", "clients=curl,anthropic", "--out", str(tmp_path / "run"))
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2 and len(output.splitlines()) == 1, output
    assert "missing inside the sandbox" in output and "anthropic (no anthropic)" in output and "curl" not in output


# ---- one real subset in debian guests ----------------------------------------------------------------------
@pytest.mark.qemu
@pytest.mark.debian_image
@pytest.mark.timeout(600)
def test_curl_and_pip_in_debian_guests(tmp_path: Path) -> None:
    values = {"clients": "curl,pip", "modes": "403-explained", "breakers": "429", "accel": "tcg"}
    code, run_dir = run_scenario(NAME, values, tmp_path / "run")
    results = json.loads((run_dir / "results.json").read_text())
    data = results["scenario"]["data"]["toolchains"]
    assert code == 0 and data["checks"] == [], data["checks"]
    assert data["dialled"] and all(clients.is_loopback_address(a) for a in data["dialled"])
    peers = data["gateway_peers"]
    assert peers["samples"] > 0 and peers["peers"], peers
    assert all(ipaddress.ip_address(peer).is_loopback for peer in peers["peers"]), peers
    rows = {r["client"]: r for r in data["matrix"]}
    assert set(rows) == {"curl", "pip"}
    # curl: one CONNECT, denied; exit 56; the 403's body never reaches the user (curl drops a CONNECT's answer).
    assert rows["curl"]["requests"] == 1 and rows["curl"]["exit"] == 56 and not rows["curl"]["readable"]
    # pip retries the refused tunnel: five 403s, then the breaker's 429; it gives up with exit 1.
    assert rows["pip"]["requests"] == 6 and rows["pip"]["answers"] == {"403": 5, "429": 1}
    assert rows["pip"]["exit"] == 1 and not rows["pip"]["false_success"]
    # The allowed call after the deny works for both: the index stand-in served the real wheels.
    assert rows["curl"]["collateral_ok"] and rows["pip"]["collateral_ok"]
    families = {f["family"] for f in data["recommendation"]["families"]}
    assert families == {"curl", "pip"}
    report = (run_dir / "report.html").read_text()
    assert report.index("Recommendation, curl") < report.index("The matrix") < report.index("Each cell's evidence")
