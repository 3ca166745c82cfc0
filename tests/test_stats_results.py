"""Percentiles, the results schema, and report rendering from results.json alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.metrics.stats import percentile, summarize
from harness.report import render_report
from harness.results import SCHEMA, host_info, load_results, validate, write_results
from harness.run import summarize_run
from harness.sandbox.base import SandboxRecord


def test_percentile_interpolates() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 99) == 10
    assert percentile(list(range(101)), 95) == 95
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_spread() -> None:
    stats = summarize([100.0, 200.0, 300.0])
    assert stats["n"] == 3 and stats["p50"] == 200.0 and stats["min"] == 100.0 and stats["max"] == 300.0
    assert stats["stdev"] == 100.0
    assert summarize([])["p50"] is None


def sandbox(i: int, ok: bool = True) -> dict:
    return {
        "id": f"r0-sb{i}",
        "round": 0,
        "ok": ok,
        "error": None if ok else "agent did not answer within 1 s",
        "boot_ms": 1000.0 + i * 100 if ok else None,
        "phases_ms": {"vmm": 400.0, "kernel": 400.0, "userspace": 100.0, "agent": 100.0 + i * 100} if ok else {},
        "marks_ms": {},
        "host_rss_bytes": 150 << 20 if ok else None,
        "host_pss_bytes": (140 + i) << 20 if ok else None,
        "host_uss_bytes": 130 << 20 if ok else None,
        "guest_mem_total_bytes": 97 << 20 if ok else None,
        "guest_mem_free_bytes": 60 << 20 if ok else None,
    }


def results(partial: bool = False) -> dict:
    data = {
        "schema": SCHEMA,
        "run_id": "test",
        "created": "now",
        "partial": partial,
        "interrupted_by": "SIGTERM" if partial else None,
        "host": host_info(),
        "backend": {"name": "qemu", "accel_reason": "test"},
        "accel": "tcg",
        "config": {"sandboxes": 3, "concurrency": 2, "warmup": 0, "repeat": 1, "mem_mib": 128, "idle_settle_s": 2},
        "rounds": [{"index": 0, "measured": True, "mem_available_delta_bytes_per_sandbox": 150 << 20}],
        "sandboxes": [sandbox(0), sandbox(1), sandbox(2, ok=False)],
        "files": {"memory_samples": "mem.jsonl"},
    }
    data["summary"] = summarize_run([SandboxRecord(**s) for s in data["sandboxes"]], data["rounds"])
    return data


def test_summary_counts_failures() -> None:
    summary = results()["summary"]
    assert summary["success_rate"] == pytest.approx(2 / 3, abs=1e-3)
    assert summary["failures"] == 1
    assert summary["boot_ms"]["p50"] == 1050.0
    assert summary["pss_bytes_per_sandbox_p50"] == pytest.approx(140.5 * (1 << 20))
    assert summary["mem_available_delta_bytes_per_sandbox"] == 150 << 20


def test_validate_names_what_is_missing() -> None:
    data = results()
    assert validate(data) == []
    del data["sandboxes"][0]["boot_ms"]
    del data["host"]
    data["schema"] = "other/v0"
    problems = validate(data)
    assert any("boot_ms" in p for p in problems)
    assert any("host" in p for p in problems)
    assert any("schema" in p for p in problems)


def test_report_renders_from_results_only(tmp_path: Path) -> None:
    write_results(tmp_path, results(partial=True))
    samples = [
        {
            "t_s": t * 0.5,
            "mem_available_bytes": (20000 - t) << 20,
            "psi": {"some_avg10": 0.0, "full_avg10": 0.0, "some_total": 0, "full_total": 0},
            "sandbox_rss_bytes": {"r0-sb0": 1},
        }
        for t in range(10)
    ]
    (tmp_path / "mem.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n{torn")
    html = render_report(tmp_path).read_text()
    assert load_results(tmp_path)["partial"] is True
    assert "PARTIAL RUN" in html and "SIGTERM" in html
    assert html.count("data:image/png;base64,") >= 3  # phases, memory per sandbox, memory over time
    assert "agent did not answer within 1 s" in html
    assert "tcg" in html
