"""The bench's targets (issue 15), checked with intervals. Benchmark figures for the report, not timed tests.

Each check says what it compared, its limit, the measured value with its interval, and a verdict:
  pass          the whole interval is on the right side of the limit
  fail          the whole interval is on the wrong side
  within noise  the interval straddles the limit: this run cannot tell
  skipped       a figure it needs is missing (with why)
Intervals are paired bootstraps over rounds (harness.load.intervals): latency over the paced rounds, capacity
over the capacity rounds at CAPACITY_LEVEL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from harness.load.capacity import WORKLOADS
from harness.load.intervals import bootstrap, median_of

ADDED_P50_VS_SQUID = 1.0
"""The gateway's added p50 at most this many times squid's, per workload."""
CAPACITY_VS_SQUID = 1.0
"""The gateway's capacity at CAPACITY_LEVEL at least this many times squid's, per workload."""
CAPACITY_LEVEL = 8
"""hey's concurrency of the capacity checks."""
INTERCEPT_VS_MITMPROXY = 5.0
"""gateway-intercept's capacity (CONNECT, TLS terminated, key injected) at least this many times mitmproxy's."""
INTERCEPT_ADDED_P50_MS = 3.0
"""gateway-intercept's added p50 on model traffic at most this."""
KIND_WORKLOAD = (("page", "http-1k"), ("download", "http-256k"), ("model", "connect-1k"))
"""Paced traffic kind and capacity workload of each of the three workloads the targets name."""

PASS, FAIL, NOISE, SKIPPED = "pass", "fail", "within noise", "skipped"


def _per_round_latency(target: dict[str, Any], kind: str, n: int) -> list[float | None] | None:
    fig = (target.get("traffic") or {}).get(kind)
    if not fig:
        return None
    out: list[float | None] = [None] * n
    for row in fig.get("rounds", []):
        if row["round"] < n:
            out[row["round"]] = row.get("p50")
    return out


def _per_round_rps(target: dict[str, Any], workload: str, level: int) -> list[float | None] | None:
    cell = ((target.get("capacity") or {}).get(workload) or {}).get(str(level))
    if not cell:
        return None
    rounds = cell.get("rounds", [])
    out: list[float | None] = [None] * (max((r["round"] for r in rounds), default=-1) + 1)
    for row in rounds:
        out[row["round"]] = row.get("rps")
    return out


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}x" if unit == "x" else f"{value:+.2f} ms"


def _interval(ci: Sequence[float] | None, unit: str) -> str:
    if ci is None:
        return "no interval"
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]{'x' if unit == 'x' else ' ms'}"


def describe_added(added: dict[str, Any] | None) -> str:
    """An added-latency figure in words: never a negative overhead as a number."""
    if not added or added.get("estimate") is None:
        return "—"
    verdict, ci = added.get("verdict"), added.get("ci")
    if verdict == "within noise":
        return f"within noise {_interval(ci, 'ms')}"
    if verdict == "below direct":
        return f"below direct {_interval(ci, 'ms')}"
    if verdict == "no interval":
        return (
            "no interval (too few rounds)"
            if added["estimate"] < 0
            else f"{_fmt(added['estimate'], 'ms')} (no interval)"
        )
    return f"{_fmt(added['estimate'], 'ms')} {_interval(ci, 'ms')}"


def _verdict(ci: Sequence[float] | None, limit: float, upper: bool) -> str:
    """upper: the figure must be <= limit; else >= limit."""
    if ci is None:
        return NOISE
    lo, hi = ci
    if upper:
        return PASS if hi <= limit else FAIL if lo > limit else NOISE
    return PASS if lo >= limit else FAIL if hi < limit else NOISE


def _skip(check: dict[str, Any], reason: str) -> dict[str, Any]:
    return {**check, "verdict": SKIPPED, "reason": reason, "estimate": None, "ci": None, "measured": "—"}


def checks(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every check of the run, in report order."""
    targets = data.get("targets", {})
    cond = data.get("conditions", {})
    n, seed = int(cond.get("rounds") or 0), int(cond.get("seed") or 0)
    ok = {name: t for name, t in targets.items() if t.get("status") == "ok"}
    paced_how = f"window p50 minus direct's, median of {n} interleaved Locust rounds (same load for all)"
    out: list[dict[str, Any]] = []
    labels = {"page": WORKLOADS["http-1k"], "download": _download_label(cond), "model": WORKLOADS["connect-1k"]}
    for kind, _workload in KIND_WORKLOAD:
        check = {
            "name": f"gateway added p50 vs squid — {labels[kind]}",
            "figure": "added p50 (ms over direct)",
            "compared": f"gateway against squid: {paced_how}; interval of gateway's - {ADDED_P50_VS_SQUID:g} x squid's",
            "limit": f"≤ {ADDED_P50_VS_SQUID:g}x squid's",
            "unit": "ms",
        }
        out.append(_added_vs(check, ok, "gateway", "squid", kind, n, seed))
    for _kind, workload in KIND_WORKLOAD:
        check = {
            "name": f"gateway capacity vs squid — {WORKLOADS[workload]}, c={CAPACITY_LEVEL}",
            "figure": "requests/s (hey)",
            "compared": f"gateway's rps over squid's at {CAPACITY_LEVEL} connections, median over the capacity rounds",
            "limit": f"≥ {CAPACITY_VS_SQUID:g}x squid's",
            "unit": "x",
        }
        out.append(_capacity_vs(check, ok, "gateway", "squid", workload, CAPACITY_VS_SQUID, seed))
    check = {
        "name": f"gateway-intercept capacity vs mitmproxy — {WORKLOADS['connect-1k']}, c={CAPACITY_LEVEL}",
        "figure": "requests/s (hey)",
        "compared": f"both terminate TLS; rps at {CAPACITY_LEVEL} connections, median over the capacity rounds",
        "limit": f"≥ {INTERCEPT_VS_MITMPROXY:g}x mitmproxy's",
        "unit": "x",
    }
    out.append(_capacity_vs(check, ok, "gateway-intercept", "mitmproxy", "connect-1k", INTERCEPT_VS_MITMPROXY, seed))
    check = {
        "name": "gateway-intercept added p50 — model (CONNECT, TLS terminated, key injected)",
        "figure": "added p50 (ms over direct)",
        "compared": paced_how,
        "limit": f"≤ {INTERCEPT_ADDED_P50_MS:g} ms",
        "unit": "ms",
    }
    gi = ok.get("gateway-intercept")
    added = (((gi or {}).get("traffic") or {}).get("model") or {}).get("added_latency_ms")
    if not gi or not added or added["p50"].get("estimate") is None:
        out.append(_skip(check, "needs gateway-intercept and direct with model traffic in the run"))
    else:
        fig = added["p50"]
        out.append(
            {
                **check,
                "estimate": fig["estimate"],
                "ci": fig["ci"],
                "measured": describe_added(fig),
                "verdict": _verdict(fig["ci"], INTERCEPT_ADDED_P50_MS, upper=True),
            }
        )
    return out


def _download_label(cond: dict[str, Any]) -> str:
    size = int(cond.get("download_bytes") or 0)
    return f"plain http, {size // 1024} KiB" if size % 1024 == 0 else f"plain http, {size} B"


def _added_vs(
    check: dict[str, Any], ok: dict[str, Any], name: str, peer: str, kind: str, n: int, seed: int
) -> dict[str, Any]:
    series = {t: _per_round_latency(ok[t], kind, n) if t in ok else None for t in (name, peer, "direct")}
    missing = [t for t, v in series.items() if v is None]
    if missing:
        return _skip(check, f"no {kind} figures of {', '.join(missing)} in the run")
    g, s, d = series[name], series[peer], series["direct"]
    assert g is not None and s is not None and d is not None

    def excess(idx: Sequence[int]) -> float | None:
        values = [median_of(x, idx) for x in (g, s, d)]
        if any(v is None for v in values):
            return None
        mg, ms, md = values  # type: ignore[misc]
        return (mg - md) - ADDED_P50_VS_SQUID * (ms - md)

    estimate, ci = bootstrap(n, excess, seed)
    fig_g = ok[name]["traffic"][kind].get("added_latency_ms") or {}
    fig_s = ok[peer]["traffic"][kind].get("added_latency_ms") or {}
    measured = (
        f"{name} {describe_added(fig_g.get('p50'))}; {peer} {describe_added(fig_s.get('p50'))}; "
        f"difference {_fmt(estimate, 'ms')} {_interval(ci, 'ms')}"
    )
    return {
        **check,
        "estimate": None if estimate is None else round(estimate, 3),
        "ci": None if ci is None else [round(ci[0], 3), round(ci[1], 3)],
        "measured": measured,
        "verdict": _verdict(ci, 0.0, upper=True),
    }


def _capacity_vs(
    check: dict[str, Any], ok: dict[str, Any], name: str, peer: str, workload: str, limit: float, seed: int
) -> dict[str, Any]:
    a = _per_round_rps(ok[name], workload, CAPACITY_LEVEL) if name in ok else None
    b = _per_round_rps(ok[peer], workload, CAPACITY_LEVEL) if peer in ok else None
    if a is None or b is None:
        missing = [t for t, v in ((name, a), (peer, b)) if v is None]
        return _skip(check, f"no capacity figure at c={CAPACITY_LEVEL} of {', '.join(missing)}")
    n = min(len(a), len(b))

    def ratio(idx: Sequence[int]) -> float | None:
        x, y = median_of(a, idx), median_of(b, idx)
        return None if x is None or y is None or y <= 0 else x / y

    estimate, ci = bootstrap(n, ratio, seed)
    if estimate is None:
        return _skip(check, f"{peer} or {name} had no successful response at c={CAPACITY_LEVEL}")
    measured = (
        f"{name} {median_of(a, range(n)):,.0f} rps, {peer} {median_of(b, range(n)):,.0f} rps; "
        f"ratio {_fmt(estimate, 'x')} {_interval(ci, 'x')} over {n} rounds"
    )
    return {
        **check,
        "estimate": round(estimate, 3),
        "ci": None if ci is None else [round(ci[0], 3), round(ci[1], 3)],
        "measured": measured,
        "verdict": _verdict(ci, limit, upper=False),
    }


def gateway_workers() -> dict[str, Any]:
    """The 1- vs 2-worker capacity figure needs a `workers` setting of the gateway; say why it is absent."""
    from harness.gateway.config import GatewayConfig

    if "workers" in {f.name for f in fields(GatewayConfig)}:
        return {
            "status": "not measured",
            "reason": "the gateway has a `workers` setting, but this bench does not drive it yet",
        }
    return {
        "status": "skipped",
        "reason": "harness.gateway has no `workers` setting on this branch: capacity at 1 and 2 workers not measured",
    }
