"""`isolation` end to end: real guests, real gateway, real sockets, in both directions.

One reference run and one --leaky run (two sandboxes each) are shared by the whole module; every
probe must pass in the first and (where the weakening applies) fail in the second. `processes`
and `kernel` cannot be weakened on a microVM, so they are shown red on the host backend. The same
probes run on bwrap (only `kernel` red: a jail shares the host's kernel) and on the host backend
(red nearly everywhere); tests/scenarios/test_isolation_probes.py judges recorded outputs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.paths import cache_dir
from harness.sandbox import BackendOptions, SandboxSpec, create_backend
from harness.scenario.loader import load_scenario_module
from harness.scenario.runner import run_scenario
from harness.supervisor import Supervisor
from tests.conftest import IsolationComparison

REPO = Path(__file__).resolve().parents[2]
SCENARIO = load_scenario_module("isolation")
probes = SCENARIO.probes
honeytokens = SCENARIO.honeytokens
ALL_PROBES = [p.id for p in probes.PROBES]
VM_STRUCTURAL = {"processes", "kernel"}
"""Probes a microVM passes by construction; their red direction is tested on the host shell."""
NEEDS_CURL_OR_DIG = {p.id for p in probes.FIELD_PROBES if {"curl", "dig"} & set(p.tools)}
"""The field evaluation's commands that a busybox sandbox cannot run (n/a there, never a pass)."""
INTERRUPT_AFTER_PLANT_TIMEOUT_S = 60.0


def _run(tmp: Path, leaky: bool) -> dict[str, Any]:
    before = os.environ.get(honeytokens.ENV_KEY_NAME)
    exit_code, run_dir = run_scenario("isolation", {"sandboxes": 2, "leaky": leaky or None}, out=tmp)
    data = json.loads((run_dir / "results.json").read_text())
    return {
        "exit_code": exit_code,
        "run_dir": run_dir,
        "data": data,
        "info": data["scenario"]["data"],
        "env_before": before,
        "env_after": os.environ.get(honeytokens.ENV_KEY_NAME),
    }


@pytest.fixture(scope="module")
def normal(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(tmp_path_factory.mktemp("iso-normal"), leaky=False)


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(tmp_path_factory.mktemp("iso-leaky"), leaky=True)


def _verdicts(run: dict[str, Any], probe_id: str) -> list[bool | None]:
    return [next(p["passed"] for p in card["probes"] if p["id"] == probe_id) for card in run["info"]["scorecards"]]


@pytest.mark.qemu
@pytest.mark.parametrize("probe_id", ALL_PROBES)
def test_reference_setup_passes(normal: dict[str, Any], probe_id: str) -> None:
    expected = [None, None] if probe_id in NEEDS_CURL_OR_DIG else [True, True]  # the busybox guest
    assert _verdicts(normal, probe_id) == expected, json.dumps(
        [next(p for p in c["probes"] if p["id"] == probe_id) for c in normal["info"]["scorecards"]]
    )[:3000]


@pytest.mark.qemu
@pytest.mark.parametrize("probe_id", sorted(set(ALL_PROBES) - VM_STRUCTURAL - NEEDS_CURL_OR_DIG))
def test_leaky_setup_turns_probe_red(leaky: dict[str, Any], probe_id: str) -> None:
    assert _verdicts(leaky, probe_id) == [False, False]


@pytest.mark.qemu
def test_exit_code_gates_ci_and_scorecard_shape(normal: dict[str, Any], leaky: dict[str, Any]) -> None:
    assert normal["exit_code"] == 0 and normal["info"]["leaks"] == 0
    assert leaky["exit_code"] == 1 and leaky["info"]["leaks"] == 2 * (
        len(ALL_PROBES) - len(VM_STRUCTURAL) - len(NEEDS_CURL_OR_DIG)
    )
    card = normal["info"]["scorecards"][0]
    assert {"sandbox", "backend", "probes", "leaks"} <= set(card)
    assert {"id", "title", "passed", "evidence"} <= set(card["probes"][0])
    assert normal["data"]["scenario"]["journal"]["status"] == "completed"
    assert normal["info"]["detector"]["host_scan"]["ok"]


@pytest.mark.qemu
def test_blocked_domain_evidence_records_the_deny(normal: dict[str, Any]) -> None:
    probe = next(p for p in normal["info"]["scorecards"][0]["probes"] if p["id"] == "blocked-domain")
    plain = probe["facts"]["gateway GET http://example.com/"]
    assert plain["status"] == 403 and plain["level"] == "http" and plain["curl_exit"] == 0
    assert plain["headers"]["x-proxy-error"] == "blocked-by-allowlist"
    assert probe["facts"]["gateway CONNECT example.com:443"]["curl_exit"] == 56


@pytest.mark.qemu
@pytest.mark.parametrize("which", ["normal", "leaky"])
def test_no_raw_secret_in_the_run_directory(which: str, request: pytest.FixtureRequest) -> None:
    run = request.getfixturevalue(which)
    assert run["info"]["evidence_clean"]["clean"]
    for path in Path(run["run_dir"]).rglob("*"):  # report.html is written after the scenario's own check
        if path.is_file():
            assert not honeytokens.ANY_MARKER_RE.search(path.read_bytes().decode(errors="replace")), path
    hashes = {t["sha256"] for t in run["info"]["honeytokens"]}
    assert len(hashes) == len(run["info"]["honeytokens"])


@pytest.mark.qemu
def test_leaky_findings_are_verifiable_by_hash(leaky: dict[str, Any]) -> None:
    planted = {t["id"]: t["sha256"] for t in leaky["info"]["honeytokens"]}
    probe = next(p for p in leaky["info"]["scorecards"][0]["probes"] if p["id"] == "fs-scan")
    found = {hit["id"]: hit["sha256"] for hit in probe["facts"]["hits"]}
    assert {"ssh", "aws", "kube0", "dotenv", "control"} <= set(found)
    assert all(planted[token_id] == digest for token_id, digest in found.items())


@pytest.mark.qemu
@pytest.mark.parametrize("which", ["normal", "leaky"])
def test_honeytokens_are_removed_and_env_restored(which: str, request: pytest.FixtureRequest) -> None:
    run = request.getfixturevalue(which)
    assert run["info"]["cleanup"]["home_removed"] and not run["info"]["cleanup"]["problems"]
    assert run["env_after"] == run["env_before"]
    tag = run["info"]["marker_regex"].split("-")[1]
    assert not list(Path("/tmp").glob(f"{honeytokens.HOME_PREFIX}{tag}-*"))
    assert not (cache_dir() / honeytokens.MANIFEST_DIR_NAME / f"{tag}.json").exists()


@pytest.mark.qemu
def test_report_has_green_and_red_rows_with_evidence(normal: dict[str, Any], leaky: dict[str, Any]) -> None:
    good = (Path(normal["run_dir"]) / "report.html").read_text()
    bad = (Path(leaky["run_dir"]) / "report.html").read_text()
    assert "Isolation scorecard" in good and 'class="fail"' not in good and good.count('class="pass"') >= 26
    assert bad.count('class="fail"') == leaky["info"]["leaks"] and "<details>" in bad
    # The field evaluation's table repeats the field probes' verdicts beside its outcomes, as rows of its own.
    assert bad.count('class="fail beside"') == 2 and "the field evaluation's hand-run probes" in bad


@pytest.mark.qemu
@pytest.mark.debian_image
@pytest.mark.timeout(900)  # a cold image build is ~2 min before the run itself
def test_debian_guest_runs_the_field_evaluations_commands_and_passes(tmp_path: Path) -> None:
    """The one debian-image run: a microVM with curl and dig runs the evaluation's commands as written, and every
    probe, busybox's and the evaluation's, passes (peers is n/a with one sandbox). The red direction of the same
    commands is the host backend's test below and the judging tests in test_isolation_probes.py."""
    exit_code, run_dir = run_scenario("isolation", {"sandboxes": 1, "image": "debian"}, out=tmp_path)
    info = json.loads((run_dir / "results.json").read_text())["scenario"]["data"]
    card = info["scorecards"][0]
    verdicts = {p["id"]: p["passed"] for p in card["probes"]}
    assert verdicts == {**dict.fromkeys(ALL_PROBES, True), "peers": None}, [
        (p["id"], p["reason"]) for p in card["probes"] if p["passed"] is not True
    ]
    assert exit_code == 0
    curl = _probe(card, "field-curl")
    assert curl["facts"]["http"] == {"curl_exit": 0, "http_code": "403"} and curl["observed"].startswith("http: exit 0")
    assert curl["facts"]["what_the_user_sees"]["headers"]["x-proxy-error"] == "blocked-by-allowlist"
    connect = _probe(card, "field-connect")["facts"]
    assert [connect[f"github.com:{port}"]["http_connect"] for port in (22, 9999, 443)] == ["403", "403", "200"]
    assert _probe(card, "field-dig")["facts"]["addresses"] == []
    assert _probe(card, "field-dig")["field_evaluation"]["outcome"].startswith("resolved the blocked name")
    report = (run_dir / "report.html").read_text()
    assert "the field evaluation's hand-run probes" in report and 'class="pass beside"' in report


@pytest.fixture
def host_env(tmp_path: Path) -> Iterator[Any]:
    """The probes against the host backend: no isolation at all, a careless user's honeytoken home and key."""
    home = honeytokens.HoneyHome()
    home.plant()
    assert home.home is not None
    decoy = home.new_token("decoy", "process", "argv of a host process")
    backend = create_backend("host", BackendOptions(cache=cache_dir()))
    spec = SandboxSpec(
        id="host-shell", workdir=tmp_path, user_home=home.home, user_env={honeytokens.ENV_KEY_NAME: home.api_key}
    )
    with Supervisor(f"test-iso-host-{os.getpid()}") as sup:
        sup.spawn(["/bin/sh", "-c", "sleep 600; :", decoy.value], name="decoy")
        target = backend.boot(spec, sup)
        try:
            yield probes.ProbeEnv(target=target, home=home, traps={}, host=SCENARIO.host_facts())
        finally:
            target.stop()
            home.remove()


@pytest.mark.parametrize("probe_id", ["processes", "kernel", "env", "field-env"])
def test_probe_turns_red_without_isolation(host_env: Any, probe_id: str) -> None:
    result = probes.run_probe(probes.PROBES_BY_ID[probe_id], host_env)
    assert result["passed"] is False, result["reason"]
    assert not honeytokens.ANY_MARKER_RE.search(json.dumps(result)), "evidence must be redacted"


def test_a_field_probe_without_its_tool_is_not_applicable(host_env: Any) -> None:
    """Looked for inside, never assumed: a tool the shell cannot find makes the probe n/a, never a pass."""
    from dataclasses import replace

    lacking = replace(probes.PROBES_BY_ID["field-dig"], tools=("dig", "br-no-such-tool"))
    result = probes.run_probe(lacking, host_env)
    assert result["passed"] is None
    assert result["reason"] == (
        "not applicable: the sandbox has no br-no-such-tool: the busybox probe dns above covers the same path"
    )
    assert [item["command"] for item in result["evidence"]] == [probes.tools_command(lacking.tools)]
    assert result["field_evaluation"]["command"] == "dig example.com +short"


def test_sweep_removes_leftovers_of_a_killed_run() -> None:
    home = honeytokens.HoneyHome()
    home.plant()
    assert home.manifest is not None and home.home is not None
    record = json.loads(home.manifest.read_text())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    home.manifest.write_text(json.dumps({**record, "pid": dead.pid}))
    removed = honeytokens.sweep_leftovers()
    assert any(str(home.home) in line for line in removed)
    assert not home.home.exists() and not home.manifest.exists()
    home.remove()  # restores the environment; nothing left to delete
    assert os.environ.get(honeytokens.ENV_KEY_NAME) != home.api_key


def test_redactor_hides_values_but_keeps_ids_and_hashes() -> None:
    home = honeytokens.HoneyHome()
    token = home.new_token("ssh", "file", ".ssh/id_ed25519")
    text = home.redactor()(f"found {token.value} in sk-ant-{token.value}x")
    assert token.value not in text and "honeytoken ssh" in text and token.digest[:12] in text


@pytest.mark.qemu
def test_sigterm_mid_run_still_removes_the_honeytokens(tmp_path: Path) -> None:
    manifests = cache_dir() / honeytokens.MANIFEST_DIR_NAME
    before = set(manifests.glob("*.json")) if manifests.exists() else set()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "invoke",
            "--search-root",
            str(REPO),
            "scenario",
            "isolation",
            "--sandboxes",
            "1",
            "--out",
            str(tmp_path / "run"),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + INTERRUPT_AFTER_PLANT_TIMEOUT_S
    new: set[Path] = set()
    while not new and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        new = set(manifests.glob("*.json")) - before
    assert new, "the run never planted"
    home = Path(json.loads(next(iter(new)).read_text())["home"])
    time.sleep(0.5)  # let it get into boot
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not home.exists() and not any(p.exists() for p in new)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["scenario"]["journal"]["status"] == "interrupted"
    assert not re.search(honeytokens.ANY_MARKER_RE, (tmp_path / "run" / "results.json").read_text())


# ---- the same probes on the namespace backends: real runs, no QEMU --------------------------------
# One comparison run (bwrap, host, the command backend's bwrap) serves every test that judges them.
def _backend_run(comparison: IsolationComparison, label: str) -> dict[str, Any]:
    data = comparison.sub_run(label)
    return {
        "exit_code": data["scenario"]["exit_code"],
        "data": data,
        "info": data["scenario"]["data"],
        "run_dir": comparison.out / label,
    }


@pytest.fixture(scope="module")
def bwrap_run(isolation_comparison: IsolationComparison) -> dict[str, Any]:
    return _backend_run(isolation_comparison, "bwrap")


@pytest.fixture(scope="module")
def host_run(isolation_comparison: IsolationComparison) -> dict[str, Any]:
    return _backend_run(isolation_comparison, "host")


def _probe(card: dict[str, Any], probe_id: str) -> dict[str, Any]:
    return next(p for p in card["probes"] if p["id"] == probe_id)


def _red(card: dict[str, Any]) -> set[str]:
    return {p["id"] for p in card["probes"] if p["passed"] is False}


def test_bwrap_is_red_only_on_the_shared_kernel(bwrap_run: dict[str, Any]) -> None:
    cards = bwrap_run["info"]["scorecards"]
    assert len(cards) == 2 and bwrap_run["exit_code"] == 1
    for card in cards:
        assert _red(card) == {"kernel"}, [(p["id"], p["reason"]) for p in card["probes"] if p["passed"] is False]
        kernel = _probe(card, "kernel")
        assert {"the host's boot id", "the host's exact /proc/version"} <= set(kernel["facts"]["host_signs"])
        applies = [p["id"] for p in card["probes"] if p["passed"] is not None]
        assert set(ALL_PROBES) - set(applies) == NEEDS_CURL_OR_DIG, "every probe applies to a jail but curl's and dig's"
        for probe_id in NEEDS_CURL_OR_DIG:  # the jail's rootfs is busybox: the evaluation's tools are missing
            assert re.search(r"the sandbox has no (curl|dig)", _probe(card, probe_id)["reason"])
        assert _probe(card, "field-env")["passed"] is True
    assert bwrap_run["info"]["evidence_clean"]["clean"]


def test_bwrap_processes_hide_the_host_and_bwrap_itself(bwrap_run: dict[str, Any]) -> None:
    facts = _probe(bwrap_run["info"]["scorecards"][0], "processes")["facts"]
    # --as-pid-1: the jail's own init is PID 1; no bwrap inside shows host paths or the harness's environment.
    assert facts["supervisor_visible"] == [] and not facts["decoy_seen"]
    assert facts["guest_processes"] == len(facts["process_list"]) < facts["host_processes"]
    assert facts["pid1"].split()[0] == "socat" and not facts["pid1_is_hosts"]
    env = _probe(bwrap_run["info"]["scorecards"][0], "env")["facts"]
    assert not env.get("host_started_environment_visible"), env


def test_bwrap_peers_aim_at_the_channel_and_the_listener(bwrap_run: dict[str, Any]) -> None:
    card = bwrap_run["info"]["scorecards"][0]
    peers = _probe(card, "peers")
    assert peers["passed"] is True and peers["facts"]["own_address_answers"] is True
    assert "/run/br/agent.sock" in peers["facts"]["own_agent_control"]
    other = bwrap_run["info"]["scorecards"][1]["sandbox"]
    paths = peers["facts"]["peer_paths_checked"][other]
    assert Path(paths["channel directory"]).name.startswith("br-ch-") and "agent socket" in paths
    whats = [item["what"] for item in peers["evidence"]]
    assert any("gateway listener via 127.0.0.1:" in what for what in whats)
    assert any("gateway listener via gateway CONNECT" in what for what in whats)
    assert not any(":0 " in what for what in whats), "no probe aims at agent port 0"
    # Where a jail has no host alias, the direct paths say what they aimed at instead.
    blocked = _probe(card, "blocked-domain")
    assert any(name.startswith("direct to the example.com stand-in (127.0.0.1:") for name in blocked["facts"])


def test_host_backend_is_red_on_the_kernel_and_most_probes(host_run: dict[str, Any]) -> None:
    for card in host_run["info"]["scorecards"]:
        red = _red(card)
        assert len(red) >= 5 and {"kernel", "processes", "env", "home", "host-loopback", "peers"} <= red, red
        kernel = _probe(card, "kernel")["facts"]
        assert kernel["judgement"] == "the host's kernel" and kernel["signs"]["boot_id"] == "same"
        processes = _probe(card, "processes")["facts"]
        assert processes["decoy_seen"] and processes["pid1_is_hosts"]
        peers = _probe(card, "peers")["facts"]
        assert any("host paths" in name for name in peers["reached"]), "a peer's host directory is visible"
        metadata = _probe(card, "metadata")
        direct = next(item for item in metadata["evidence"] if item["what"].startswith("direct"))
        assert direct["command"].endswith("-e true && echo connected"), "never a request to a real metadata service"
    assert host_run["info"]["evidence_clean"]["clean"]


def test_host_backend_runs_the_field_evaluations_commands(host_run: dict[str, Any]) -> None:
    """The host has curl and dig: the evaluation's commands run as written. Its key is in the environment (red);
    curl goes through the proxy its environment names, which refuses what the policy blocks (green)."""
    card = host_run["info"]["scorecards"][0]
    env = _probe(card, "field-env")
    assert env["passed"] is False and env["facts"]["keys"] == ["ANTHROPIC_API_KEY"]
    curl = _probe(card, "field-curl")
    assert curl["passed"] is True, curl["reason"]
    assert curl["facts"]["http"] == {"curl_exit": 0, "http_code": "403"}  # as the evaluation saw it
    assert curl["facts"]["https_connect"]["http_connect"] == "403" and curl["facts"]["stand_in_requests"] == 0
    assert curl["field_evaluation"]["outcome"].startswith("exit 0 with HTTP 403")
    connect = _probe(card, "field-connect")
    assert connect["passed"] is True and connect["facts"]["github.com:22"]["http_connect"] == "403"
    assert connect["facts"]["github.com:443"]["http_connect"] == "200"
    dig = _probe(card, "field-dig")  # the host's own resolver: whether it tells example.com depends on the host
    assert dig["passed"] is (not dig["facts"]["addresses"]) and dig["observed"].startswith("exit ")
    report = (Path(host_run["run_dir"]) / "report.html").read_text()
    assert "the field evaluation's hand-run probes" in report and "172.66.147.243" in report


@pytest.mark.parametrize("egress", ["squid", "tinyproxy", "mitmproxy"])
def test_isolation_behind_a_peer_egress(tmp_path: Path, egress: str) -> None:
    """The same probes with a peer, configured from the same policy, as every sandbox's egress: it denies the
    blocked domain and (configured per host and port) CONNECT :22 and :9999, and injects no key."""
    from harness.load.peers import binary

    if shutil.which("bwrap") is None or binary(egress) is None:
        pytest.skip(f"bubblewrap and {egress} are installed by install.sh")
    exit_code, run_dir = run_scenario("isolation", {"backend": "bwrap", "sandboxes": 1, "egress": egress}, out=tmp_path)
    info = json.loads((run_dir / "results.json").read_text())["scenario"]["data"]
    assert info["egress"] == egress and info["egress_setup"]["untranslatable"] is not None
    card = info["scorecards"][0]
    assert _red(card) == {"kernel"}, [(p["id"], p["reason"]) for p in card["probes"] if p["passed"] is False]
    assert _probe(card, "credential")["passed"] is None and egress in _probe(card, "credential")["reason"]
    assert _probe(card, "ports")["passed"] is True and _probe(card, "blocked-domain")["passed"] is True
    assert exit_code == 1  # the shared kernel
