"""Proxy latency under load: every target side by side, with the conditions each figure had."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report import Section
from harness.report.charts import PALETTE, figure, grouped_bars, time_series, to_data_uri

ORDER = 30
DIRECT = "direct"
KIND_LABEL = {"model": "model (https, CONNECT)", "download": "download (plain http)", "blocked": "blocked (deny path)"}


def _f(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ok(proxy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    order = proxy.get("conditions", {}).get("order") or list(proxy.get("targets", {}))
    targets = proxy.get("targets", {})
    return {n: targets[n] for n in order if targets.get(n, {}).get("status") == "ok" and targets[n].get("latency_ms")}


def _rps_vs_users(ok: dict[str, dict[str, Any]]) -> str:
    with figure() as fig:
        ax = fig.add_subplot()
        for color, (name, t) in zip(PALETTE * 2, ok.items(), strict=False):
            points = [(row[1], row[2]) for row in t.get("history", []) if row[1] > 0]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], ".", color=color, alpha=0.5, label=name)
            sat = t.get("saturation")
            if sat and sat.get("rps") is not None:
                ax.plot([sat["users"]], [sat["rps"]], "*", color=color, markersize=12, label=f"{name} closed loop")
        ax.set_xlabel("Locust users")
        ax.set_ylabel("requests/s")
        ax.set_title("Throughput vs users (dots: paced ramp and run, 1 s; stars: closed-loop saturation)")
        ax.legend(loc="upper left", fontsize="x-small", ncols=2)
        return to_data_uri(fig)


def section(data: dict[str, Any], run_dir: Path) -> Section | None:
    proxy = data.get("proxy")
    if not proxy:
        return None
    result = Section(title="Proxy latency under load")
    cond = proxy.get("conditions", {})
    ok = _ok(proxy)
    result.notes.append(
        f"Conditions: {cond.get('users')} Locust users at {cond.get('user_rps')} req/s each (offered "
        f"{cond.get('offered_rps')} req/s), {cond.get('duration_s')} s measured after {cond.get('warmup_s')} s "
        f"warm-up per target; closed-loop phase {cond.get('saturation_users')} users for "
        f"{cond.get('saturation_s')} s; {cond.get('workers')} local Locust worker(s); {cond.get('cores')} cores "
        f"shared by generator, proxy and upstream (all on loopback); traffic {', '.join(cond.get('traffic', []))}; "
        f"target order {' → '.join(cond.get('order', []))} (seed {cond.get('seed')})."
    )
    if proxy.get("partial"):
        result.notes.append(
            f"PARTIAL: the proxy bench was interrupted by {proxy.get('interrupted_by')}; "
            "only the targets listed were measured."
        )
    for name, t in proxy.get("targets", {}).items():
        if t.get("status") == "skipped":
            result.notes.append(f"{name}: skipped — {t.get('reason')}")
        elif t.get("status") == "failed":
            result.notes.append(f"{name}: FAILED — {t.get('reason')}")
    for name, t in ok.items():
        bound = [
            phase
            for phase, flag in (
                ("paced", t.get("generator_saturated")),
                ("closed-loop", (t.get("saturation") or {}).get("generator_saturated")),
            )
            if flag
        ]
        if bound:
            result.notes.append(
                f"{name}: the load generator was saturated (> 90 % of a core) in the "
                f"{' and '.join(bound)} phase: that figure is generator-bound, not proxy-bound."
            )
        if t.get("host_saturated") or (t.get("saturation") or {}).get("host_saturated"):
            result.notes.append(f"{name}: the host's CPUs were > 90 % busy during the run: figures are host-bound.")

    for check in proxy.get("checks", []):
        result.notes.append(_check_note(check))

    if ok:
        labels = list(ok)
        result.charts.append(
            (
                "Latency of successful requests in the paced phase, all traffic kinds together.",
                grouped_bars(
                    labels,
                    {p: [t["latency_ms"][p] or 0.0 for t in ok.values()] for p in ("p50", "p95", "p99")},
                    "ms",
                    "Latency percentiles per target",
                ),
            )
        )
        timeline = {n: t.get("timeline", []) for n, t in ok.items() if t.get("timeline")}
        if timeline:
            result.charts.append(
                (
                    "Per second of the paced phase, warm-up included (from the first request).",
                    time_series(
                        [
                            (
                                "p50 ms",
                                {
                                    n: (
                                        [r[0] for r in rows if r[2] is not None],
                                        [r[2] for r in rows if r[2] is not None],
                                    )
                                    for n, rows in timeline.items()
                                },
                            ),
                            (
                                "p95 ms",
                                {
                                    n: (
                                        [r[0] for r in rows if r[3] is not None],
                                        [r[3] for r in rows if r[3] is not None],
                                    )
                                    for n, rows in timeline.items()
                                },
                            ),
                            (
                                "requests/s",
                                {n: ([r[0] for r in rows], [r[1] for r in rows]) for n, rows in timeline.items()},
                            ),
                        ],
                        "seconds since the first request",
                        "Latency over time per target",
                    ),
                )
            )
        result.charts.append(("Requests/s against the number of running users.", _rps_vs_users(ok)))
        others = [n for n in ok if n != DIRECT]
        series: dict[str, list[float]] = {}
        for kind in ("download", "model"):
            for pct in ("p50", "p99"):
                values = [((ok[n]["traffic"].get(kind) or {}).get("added_latency_ms") or {}).get(pct) for n in others]
                if any(v is not None for v in values):
                    series[f"{kind} {pct}"] = [v or 0.0 for v in values]
        if others and series:
            result.charts.append(
                (
                    "Target latency minus direct latency, same load, same upstream, same run.",
                    grouped_bars(others, series, "ms added", "Added latency vs direct"),
                )
            )

    header = [
        "target",
        "status",
        "kind",
        "requests",
        "failures",
        "rps",
        "p50",
        "p90",
        "p95",
        "p99",
        "p99.9",
        "max",
        "added p50",
        "added p99",
        "closed-loop rps",
        "generator CPU %",
        "proxy CPU %",
        "host CPU %",
        "generator-bound",
        "users",
        "duration s",
        "workers",
        "cores",
    ]
    rows: list[list[Any]] = []
    for name, t in proxy.get("targets", {}).items():
        if t.get("status") != "ok":
            rows.append([name, t.get("status"), "", "", "", "", *[""] * 8, "", "", "", "", "", "", "", "", "", ""])
            continue
        cpu = t.get("cpu") or {}
        sat = t.get("saturation") or {}
        conditions = [cond.get("users"), cond.get("duration_s"), cond.get("workers"), cond.get("cores")]
        gen = [
            _f((cpu.get("generator") or {}).get("mean_pct"), 0),
            _f((cpu.get("proxy") or {}).get("mean_pct"), 0),
            _f((cpu.get("host") or {}).get("mean_pct"), 0),
            "yes" if t.get("generator_saturated") else "no",
        ]
        kinds = [("all", t, t.get("added_latency_ms"))] + [
            (k, f, f.get("added_latency_ms")) for k, f in t.get("traffic", {}).items()
        ]
        for kind, fig, add in kinds:
            lat = fig.get("latency_ms") or {}
            fails = ", ".join(f"{k}: {v}" for k, v in (fig.get("failures") or {}).items()) or "0"
            rows.append(
                [
                    name,
                    t.get("status"),
                    KIND_LABEL.get(kind, kind),
                    fig.get("requests"),
                    fails,
                    _f(fig.get("rps"), 1),
                    *[_f(lat.get(p)) for p in ("p50", "p90", "p95", "p99", "p99.9", "max")],
                    _f((add or {}).get("p50")),
                    _f((add or {}).get("p99")),
                    _f(sat.get("rps"), 0) if kind == "all" else "",
                    *(gen if kind == "all" else ["", "", "", ""]),
                    *(conditions if kind == "all" else [""] * 4),
                ]
            )
    result.tables.append(("Every figure, latency in ms (successful requests), with its conditions", header, rows))

    guest = proxy.get("in_guest") or {}
    if guest:
        grows = []
        for sandbox, g in guest.items():
            lat = g.get("latency_ms") or {}
            grows.append(
                [
                    sandbox,
                    g.get("url"),
                    g.get("n"),
                    g.get("ok"),
                    g.get("failures"),
                    *[_f(lat.get(p), 1) for p in ("p50", "p95", "p99", "max")],
                    _f(g.get("clock_overhead_ms"), 1),
                ]
            )
        result.tables.append(
            (
                "Seen from inside each sandbox (busybox nc through the gateway, ms)",
                ["sandbox", "url", "n", "ok", "failures", "p50", "p95", "p99", "max", "clock overhead subtracted"],
                grows,
            )
        )
        result.notes.append(
            "In-guest figures include the guest's own network stack and, under TCG, software "
            "emulation of every instruction: they are far slower than the host-side figures "
            "above, by design of the accelerator, not of the gateway."
        )
    return result


def _check_note(check: dict[str, Any]) -> str:
    """One target check in words: the two figures it compares, their ratio, or why it has none."""
    figures = [
        f"{key.rsplit('_', 1)[0]} {value:g} {key.rsplit('_', 1)[1]}"
        for key, value in check.items()
        if key.endswith(("_ms", "_rps")) and isinstance(value, (int, float))
    ]
    ratio = check.get("ratio")
    if ratio is not None:
        figures.append(f"ratio {ratio}x")
    elif figures:
        figures.append("no ratio: the peer's figure is not above zero (within the noise of direct)")
    if check.get("reason"):
        figures.append(str(check["reason"]))
    return f"Target — {check['name']} {check['limit']}: {check['status'].upper()} ({'; '.join(figures)})"
