"""Host memory: per-sandbox RSS/PSS/USS of its host processes, MemAvailable delta, MemAvailable and PSI over
the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.metrics.memory import read_samples
from harness.report import Section
from harness.report.charts import grouped_bars, time_series
from harness.report.format import MIB, mib

ORDER = 20

PSS_TARGET_MIB = 96.0
"""Issue #2's target for host PSS per idle sandbox under TCG."""


def section(data: dict[str, Any], run_dir: Path) -> Section | None:
    summary = data["summary"]
    result = Section(title="Host memory")
    measured = [s for s in data["sandboxes"] if s["ok"] and s["host_pss_bytes"] is not None]
    if measured:
        pss_p50 = summary["pss_bytes_per_sandbox_p50"]
        verdict = "meets" if pss_p50 / MIB <= PSS_TARGET_MIB else "misses"
        result.notes.append(
            f"Idle host PSS per sandbox (every host process of it: {_processes(data)}) p50 {mib(pss_p50)} "
            f"({verdict} the {PSS_TARGET_MIB:.0f} MiB target); "
            f"host MemAvailable fell by {mib(summary['mem_available_delta_bytes_per_sandbox'])} per sandbox "
            f"with all N idle, read {data['config'].get('idle_settle_s')} s after the last boot."
        )
        result.tables.append(_side_by_side(data))
        labels = [s["id"] for s in measured]
        result.charts.append(
            (
                "Memory of each sandbox's host processes with all N idle.",
                grouped_bars(
                    labels,
                    {key.upper(): [s[f"host_{key}_bytes"] / MIB for s in measured] for key in ("rss", "pss", "uss")},
                    "MiB",
                    "Host memory per sandbox",
                    hline=(PSS_TARGET_MIB, "PSS target"),
                ),
            )
        )
        rows = [
            [
                s["id"],
                mib(s["host_rss_bytes"]),
                mib(s["host_pss_bytes"]),
                mib(s["host_uss_bytes"]),
                mib(s["guest_mem_total_bytes"]),
                mib(s.get("guest_mem_free_bytes")),
            ]
            for s in measured
        ]
        result.tables.append(("Per sandbox", ["sandbox", "RSS", "PSS", "USS", "guest MemTotal", "guest MemFree"], rows))
    elif any(s["ok"] for s in data["sandboxes"]):
        why = str(data["backend"].get("host_memory", ""))
        if why.startswith("n/a"):
            result.notes.append(f"Host memory per sandbox: {why}.")
        elif data.get("scenario"):
            # A scenario measures memory in its own steps (if at all), not the bench's idle read.
            result.notes.append(
                "Idle host memory per sandbox is the bench's figure; this scenario's own section says what it measured."
            )
        else:
            result.notes.append("Host memory per sandbox: n/a: the backend named no host process of any sandbox.")
    samples = read_samples(run_dir / data.get("files", {}).get("memory_samples", "memory-samples.jsonl"))
    if samples:
        times = [s["t_s"] for s in samples]
        panels: list[tuple[str, dict[str, tuple[list[float], list[float]]]]] = [
            ("MemAvailable (MiB)", {"MemAvailable": (times, [s["mem_available_bytes"] / MIB for s in samples])}),
            ("live sandboxes", {"N": (times, [len(s["sandbox_rss_bytes"]) for s in samples])}),
        ]
        with_psi = [s for s in samples if s.get("psi")]
        if with_psi:
            panels.insert(
                1,
                (
                    "memory PSI avg10 (%)",
                    {
                        "some": ([s["t_s"] for s in with_psi], [s["psi"]["some_avg10"] for s in with_psi]),
                        "full": ([s["t_s"] for s in with_psi], [s["psi"]["full_avg10"] for s in with_psi]),
                    },
                ),
            )
        else:
            result.notes.append("This kernel exposes no /proc/pressure/memory; PSI is not charted.")
        result.charts.append(
            (
                f"Sampled every ~{times[1] - times[0] if len(times) > 1 else 0:.1f} s over the "
                "whole run, warm-ups included.",
                time_series(panels, "seconds since sampling started", "Host memory over the run"),
            )
        )
    if not result.charts and not result.notes:
        return None
    return result


def _side_by_side(data: dict[str, Any]) -> tuple[str, list[str], list[list[Any]]]:
    """PSS, USS, the shared files' resident pages and the MemAvailable Δ per sandbox in one table, since
    with shared pages no one of them is the cost: RSS counts shared pages whole, USS not at all, PSS a
    share, and MemAvailable misses what was resident before the round."""
    summary, config = data["summary"], data["config"]
    pss, uss = summary.get("pss_bytes_per_sandbox") or {}, summary.get("uss_bytes_per_sandbox") or {}
    shared = summary.get("shared_file_resident_bytes")
    rows = [
        ["PSS (p50, min-max)", _spread(pss), "its share of every page it maps"],
        ["USS (p50, min-max)", _spread(uss), "what stopping it would free; shared pages not at all"],
        [
            "shared template RAM file, resident",
            mib(shared) if shared is not None else "none (no file-backed template)",
            "paid once, however many sandboxes map it; resident before each round, so in no Δ",
        ],
        [
            "MemAvailable Δ per sandbox (mean of rounds)",
            mib(summary.get("mem_available_delta_bytes_per_sandbox")),
            "the marginal cost of one more sandbox, as the host saw it; moves with everything else on the host",
        ],
        [
            "MemAvailable Δ + resident template ÷ N",
            mib(summary.get("mem_available_delta_with_shared_bytes_per_sandbox")),
            "the same with the shared file counted once",
        ],
        [
            "host memory per sandbox: PSS without the template + resident template ÷ N (used for density)",
            mib(summary.get("host_bytes_per_sandbox")),
            "the density projection's figure: every page once (the template whole, mapped or not), unmoved by "
            "the rest of the host",
        ],
    ]
    merged = [r["ksm"] for r in data.get("rounds", []) if r.get("measured") and r.get("ksm")]
    if merged:
        last = merged[-1]
        rows.append(
            [
                "KSM, last measured round",
                f"{last.get('pages_sharing', 0) * 4096 / MIB:.1f} MiB saved",
                f"pages_sharing {last.get('pages_sharing')} onto pages_shared {last.get('pages_shared')} (4 KiB "
                f"pages), read after {last.get('full_scans')} full scans in all, {last.get('waited_s')} s of waiting; "
                "PSS already splits the merged pages",
            ]
        )
    sharing = config.get("memory_sharing", "off")
    return (f"Per idle sandbox, memory sharing {sharing}, N={config.get('sandboxes', '—')}", ["", "", ""], rows)


def _spread(stats: dict[str, Any]) -> str:
    if not stats or stats.get("p50") is None:
        return "—"
    return f"{mib(stats['p50'])} ({mib(stats['min'])}-{mib(stats['max'])})"


def _processes(data: dict[str, Any]) -> str:
    """What a sandbox's host processes are on this backend, in words."""
    return {"qemu": "the VMM", "host": "the agent listener and what it runs"}.get(
        data["backend"].get("name", ""), "as its backend counts them"
    )
