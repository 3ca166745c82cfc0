"""`invoke compare` and the comparison report: the A/B statistics on known inputs, run and comparison
directories as inputs, labels, the isolation matrix, and one line (exit 2) for each kind of bad input.

The runs compared are real results.json files (tests/data/compare/, see its README); only the slow test at the
end makes fresh ones."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.compare import compute_comparison, load_inputs, unique_labels
from harness.errors import ResultsUnreadable
from harness.metrics import ab
from harness.report import render_report
from harness.report.comparison import words
from harness.results import COMPARISON_KIND, SCHEMA, load_results, write_results
from tests.conftest import REPO, IsolationComparison, invoke_cmd

DATA = REPO / "tests" / "data" / "compare"


def invoke(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(invoke_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess[str], *words_: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.stderr, result.stderr
    assert all(word in lines[0] for word in words_), lines[0]


def run_copy(name: str, where: Path, data: dict[str, Any] | None = None) -> Path:
    """A run directory at `where` holding fixture `name`'s results.json (or `data`)."""
    where.mkdir(parents=True)
    if data is None:
        shutil.copy(DATA / name / "results.json", where / "results.json")
    else:
        write_results(where, data)
    return where


def fixture(name: str) -> dict[str, Any]:
    return json.loads((DATA / name / "results.json").read_text())


def comparison_dir(where: Path, runs: dict[str, dict[str, Any]], order: list[list[str]]) -> Path:
    """A directory as a run over several backends writes it: one sub-run per label, and the top results.json."""
    where.mkdir(parents=True)
    for label, data in runs.items():
        run_copy("", where / label, data)
    write_results(
        where,
        {
            "schema": SCHEMA,
            "kind": COMPARISON_KIND,
            "run_id": "20260101-000000-multi",
            "created": "2026-01-01T00:00:00+0000",
            "partial": False,
            "interrupted_by": None,
            "host": fixture("bench-host-a")["host"],
            "config": {},
            "what": "bench",
            "runs": [
                {"label": label, "backend": data["backend"]["name"], "dir": label} for label, data in runs.items()
            ],
            "order": order,
        },
    )
    return where


def self_contained(html: str) -> None:
    """Nothing the page loads comes from elsewhere: images are data URIs, links are anchors."""
    for attribute, value in re.findall(r'\b(src|href)="([^"]*)"', html):
        assert value.startswith(("data:", "#")), f"{attribute}={value[:60]}"
    assert "<link" not in html and "<script" not in html


# ---- statistics on known inputs ------------------------------------------------------------------------------


def test_mann_whitney_matches_the_textbook_example() -> None:
    """Conover, Practical Nonparametric Statistics (the example scipy.stats.mannwhitneyu documents): U = 17 and,
    by the normal approximation with continuity correction, p = 0.11134688653314041."""
    males, females = [19, 22, 16, 29, 24], [20, 11, 17, 12]
    test = ab.mann_whitney(males, females)
    assert test.u == 17
    assert test.p == pytest.approx(0.11134688653314041, rel=1e-9)
    assert ab.mann_whitney(females, males).p == pytest.approx(test.p)  # two-sided: the order does not matter


def test_mann_whitney_with_ties_by_hand() -> None:
    # a = 1 2 2 3, b = 2 3 4 4 5. Pooled ranks: 1->1; the three 2s share (2+3+4)/3 = 3; the two 3s 5.5; the
    # two 4s 7.5; 5->9. R_a = 1 + 3 + 3 + 5.5 = 12.5, U_a = 12.5 - 4*5/2 = 2.5; mean n1*n2/2 = 10.
    # Ties: groups of 1, 3, 2, 2, 1 -> sum(t^3 - t) = 24 + 6 + 6 = 36; n = 9, so the variance is
    # 4*5/12 * ((9 + 1) - 36/(9*8)) = 20/12 * 9.5 = 15.8333. z = (|2.5 - 10| - 0.5) / sqrt(15.8333) = 1.7592,
    # two-sided p = erfc(1.7592 / sqrt 2) = 0.07855.
    test = ab.mann_whitney([1, 2, 2, 3], [2, 3, 4, 4, 5])
    assert test.u == 2.5
    assert test.z == pytest.approx(-7 / math.sqrt(20 / 12 * 9.5))
    assert test.p == pytest.approx(math.erfc(7 / math.sqrt(20 / 12 * 9.5) / math.sqrt(2)))
    assert test.p == pytest.approx(0.07855, abs=5e-5)
    assert ab.rank([1, 2, 2, 3]) == ([1.0, 2.5, 2.5, 4.0], [1, 2, 1])


def test_mann_whitney_of_equal_values_finds_nothing() -> None:
    assert ab.mann_whitney([5, 5, 5], [5, 5, 5]).p == 1.0


def test_bootstrap_interval_holds_a_clear_shift_and_excludes_zero() -> None:
    rng = random.Random(7)
    baseline = [rng.gauss(100, 5) for _ in range(40)]
    candidate = [rng.gauss(130, 5) for _ in range(40)]
    result = ab.compare(baseline, candidate)
    low, high = result.diff_ci or (0, 0)
    assert low < 30 < high and low > 0
    assert result.ratio_ci is not None and result.ratio_ci[0] < 1.3 < result.ratio_ci[1]
    assert result.p_value is not None and result.p_value < 0.001
    assert result.verdict == ab.SIGNIFICANT
    assert ab.compare(baseline, candidate) == result  # seeded: the same report every time


def test_identical_distributions_are_no_significant_difference() -> None:
    rng = random.Random(11)
    baseline = [rng.gauss(100, 5) for _ in range(40)]
    candidate = [rng.gauss(100, 5) for _ in range(40)]
    result = ab.compare(baseline, candidate)
    low, high = result.diff_ci or (1, 1)
    assert low < 0 < high
    assert result.p_value is not None and result.p_value >= ab.ALPHA
    assert result.verdict == ab.NO_DIFFERENCE
    text = words.verdict_text(result.to_json(), "b", "a")
    assert text.startswith("no significant difference") and "within noise" in text


def test_too_few_samples_gives_medians_and_no_interval() -> None:
    result = ab.compare([10.0, 11.0], [20.0, 21.0, 22.0])
    assert result.verdict == ab.TOO_FEW and result.diff_ci is None and result.p_value is None
    assert result.diff == pytest.approx(10.5) and result.ratio == pytest.approx(2.0)
    assert words.verdict_text(result.to_json(), "b", "a") == "too few samples (n = 3 vs 2)"


@pytest.mark.parametrize(
    ("interval", "p", "expected"),
    [
        ((-1.0, 1.0), 0.5, ab.NO_DIFFERENCE),
        ((1.0, 2.0), 0.01, ab.SIGNIFICANT),
        ((-2.0, -1.0), 0.01, ab.SIGNIFICANT),
        ((1.0, 2.0), 0.2, ab.BORDERLINE),
        ((-1.0, 1.0), 0.01, ab.BORDERLINE),
    ],
)
def test_significance_needs_the_interval_and_the_test_to_agree(
    interval: tuple[float, float], p: float, expected: str
) -> None:
    assert ab.verdict(interval, p) == expected


# ---- inputs and labels ---------------------------------------------------------------------------------------


def test_labels_shared_by_two_runs_get_their_directory_name() -> None:
    labels = unique_labels(
        [("host", Path("/r/a")), ("host", Path("/r/b")), ("qemu", Path("/r/c")), ("host", Path("/s/b"))]
    )
    assert labels == ["a/host", "b/host#1", "qemu", "b/host#2"]
    assert len(set(labels)) == 4


def test_a_comparison_directory_counts_as_its_runs(tmp_path: Path) -> None:
    qemu_like = fixture("bench-host-b")
    qemu_like["backend"]["name"] = "qemu"
    multi = comparison_dir(
        tmp_path / "multi",
        {"qemu": qemu_like, "host": fixture("bench-host-a")},
        [["qemu", "host"], ["host", "qemu"]],
    )
    other = run_copy("bench-host-b", tmp_path / "other")
    runs, rotations, problems = load_inputs([multi, other])
    assert [r.label for r in runs] == ["qemu", "multi/host", "other/host"]
    assert [r.group for r in runs] == [multi.resolve(), multi.resolve(), None]
    assert rotations[0].order == [["qemu", "multi/host"], ["multi/host", "qemu"]]
    assert problems == []


def test_density_is_memtotal_over_the_median_cost(tmp_path: Path) -> None:
    runs, rotations, _ = load_inputs(
        [run_copy("bench-host-a", tmp_path / "a"), run_copy("bench-host-b", tmp_path / "b")]
    )
    comparison = compute_comparison(runs, rotations, resamples=200)
    data = fixture("bench-host-b")
    pss = sorted(s["host_pss_bytes"] for s in data["sandboxes"] if s["ok"])
    by_pss = comparison["density"][1]["bases"][0]
    assert by_pss["cost_bytes"] == pytest.approx(ab.median(pss))
    assert by_pss["sandboxes"] == math.floor(data["host"]["memory_bytes"] / ab.median(pss))
    assert "PSS" in by_pss["by"] and "MemAvailable" in comparison["density"][1]["bases"][1]["by"]


# ---- the CLI and the report ----------------------------------------------------------------------------------


def test_compare_renders_a_report_with_both_runs(tmp_path: Path) -> None:
    a, b = run_copy("bench-host-a", tmp_path / "a"), run_copy("bench-host-b", tmp_path / "b")
    out = tmp_path / "cmp"
    result = invoke("compare", str(a), str(b), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert str(out / "report.html") in result.stderr
    saved = load_results(out)
    assert saved["kind"] == COMPARISON_KIND and saved["what"] == "compare"
    assert [r["dir"] for r in saved["runs"]] == [str(a.resolve()), str(b.resolve())]
    assert [r["label"] for r in saved["runs"]] == ["a/host", "b/host"]
    comparison = saved["comparison"]
    assert comparison["baseline"] == "a/host"
    boot = next(f for f in comparison["figures"] if f["id"] == "boot_ms")
    assert boot["runs"]["a/host"]["n"] == 3 and boot["runs"]["b/host"]["n"] == 6
    assert boot["vs_baseline"]["b/host"]["diff_ci"] is not None  # 3 and 6 samples: enough for an interval
    delta = next(f for f in comparison["figures"] if f["id"] == "mem_available_delta_bytes")
    assert delta["vs_baseline"]["b/host"]["verdict"] == ab.TOO_FEW  # one round against two
    html = (out / "report.html").read_text()
    for text in ("a/host", "b/host", "Boot to agent-ready", "Host PSS per idle sandbox", "Idle density", "fit by PSS"):
        assert text in html
    assert "too few samples (n = 2 vs 1)" in html
    self_contained(html)


def test_flags_may_come_before_between_and_after_the_runs(tmp_path: Path) -> None:
    a, b = run_copy("bench-host-a", tmp_path / "a"), run_copy("bench-host-b", tmp_path / "b")
    result = invoke("compare", "--out", str(tmp_path / "o1"), str(a), "--baseline", "b/host", str(b))
    assert result.returncode == 0, result.stderr
    assert load_results(tmp_path / "o1")["comparison"]["baseline"] == "b/host"
    result = invoke("compare", str(a), str(b), "--out", str(tmp_path / "o1"), "--force")
    assert result.returncode == 0, result.stderr


def test_help_and_list_name_compare() -> None:
    listed = invoke("--list")
    assert listed.returncode == 0 and "compare" in listed.stdout
    helped = invoke("compare", "--help")  # a flag after compare is never taken for a run directory
    assert helped.returncode == 0 and "--baseline" in helped.stdout and "RUN_DIR" in helped.stdout


def test_a_run_against_its_copy_is_no_significant_difference(tmp_path: Path) -> None:
    a, copy = run_copy("bench-host-b", tmp_path / "a"), run_copy("bench-host-b", tmp_path / "copy")
    assert invoke("compare", str(a), str(copy), "--out", str(tmp_path / "cmp")).returncode == 0
    boot = next(f for f in load_results(tmp_path / "cmp")["comparison"]["figures"] if f["id"] == "boot_ms")
    assert boot["vs_baseline"]["copy/host"]["verdict"] == ab.NO_DIFFERENCE
    assert "no significant difference (within noise)" in (tmp_path / "cmp" / "report.html").read_text()


def test_report_of_a_multi_backend_directory_is_a_comparison(tmp_path: Path) -> None:
    """render_report on a run over several backends (which saves no comparison) computes it from the sub-runs,
    and says which sub-run it could not read instead of failing."""
    multi = comparison_dir(
        tmp_path / "multi",
        {"host": fixture("bench-host-a"), "bwrap": fixture("bench-host-b")},
        [["host", "bwrap"], ["bwrap", "host"]],
    )
    html = render_report(multi).read_text()
    assert "blastradius comparison" in html and "host → bwrap" in html and "bwrap → host" in html
    self_contained(html)
    data = load_results(multi)
    write_results(multi, {**data, "partial": True, "interrupted_by": "SIGINT"})
    assert "PARTIAL: this run over several backends was interrupted by SIGINT" in render_report(multi).read_text()
    shutil.rmtree(multi / "bwrap")
    html = render_report(multi).read_text()
    assert "run &#39;bwrap&#39; of" in html and "bwrap: no such directory" in html
    one_line_error(invoke("compare", str(multi), str(run_copy("bench-host-a", tmp_path / "c"))), "bwrap")
    # and `invoke report` goes the same way
    assert invoke("report", str(multi)).returncode == 0


def test_isolation_matrix_colours_each_probe_and_escapes_the_evidence(tmp_path: Path) -> None:
    leaky = fixture("isolation-host")
    tight = fixture("isolation-host")
    tight["backend"]["name"] = "qemu"
    tight["scenario"]["data"]["backend"] = "qemu"
    for card in tight["scenario"]["data"]["scorecards"]:
        for probe in card["probes"]:
            probe["passed"], probe["reason"] = True, "held"
            if probe["id"] == "metadata":
                probe["passed"], probe["reason"] = None, "no metadata route on this backend"
        card["leaks"] = 0
    hostile = "<script>alert(1)</script>"
    leaky["scenario"]["data"]["scorecards"][0]["probes"][0]["reason"] = hostile
    leaky["scenario"]["data"]["scorecards"][0]["probes"][0]["evidence"][0]["output"] = hostile
    a, b = run_copy("", tmp_path / "iso-host", leaky), run_copy("", tmp_path / "iso-qemu", tight)
    out = tmp_path / "cmp"
    assert invoke("compare", str(a), str(b), "--out", str(out)).returncode == 0
    matrix = load_results(out)["comparison"]["isolation"]
    columns = {run["label"]: run for run in matrix["runs"]}
    assert columns["host"]["red"] == 10 and columns["qemu"]["red"] == 0
    assert columns["host"]["cells"]["env"]["verdict"] == "fail"
    assert columns["host"]["cells"]["dns"]["verdict"] == "pass"
    assert columns["qemu"]["cells"]["metadata"]["verdict"] == "n/a"
    html = (out / "report.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "no metadata route on this backend" in html  # an n/a cell says why
    assert '<td class="fail"><b>10 red</b> of 13</td>' in html
    assert html.count('<td class="na">') == 1


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such directory"),
        ("empty-dir", "results.json not found"),
        ("bad-json", "is not JSON"),
        ("one-run", "give at least 2"),
        ("twice", "given twice"),
        ("baseline", "--baseline 'nope' is none of the runs compared; choose one of: a/host, b/host"),
        ("out-of-files", "not a blastradius run"),
        ("out-is-input", "a run being compared"),
        ("out-earlier", "--force"),
        ("none", "give the run directories to compare"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, case: str, message: str) -> None:
    a, b = run_copy("bench-host-a", tmp_path / "a"), run_copy("bench-host-b", tmp_path / "b")
    out = tmp_path / "out"
    runs = [str(a), str(b)]
    extra: list[str] = []
    if case == "missing":
        runs = [str(a), str(tmp_path / "nowhere")]
    elif case == "empty-dir":
        (tmp_path / "empty").mkdir()
        runs = [str(a), str(tmp_path / "empty")]
    elif case == "bad-json":
        (b / "results.json").write_text('{"schema": ')
    elif case == "one-run":
        runs = [str(a)]
    elif case == "twice":
        runs = [str(a), str(tmp_path / "a" / ".." / "a")]
    elif case == "baseline":
        extra = ["--baseline", "nope"]
    elif case == "out-of-files":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "out-is-input":
        out = a
        extra = ["--force"]
    elif case == "out-earlier":
        assert invoke("compare", str(a), str(b), "--out", str(out)).returncode == 0
    elif case == "none":
        runs = []
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    one_line_error(invoke("compare", *runs, "--out", str(out), *extra), message)
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before
    assert (a / "results.json").read_text() == (DATA / "bench-host-a" / "results.json").read_text()


def test_a_broken_comparison_results_json_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"schema": SCHEMA, "kind": COMPARISON_KIND, "run_id": "x"}))
    with pytest.raises(ResultsUnreadable, match="does not conform"):
        load_results(tmp_path)
    one_line_error(invoke("report", str(tmp_path)), "missing top-level key")


# ---- fresh runs ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compare_fresh_host_runs(tmp_path: Path, isolation_comparison: IsolationComparison) -> None:
    """Two real host benches and a real isolation run (the shared comparison's host sub-run), compared."""
    bench = ("bench", "--backend", "host", "--sandboxes", "2", "--no-proxy", "--warmup", "0")
    for name in ("a", "b"):
        assert invoke(*bench, "--out", str(tmp_path / name)).returncode == 0
    iso = isolation_comparison.out / "host"
    result = invoke("compare", str(tmp_path / "a"), str(tmp_path / "b"), str(iso), "--out", str(tmp_path / "cmp"))
    assert result.returncode == 0, result.stderr
    comparison = load_results(tmp_path / "cmp")["comparison"]
    assert [r["label"] for r in comparison["runs"]] == ["a/host", "b/host", "host/host"]
    assert comparison["isolation"]["runs"][0]["red"] > 0  # no isolation on the host backend
    assert any("differ in kind of run" in note for note in comparison["notes"])
    html = (tmp_path / "cmp" / "report.html").read_text()
    self_contained(html)
    # The field evaluation's probes name its own command and outcome in the matrix too.
    dig = next(p for p in comparison["isolation"]["probes"] if p["id"] == "field-dig")
    assert dig["field_evaluation"]["command"] == "dig example.com +short"
    assert "<i>Field evaluation:</i> <code>dig example.com +short</code>" in html
