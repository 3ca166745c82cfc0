"""Proxy latency and capacity: every target side by side, as a benchmark report. The checks first (figure,
limit, measured value with its interval, verdict), then latency per traffic kind over the interleaved rounds,
capacity against concurrency, and the conditions every figure had."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from harness.load.capacity import WORKLOADS
from harness.load.checks import describe_added
from harness.report import Section
from harness.report.charts import LEGEND_OUTSIDE, PALETTE, figure, to_data_uri
from harness.report.format import counts

ORDER = 30
DIRECT = "direct"
KIND_LABEL = {
    "model": "model (https POST, CONNECT)",
    "page": "page (plain http, 1 KiB)",
    "download": "download (plain http)",
    "blocked": "blocked (deny path)",
}
KINDS = tuple(KIND_LABEL)
CHECK_LEVEL = "8"
"""The concurrency whose CPU the capacity table details (the checks' level)."""


def _f(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _ok(proxy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    order = proxy.get("conditions", {}).get("order") or list(proxy.get("targets", {}))
    targets = proxy.get("targets", {})
    return {n: targets[n] for n in order if targets.get(n, {}).get("status") == "ok"}


def _colors(names: list[str]) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def conditions_note(proxy: dict[str, Any]) -> str:
    cond = proxy.get("conditions", {})
    levels = ", ".join(str(c) for c in cond.get("capacity_levels", []))
    return (
        f"Conditions. Paced phase: Locust ({cond.get('workers')} local worker(s)), {cond.get('users')} users x "
        f"{cond.get('user_rps')} req/s = {cond.get('offered_rps')} req/s offered to every target alike, mix "
        f"model 3 : page 1 : download 1 : blocked 1 (page {cond.get('page_bytes')} B, download "
        f"{cond.get('download_bytes')} B, model POST {cond.get('model_body_bytes')} B); {cond.get('rounds')} "
        f"rounds x {len(cond.get('order', []))} targets x {cond.get('duration_s')} s windows, order shuffled per "
        f"round (seed {cond.get('seed')}), first {cond.get('settle_s')} s of each window discarded; intervals: "
        f"95 % paired bootstrap over rounds ({(cond.get('bootstrap') or {}).get('resamples')} resamples, seed "
        f"{cond.get('seed')}). Capacity phase: hey, concurrency {levels}, {cond.get('capacity_s')} s per cell, "
        f"c=8 repeated in {cond.get('capacity_rounds')} rounds (others once), target order shuffled per cell "
        f"group. Upstream: {cond.get('upstream')}. {cond.get('cores')} cores shared by generator, proxy and "
        "nginx, and with anything else running on this host: figures are relative to one another, not absolutes."
    )


def section(data: dict[str, Any], run_dir: Path) -> list[Section] | None:
    """Three parts: the checks (with the conditions), latency over the rounds, capacity."""
    proxy = data.get("proxy")
    if not proxy:
        return None
    ok = _ok(proxy)
    head = Section(title="Proxy bench: checks")
    head.notes.append(conditions_note(proxy))
    if proxy.get("partial"):
        head.notes.append(
            f"PARTIAL: the proxy bench was interrupted by {proxy.get('interrupted_by')}; "
            "only what was measured before is shown."
        )
    for name, t in proxy.get("targets", {}).items():
        if t.get("status") == "skipped":
            head.notes.append(f"{name}: skipped — {t.get('reason')}")
        elif t.get("status") == "failed":
            head.notes.append(f"{name}: FAILED — {t.get('reason')}")
    workers = proxy.get("gateway_workers") or {}
    if workers:
        head.notes.append(f"Gateway workers figure: {workers.get('status')} — {workers.get('reason')}.")
    checks = proxy.get("checks", [])
    if checks:
        head.tables.append(
            (
                "Checks (benchmark targets, not tests): the verdict comes from the 95 % interval — pass or fail "
                "only when the whole interval is on one side of the limit, else within noise",
                ["check", "what it compared", "limit", "measured (95 % interval)", "verdict"],
                [
                    [
                        c["name"],
                        c.get("compared", ""),
                        c.get("limit", ""),
                        c.get("measured") or "—",
                        c["verdict"].upper() + (f" ({c['reason']})" if c.get("reason") else ""),
                    ]
                    for c in checks
                ],
            )
        )
    sections = [head]
    if ok and any(t.get("traffic") for t in ok.values()):
        sections.append(_latency_section(proxy, ok))
    if any(t.get("capacity") for t in ok.values()):
        sections.append(_capacity_section(ok))
    return sections


def _latency_section(proxy: dict[str, Any], ok: dict[str, dict[str, Any]]) -> Section:
    part = Section(title="Proxy latency under the same paced load (Locust)")
    for name, t in ok.items():
        if t.get("generator_saturated"):
            part.notes.append(
                f"{name}: a Locust process was above 90 % of a core in its windows: its figures are partly the "
                "generator's."
            )
    part.tables.append(
        (
            "Added p50 over direct per traffic kind: median over rounds of each window's p50 minus direct's, "
            "95 % interval; an interval containing 0 is within noise",
            ["target", *[KIND_LABEL[k] for k in KINDS]],
            [
                [
                    name,
                    *[
                        "baseline"
                        if name == DIRECT
                        else describe_added(
                            (((t.get("traffic") or {}).get(k) or {}).get("added_latency_ms") or {}).get("p50")
                        )
                        for k in KINDS
                    ],
                ]
                for name, t in ok.items()
            ],
        )
    )
    part.charts.append(
        (
            "Each dot is one round's window p50 of that target; the bar is the median over rounds. Same users, "
            "same mix and offered rate for every target, interleaved.",
            _latency_chart(ok),
        )
    )
    part.tables.append(_latency_table(ok))
    guest = proxy.get("in_guest") or {}
    if guest:
        part.tables.append(_guest_table(guest))
        part.notes.append(
            "In-guest figures include the guest's own network stack and, under TCG, software emulation of every "
            "instruction: far slower than the host-side figures, by design of the accelerator, not of the gateway."
        )
    return part


def _capacity_section(ok: dict[str, dict[str, Any]]) -> Section:
    part = Section(title="Proxy capacity (hey)")
    first = [f"{name}: {line}" for name, t in ok.items() for line in t.get("capacity_notes") or []]
    if first:
        part.notes.append(
            "The generator saturated before the proxy (hey took the biggest CPU share of a full host at a lower "
            "concurrency than the proxy pegged its core), so these capacities are the generator's limit, not "
            "the proxy's: " + "; ".join(first) + "."
        )
    part.notes.append(
        "hey writes latencies with 0.1 ms resolution and lists no transport errors in its CSV: a cell's rate "
        "counts 2xx responses after the last connection was dialled; non-2xx answers are counted apart."
    )
    part.charts.append(
        (
            "Responses per second against concurrent connections, median over rounds; log-log. A flat line is a "
            "saturated proxy (or generator: see the CPU table).",
            _capacity_chart(ok),
        )
    )
    part.tables.append(_capacity_table(ok))
    part.tables.append(_cpu_table(ok))
    return part


def _latency_chart(ok: dict[str, dict[str, Any]]) -> str:
    names = list(ok)
    kinds = [k for k in KINDS if any(k in (t.get("traffic") or {}) for t in ok.values())]
    with figure(height=2.6 * max(1, (len(kinds) + 1) // 2)) as fig:
        axes = fig.subplots((len(kinds) + 1) // 2, 2, squeeze=False).flatten()
        for ax, kind in zip(axes, kinds, strict=False):
            for x, name in enumerate(names):
                rounds = ((ok[name].get("traffic") or {}).get(kind) or {}).get("rounds") or []
                values = [r["p50"] for r in rounds if r.get("p50") is not None]
                if not values:
                    continue
                ax.plot([x] * len(values), values, "o", color=PALETTE[x % len(PALETTE)], alpha=0.55, markersize=4)
                mid = statistics.median(values)
                ax.plot([x - 0.3, x + 0.3], [mid, mid], "-", color="#222", linewidth=1.5)
            ax.set_xticks(range(len(names)), names, fontsize="x-small", rotation=20)
            ax.set_yscale("log")
            ax.set_ylabel("p50 ms (log)", fontsize="small")
            ax.set_title(KIND_LABEL[kind], fontsize="small")
        for ax in axes[len(kinds) :]:
            ax.set_visible(False)
        return to_data_uri(fig)


def _capacity_chart(ok: dict[str, dict[str, Any]]) -> str:
    colors = _colors(list(ok))
    with figure(height=3.0) as fig:
        axes = fig.subplots(1, len(WORKLOADS), squeeze=False)[0]
        for ax, (workload, label) in zip(axes, WORKLOADS.items(), strict=True):
            for name, t in ok.items():
                levels = ((t.get("capacity") or {}).get(workload)) or {}
                points = sorted((int(c), e["rps"]) for c, e in levels.items() if e.get("rps"))
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=colors[name], label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("concurrent connections", fontsize="small")
            ax.set_title(label, fontsize="small")
        axes[0].set_ylabel("responses/s (log)")
        # One legend for all panels: gateway-intercept is only in the CONNECT panel.
        legend: dict[str, Any] = {}
        for ax in axes:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                legend.setdefault(label, handle)
        if legend:
            axes[-1].legend(list(legend.values()), list(legend), **LEGEND_OUTSIDE)
        return to_data_uri(fig)


def _latency_table(ok: dict[str, dict[str, Any]]) -> tuple[str, list[str], list[list[Any]]]:
    rows: list[list[Any]] = []
    for name, t in ok.items():
        for kind in KINDS:
            fig = (t.get("traffic") or {}).get(kind)
            if not fig:
                continue
            lat = fig.get("latency_ms") or {}
            fails = ", ".join(f"{k}: {v}" for k, v in (fig.get("failures") or {}).items()) or "0"
            rows.append(
                [
                    name,
                    kind,
                    fig.get("requests"),
                    fails,
                    _f(fig.get("rps"), 1),
                    *[_f(lat.get(p)) for p in ("p50", "p90", "p99", "p99.9", "max")],
                ]
            )
    return (
        "Latency of successful requests (ms), pooled over each target's windows (paced phase)",
        ["target", "kind", "requests", "failures", "req/s", "p50", "p90", "p99", "p99.9", "max"],
        rows,
    )


def _capacity_table(ok: dict[str, dict[str, Any]]) -> tuple[str, list[str], list[list[Any]]]:
    levels = sorted({int(c) for t in ok.values() for per in (t.get("capacity") or {}).values() for c in per}, key=int)
    rows: list[list[Any]] = []
    for workload, label in WORKLOADS.items():
        for name, t in ok.items():
            per = (t.get("capacity") or {}).get(workload)
            if not per:
                continue
            cells = []
            for c in levels:
                e = per.get(str(c)) or {}
                cells.append(
                    "—"
                    if e.get("rps") is None
                    else f"{e['rps']:,.0f} · {_f(e.get('p50_ms'), 1)}/{_f(e.get('p99_ms'), 1)}"
                )
            rows.append([label, name, *cells])
    return (
        "Capacity (hey): responses/s · p50/p99 ms, median over rounds, per concurrency",
        ["workload", "target", *[f"c={c}" for c in levels]],
        rows,
    )


def _cpu_table(ok: dict[str, dict[str, Any]]) -> tuple[str, list[str], list[list[Any]]]:
    rows: list[list[Any]] = []
    for workload, label in WORKLOADS.items():
        for name, t in ok.items():
            e = ((t.get("capacity") or {}).get(workload) or {}).get(CHECK_LEVEL)
            if not e:
                continue
            rows.append(
                [
                    label,
                    name,
                    _f(e.get("generator_cpu"), 0),
                    _f(e.get("proxy_cpu"), 0),
                    _f(e.get("upstream_cpu"), 0),
                    _f(e.get("host_cpu"), 0),
                    e.get("limit"),
                    e.get("non_2xx"),
                ]
            )
    return (
        f"CPU at c={CHECK_LEVEL} (% of one core; host: all cores, 100 per core) and what bounded the cell",
        ["workload", "target", "hey", "proxy", "nginx", "host", "limit", "non-2xx"],
        rows,
    )


def _guest_table(guest: dict[str, Any]) -> tuple[str, list[str], list[list[Any]]]:
    rows = []
    for sandbox, g in guest.items():
        lat = g.get("latency_ms") or {}
        rows.append(
            [
                sandbox,
                g.get("url"),
                g.get("n"),
                g.get("ok"),
                counts(g.get("failures")),
                *[_f(lat.get(p), 1) for p in ("p50", "p95", "p99", "max")],
                _f(g.get("clock_overhead_ms"), 1),
            ]
        )
    return (
        "Seen from inside each sandbox (busybox nc through the gateway, ms)",
        ["sandbox", "url", "n", "ok", "failures", "p50", "p95", "p99", "max", "clock overhead subtracted"],
        rows,
    )
