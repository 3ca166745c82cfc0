"""egress-conformance: the corpus's shape, the scoring on recorded outcomes, bad options, and the gateway all
green on the full corpus through the real CLI (the CI gate)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from harness.scenario.loader import load_scenario_module
from harness.scenario.runner import run_scenario
from tests.conftest import REPO, invoke_cmd

NAME = "egress-conformance"
corpus = load_scenario_module(NAME, "corpus")
scoring = load_scenario_module(NAME, "scoring")
canaries = load_scenario_module(NAME, "canaries")
client = load_scenario_module(NAME, "client")
scenario = load_scenario_module(NAME)
KEY = "sk-conf-unit-test-0123456789abcdef"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        invoke_cmd("scenario", NAME, *args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


# ---- the corpus ----------------------------------------------------------------------------------
def test_corpus_has_300_cases_in_every_family() -> None:
    corpus.check_corpus()
    counts = Counter(case.family for case in corpus.CASES)
    assert len(corpus.CASES) >= 300
    assert set(counts) == set(corpus.FAMILIES)
    assert all(counts[family] >= 8 for family in corpus.FAMILIES), counts
    # Allowed controls exist, so a proxy that denies everything cannot pass.
    assert sum(1 for case in corpus.CASES if case.must_reach) >= 20
    # FINDINGS probe 6: CONNECT to :22 and :9999 on an allowed host.
    ids = {case.id for case in corpus.CASES}
    assert {"ports-connect-allowed-22", "ports-connect-allowed-9999"} <= ids


# ---- scoring on recorded outcomes -----------------------------------------------------------------
def conn(name: str, port: int, data: bytes = b"", tls: bool = False, parsed: list[dict[str, str]] | None = None):
    record = canaries.Connection(name, "127.0.0.5", port, "127.0.0.1:40000", tls, 0.0)
    record.data += data
    record.parsed = parsed or []
    return record


def case(**fields):
    base = {"id": "t", "family": "ports", "description": "", "kind": "http", "send": b""}
    return corpus.Case(**{**base, **fields})


def test_a_denied_case_passes_on_a_403_and_nothing_reached() -> None:
    verdict = scoring.score(case(), b"x", client.Seen("4xx", 403), [], KEY)
    assert verdict.result == "pass", verdict.reasons


def test_a_canary_reached_fails_a_denied_case_even_with_a_403() -> None:
    verdict = scoring.score(case(), b"x", client.Seen("4xx", 403), [conn("blocked", 80)], KEY)
    assert verdict.result == "fail" and "reached canary blocked" in verdict.reasons[0]


def test_a_hung_deny_and_a_tunnel_fail() -> None:
    assert scoring.score(case(), b"", client.Seen("timeout"), [], KEY).result == "fail"
    opened = client.Seen("2xx", 200, tunnel=True, inner="2xx")
    assert scoring.score(case(), b"", opened, [], KEY).reasons == [
        "client saw tunnel:2xx, expected one of 4xx, 5xx, reset, closed"
    ]


def test_an_allowed_control_must_reach_its_canary() -> None:
    control = case(reach=("web",), must_reach=True, client=corpus.OK)
    assert scoring.score(control, b"", client.Seen("2xx", 200), [conn("web", 80)], KEY).result == "pass"
    assert scoring.score(control, b"", client.Seen("4xx", 403), [], KEY).result == "fail"


@pytest.mark.parametrize(
    ("canary", "port", "tls", "form", "ok"),
    [
        ("model", 443, True, "{KEY}", True),
        ("model", 80, False, "{KEY}", False),  # the model host, but in clear
        ("model", 443, False, "{KEY}", False),  # plain http to :443
        ("web", 443, True, "{KEY}", False),
        ("web", 80, False, "{KEY_B64}", False),
        ("web", 80, False, "{KEY_HEX}", False),
        ("web", 80, False, "{KEY_PCT}", False),
    ],
)
def test_the_key_may_appear_only_at_its_host_over_tls(canary: str, port: int, tls: bool, form: str, ok: bool) -> None:
    data = b"GET / HTTP/1.1\r\nx-api-key: " + scoring.fill(form.encode(), KEY) + b"\r\n\r\n"
    verdict = scoring.score(
        case(reach=(canary,), client=corpus.ANY, key_ok=True),
        b"",
        client.Seen("2xx", 200),
        [conn(canary, port, data, tls)],
        KEY,
    )
    assert (verdict.result == "pass") is ok, verdict.reasons


def test_a_smuggled_request_counts_only_when_the_canary_parsed_it() -> None:
    smuggle = case(reach=("web",), client=corpus.ANY, no_request="/smuggled")
    body_only = conn(
        "web",
        80,
        b"POST / ...GET http://blocked.test/smuggled",
        parsed=[{"method": "POST", "target": "/", "host": "web.test"}],
    )
    parsed = conn(
        "web", 80, b"", parsed=[{"method": "GET", "target": "http://blocked.test/smuggled", "host": "blocked.test"}]
    )
    assert scoring.score(smuggle, b"", client.Seen("2xx", 200), [body_only], KEY).result == "pass"
    assert scoring.score(smuggle, b"", client.Seen("2xx", 200), [parsed], KEY).result == "fail"


@pytest.mark.parametrize(
    ("target", "inside"),
    [
        ("/v1/messages", True),
        ("/v1", True),
        ("/v1/./x", True),
        ("/v1/%252e%252e/admin", True),  # an origin server decodes once: %2e%2e stays a name
        ("/v1/../admin", False),
        ("/v1/%2e%2e/admin", False),
        ("/v1/..%2fadmin", False),
        ("/v1/..;/admin", False),
        ("/v1/..\\admin", False),
        ("/V1/x", False),
        ("//admin", False),
        ("http://api.model.test/admin", False),
    ],
)
def test_paths_are_judged_after_one_decode_and_dot_segments(target: str, inside: bool) -> None:
    assert scoring.under(target, "/v1") is inside


def test_not_applicable_comes_from_untranslatable_rules_or_a_missing_resolver() -> None:
    paths = case(requires=("paths",))
    rule = [{"rule": "api.model.test paths: /v1/**", "why": "cannot see inside CONNECT", "cases": ["paths"]}]
    assert "untranslatable rule" in (scenario.applicability(paths, rule, None) or "")
    assert scenario.applicability(paths, [], None) is None
    # A gap that takes nothing away from the cases (mitmproxy matches paths, but unnormalised): they run.
    weaker = [{"rule": "api.model.test paths: /v1/**", "why": "matches paths as sent", "cases": []}]
    assert scenario.applicability(paths, weaker, None) is None
    assert "no DNS resolver" in (scenario.applicability(case(requires=("dns",)), [], None) or "")


def test_fill_sets_content_length_after_the_key() -> None:
    raw = scoring.fill(b"POST / HTTP/1.1\r\nContent-Length: {CL}\r\n\r\ndata={KEY}", KEY)
    assert raw.endswith(b"data=" + KEY.encode()) and f"Content-Length: {len(KEY) + 5}".encode() in raw


# ---- options -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--egress", "nope"], "unknown egress nope; choose from gateway, squid, tinyproxy, mitmproxy"),
        (["--set", "families=ports,bogus"], "egress-conformance: unknown family bogus; choose from all, ports"),
        (["--set", "policy=/nonexistent.yaml"], "egress-conformance: policy /nonexistent.yaml is not a file"),
        (["--backend", "qemu"], "egress-conformance boots no sandbox, so --backend does not apply; leave it out"),
    ],
)
def test_bad_options_are_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "run"
    result = cli(*args, "--out", str(out))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


# ---- runs ----------------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_gateway_is_all_green_on_the_full_corpus(tmp_path: Path) -> None:
    """The CI gate, through the real CLI: every case passes on the gateway (or is a listed known bug)."""
    out = tmp_path / "run"
    result = cli("--egress", "gateway", "--out", str(out), timeout=170)
    data = json.loads((out / "results.json").read_text())
    gateway = data["scenario"]["data"]["conformance"]["results"]["gateway"]
    failing = [(f["case"], f["reasons"]) for f in gateway["failures"]]
    assert gateway["unexpected_failures"] == [], failing
    assert result.returncode == 0, result.stdout + result.stderr
    assert gateway["totals"]["pass"] + len(scenario.GATEWAY_EXPECTED_FAILURES) == len(corpus.CASES)
    assert gateway["run_failures"] == [] and gateway["connection_samples"] > 0
    assert data["backend"]["name"] == "host"  # no guest image or accelerator was prepared
    report = (out / "report.html").read_text()
    assert "Egress conformance" in report
    assert "is a host-side client and boots no sandbox" in report  # the conditions name no backend
    assert "gateway: " in result.stdout + result.stderr


@pytest.mark.timeout(120)
def test_a_permissive_gateway_fails_and_a_missing_peer_is_skipped(tmp_path: Path) -> None:
    """The suite can fail: the gateway under an allow-everything policy fails the ports family and the run
    exits 1; a peer whose module has not landed is 'skipped: ...', never a crash."""
    policy = tmp_path / "open.yaml"
    policy.write_text('name: open\nrules:\n  - allow: "**"\n    ports: ["*"]\n')
    peer = next(
        (p for p in ("squid", "tinyproxy", "mitmproxy") if importlib.util.find_spec(f"harness.egress.{p}") is None),
        None,
    )
    egresses = ",".join(["gateway", *([peer] if peer else [])])
    code, run_dir = run_scenario(
        NAME, {"egress": egresses, "families": "ports", "policy": str(policy)}, tmp_path / "run"
    )
    results = json.loads((run_dir / "results.json").read_text())["scenario"]["data"]["conformance"]["results"]
    assert code == 1
    failed = {f["case"] for f in results["gateway"]["failures"]}
    assert {"ports-connect-allowed-22", "ports-connect-allowed-9999"} <= failed
    if peer:
        assert results[peer]["status"].startswith("skipped: ")
