"""`invoke bench`'s proxy part: every target started once against one nginx upstream, then two phases.

    from harness.load.bench import ProxyBenchConfig, run_proxy_bench
    proxy = run_proxy_bench(ProxyBenchConfig(...), run_dir, supervisor)   # -> results.json["proxy"]

  paced     One Locust run (agent-shaped: paced users, kept-alive connections) whose users send the same
            traffic mix at the same offered rate to every target in turn: `rounds` rounds, each target one
            `duration_s` window per round, in an order shuffled per round (harness.load.rounds). Added
            latency per kind = median over rounds of the target's window p50 minus direct's, with a paired
            bootstrap interval over the rounds (harness.load.intervals).
  capacity  hey at fixed concurrency levels for three workloads (harness.load.capacity): rps, p50, p99 and
            the CPU of generator, proxy and upstream per cell.

Then the checks (harness.load.checks). run_dir/proxy/proxy.json is rewritten after every phase, so an
interrupted run keeps what it measured; on KeyboardInterrupt or any exception everything started here is
stopped, what was measured is summarised with partial=true, and the exception propagates.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.gateway.credentials import SENTINEL
from harness.load import capacity, nginx
from harness.load.analyse import COMPARABLE_KINDS, figures, latency, read_samples
from harness.load.capacity import CapacityRun, CapacitySpec
from harness.load.checks import checks, gateway_workers
from harness.load.cpu import CpuSampler, host_saturated
from harness.load.intervals import RESAMPLES, bootstrap, median_of
from harness.load.peers import INSTALL, PEERS, PeerMissing, binary
from harness.load.plan import TRAFFIC_KINDS, LoadPlan, Route
from harness.load.rounds import assign, make_schedule, requests_only, window_figures
from harness.load.runner import PhaseSpec, run_locust
from harness.load.targets import ALL_TARGETS, DIRECT, KEY_HEADER, PAGE_BYTES, Endpoint, Upstream, start_target
from harness.metrics.ab import CONFIDENCE
from harness.supervisor import Supervisor

PROXY_DIR = "proxy"
PROXY_FILE = "proxy.json"
SCHEMA = "blastradius/proxy/v2"
MAX_USERS = 10_000
LOCUST_START_S = 4.0
"""Lead-in before the first window: Locust's processes import gevent and connect (about 2 s here)."""
PACED_DIR = "paced"
CAPACITY_DIR = "capacity"


class ProxyEvents:
    """Callbacks for the terminal layer; the bench prints nothing itself."""

    def stage(self, text: str) -> None: ...


@dataclass
class ProxyBenchConfig:
    users: int = 12
    """Concurrent Locust users in the paced phase (model 3 : page 1 : download 1 : blocked 1)."""
    spawn_rate: float = 12.0
    """Users started per second."""
    duration_s: float = 4.0
    """Seconds of each target's window in every round of the paced phase."""
    rounds: int = 6
    """Rounds of the paced phase; every target gets one window per round, in a shuffled order."""
    settle_s: float = 0.5
    """Discarded start of every window (in-flight requests to the previous target, reconnects)."""
    workers: int = 1
    """Local Locust worker processes (0: one standalone Locust process)."""
    master_host: str | None = None
    """Address the Locust master binds for workers; None = 127.0.0.1."""
    remote_workers: int = 0
    """Workers the master also waits for, started by hand on other machines (see README)."""
    master_port: int = 0
    """Port the Locust master binds; 0 = a free one."""
    targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    traffic: list[str] = field(default_factory=lambda: list(TRAFFIC_KINDS))
    warmup_s: float = 1.0
    """Extra lead-in after every user is spawned, before the first window."""
    seed: int | None = None
    """Seed of the orders (paced rounds, capacity cells) and of the bootstrap; None draws one (recorded)."""
    user_rps: float = 10.0
    """Requests/s per user in the paced phase (constant_throughput)."""
    capacity_s: float = 0.6
    """Seconds of hey per capacity cell; 0 skips the capacity phase."""
    capacity_rounds: int = 3
    """Rounds of the capacity cells at concurrency 8 (the checks' level); the other levels run once."""
    capacity_levels: list[int] = field(default_factory=lambda: list(capacity.LEVELS))
    """hey's concurrency levels."""
    download_bytes: int = 256 * 1024
    model_body_bytes: int = 1024
    stream_bytes: int = 0
    """>0: the model user asks for a body of this size and also reports time to first byte."""
    timeout_s: float = 10.0
    gateway_ca_dir: Path | None = None
    """None: the per-install gateway CA (as in production)."""

    def validate(self) -> None:
        unknown = [t for t in self.targets if t not in ALL_TARGETS]
        if unknown:
            raise ConfigError(f"unknown proxy target(s) {unknown}; choose from {', '.join(ALL_TARGETS)}")
        bad = [k for k in self.traffic if k not in TRAFFIC_KINDS]
        if bad:
            raise ConfigError(f"unknown traffic kind(s) {bad}; choose from {', '.join(TRAFFIC_KINDS)}")
        if not self.targets or not self.traffic:
            raise ConfigError("--targets and --traffic must each name at least one")
        if not 1 <= self.users <= MAX_USERS:
            raise ConfigError(f"--users must be between 1 and {MAX_USERS}")
        if self.spawn_rate <= 0 or self.duration_s <= self.settle_s or self.warmup_s < 0 or self.settle_s < 0:
            raise ConfigError("--spawn-rate must be positive and --duration longer than the settle time (0.5 s)")
        if self.rounds < 1 or self.capacity_rounds < 1:
            raise ConfigError("--rounds and --capacity-rounds must be at least 1")
        if self.capacity_s < 0 or any(level < 1 for level in self.capacity_levels):
            raise ConfigError("--capacity must be >= 0 seconds (0 skips it) and every level >= 1")
        if self.workers < 0 or self.remote_workers < 0:
            raise ConfigError("--workers must be >= 0")
        # The tools, before anything boots: a missing one is one line naming the fix.
        nginx.require()
        if self.capacity_s > 0:
            capacity.require_hey()


def _route(endpoint: Endpoint, cfg: ProxyBenchConfig, ca_file: Path) -> Route:
    headers = {k: dict(v) for k, v in endpoint.headers.items()}
    if "model" in endpoint.urls:
        # Every target's model request carries the same header; only the gateway swaps it for the key.
        headers.setdefault("model", {KEY_HEADER: SENTINEL})
    return Route(proxy=endpoint.proxy, urls=endpoint.urls, ca_file=str(ca_file), headers=headers)


def _conditions(cfg: ProxyBenchConfig, seed: int, order: list[str]) -> dict[str, Any]:
    conf = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    conf.update(
        seed=seed,
        order=order,
        cores=os.cpu_count(),
        offered_rps=round(cfg.users * cfg.user_rps, 1),
        page_bytes=PAGE_BYTES,
        bootstrap={"resamples": RESAMPLES, "confidence": CONFIDENCE, "seed": seed, "over": "rounds, paired"},
        generator={"paced": "Locust (Python, gevent)", "capacity": "hey (Go)"},
        upstream=f"nginx ({nginx.WORKER_PROCESSES} worker), loopback",
        capacity_workloads=capacity.WORKLOADS,
    )
    return conf


def _stamp(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _added(per_round: list[float | None], base: list[float | None], seed: int) -> dict[str, Any]:
    """Median over rounds of a target's figure minus direct's, with its paired bootstrap interval."""
    n = min(len(per_round), len(base))

    def stat(idx: Any) -> float | None:
        a, b = median_of(per_round, idx), median_of(base, idx)
        return None if a is None or b is None else a - b

    estimate, ci = bootstrap(n, stat, seed)
    if estimate is None:
        verdict = "no figure"
    elif ci is None:
        verdict = "no interval"
    elif ci[0] > 0:
        verdict = "added"
    elif ci[1] < 0:
        verdict = "below direct"
    else:
        verdict = "within noise"
    return {
        "estimate": _stamp(estimate),
        "ci": None if ci is None else [_stamp(ci[0]), _stamp(ci[1])],
        "verdict": verdict,
        "rounds": n,
    }


def _per_round(rows: list[dict[str, Any]], n: int, pct: str) -> list[float | None]:
    """One latency figure per round (None for a round without a window or without successes)."""
    out: list[float | None] = [None] * n
    for row in rows:
        if row["round"] < n:
            out[row["round"]] = row["latency_ms"].get(pct)
    return out


def summarise_paced(
    samples: list[Any], schedule: list[tuple[float, float, str]], targets: list[str], cfg: ProxyBenchConfig
) -> tuple[dict[str, dict[str, Any]], list[Any]]:
    """target -> its paced figures (pooled over its windows, and per round per kind); and the windows."""
    windows = assign(requests_only(samples), schedule, len(targets), cfg.settle_s)
    per_window = window_figures(windows, cfg.settle_s)
    span = max(cfg.duration_s - cfg.settle_s, 0.0)
    out: dict[str, dict[str, Any]] = {}
    for name in targets:
        mine = [w for w in windows if w.target == name]
        pooled = [s for w in mine for s in w.samples]
        total_s = span * len(mine)
        result = figures(pooled, total_s)
        result["traffic"] = {}
        for kind, rows in sorted(per_window.get(name, {}).items()):
            group = [s for s in pooled if s.name == kind]
            entry = figures(group, total_s)
            entry["rounds"] = [
                {
                    "round": r["round"],
                    "requests": r["requests"],
                    "failures": r["failure_count"],
                    "p50": r["latency_ms"]["p50"],
                    "p99": r["latency_ms"]["p99"],
                    "latency_ms": r["latency_ms"],
                }
                for r in sorted(rows, key=lambda r: r["round"])
            ]
            result["traffic"][kind] = entry
        comparable = [s for s in pooled if s.name in COMPARABLE_KINDS]
        result["comparable"] = figures(comparable, total_s)
        result["comparable"]["rounds"] = [
            {"round": w.round, "latency_ms": latency([s.ms for s in w.samples if s.name in COMPARABLE_KINDS])}
            for w in mine
        ]
        result["windows"] = [[w.round, w.start, w.end] for w in mine]
        out[name] = result
    return out, windows


def _window_cpu(cpu: CpuSampler, windows: list[Any], settle_s: float) -> dict[str, dict[str, Any]]:
    """target -> mean % of one core of generator, its proxy, nginx and the host over its windows."""
    acc: dict[str, dict[str, list[float]]] = {}
    per_process: dict[str, Counter[str]] = {}
    for w in windows:
        summary = cpu.summary(w.start + settle_s, w.end, per_root_of="generator")
        slot = acc.setdefault(w.target, {})
        for label, group in (
            ("generator", "generator"),
            ("proxy", f"proxy:{w.target}"),
            ("upstream", "upstream"),
            ("host", "host"),
        ):
            value = (summary.get(group) or {}).get("mean_pct")
            if value is not None:
                slot.setdefault(label, []).append(value)
        busiest = max((v or 0.0 for v in (summary["generator"].get("per_process_mean_pct") or {}).values()), default=0)
        per_process.setdefault(w.target, Counter())["max_process"] = max(
            per_process.get(w.target, Counter())["max_process"], busiest
        )
    out: dict[str, dict[str, Any]] = {}
    for name, groups in acc.items():
        out[name] = {label: {"mean_pct": round(sum(v) / len(v), 1)} for label, v in groups.items() if v}
        out[name]["generator_busiest_process_pct"] = per_process[name]["max_process"]
    return out


def finalise(data: dict[str, Any]) -> dict[str, Any]:
    """Added latency vs direct per kind (with intervals over rounds), and the checks, from what was measured."""
    targets = data["targets"]
    seed = data["conditions"]["seed"]
    rounds = data["conditions"]["rounds"]
    direct = targets.get(DIRECT, {})
    for name, t in targets.items():
        if t.get("status") != "ok" or "traffic" not in t:
            continue
        for kind, fig in t["traffic"].items():
            base = (direct.get("traffic") or {}).get(kind) if direct.get("status") == "ok" else None
            if name == DIRECT or base is None:
                fig["added_latency_ms"] = None
                continue
            fig["added_latency_ms"] = {
                pct: _added(_per_round(fig["rounds"], rounds, pct), _per_round(base["rounds"], rounds, pct), seed)
                for pct in ("p50", "p99")
            }
        comp, base_comp = t.get("comparable"), direct.get("comparable")
        if name != DIRECT and comp and base_comp and direct.get("status") == "ok":
            t["added_latency_ms"] = {
                pct: _added(
                    _per_round(comp["rounds"], rounds, pct), _per_round(base_comp["rounds"], rounds, pct), seed
                )["estimate"]
                for pct in ("p50", "p99")
            }
        else:
            t["added_latency_ms"] = None
    data["checks"] = checks(data)
    data["generator_saturated_any"] = any(t.get("generator_saturated") for t in targets.values())
    return data


def _save(proxy_dir: Path, data: dict[str, Any]) -> None:
    tmp = proxy_dir / (PROXY_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(proxy_dir / PROXY_FILE)


def load_partial(run_dir: Path) -> dict[str, Any] | None:
    """What an interrupted run_proxy_bench saved (run_dir/proxy/proxy.json), or None."""
    path = run_dir / PROXY_DIR / PROXY_FILE
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class _State:
    """What the bench has started and measured so far (summarised however the bench ends)."""

    supervisor: Supervisor
    """Owns every process started here."""
    upstream: Upstream | None = None
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    schedule: list[tuple[float, float, str]] = field(default_factory=list)
    cpu: CpuSampler | None = None
    paced_done: bool = False
    capacity: CapacityRun | None = None


def _start_targets(
    cfg: ProxyBenchConfig, order: list[str], traffic: tuple[str, ...], state: _State, data: dict[str, Any], root: Path
) -> None:
    assert state.upstream is not None
    for name in order:
        workdir = root / name
        try:
            endpoint = start_target(
                name,
                workdir,
                state.supervisor,
                state.upstream,
                traffic,
                cfg.download_bytes,
                cfg.stream_bytes,
                cfg.gateway_ca_dir,
            )
        except PeerMissing as missing:
            data["targets"][name] = {"status": "skipped", "reason": str(missing), "install": missing.install}
            continue
        except Exception as error:  # a target that cannot start is a finding, not a crash
            data["targets"][name] = {"status": "failed", "reason": f"start: {error}"}
            continue
        state.endpoints[name] = endpoint
        data["targets"][name] = {"status": "ok", "proxy": dict(endpoint.describe)}


def _collect_paced(cfg: ProxyBenchConfig, state: _State, data: dict[str, Any], root: Path) -> None:
    """Summarise the paced phase's samples on disk into data (also after an interruption)."""
    if not state.schedule:
        return
    names = list(state.endpoints)
    samples = read_samples(root / PACED_DIR / "samples")
    paced, windows = summarise_paced(samples, state.schedule, names, cfg)
    cpu = _window_cpu(state.cpu, windows, cfg.settle_s) if state.cpu is not None else {}
    origin = state.schedule[0][0]
    for name in names:
        t = data["targets"][name]
        p = paced[name]
        c = cpu.get(name, {})
        t.update(
            latency_ms=p["latency_ms"],
            rps=p["rps"],
            requests=p["requests"],
            ok=p["ok"],
            failures=p["failures"],
            failure_count=p["failure_count"],
            traffic=p["traffic"],
            comparable=p["comparable"],
            comparable_kinds=[k for k in COMPARABLE_KINDS if k in p["traffic"]],
            cpu=c,
            generator_saturated=c.get("generator_busiest_process_pct", 0.0) > capacity.SATURATED_PCT,
            host_saturated=host_saturated({"host": c.get("host", {})}),
            windows=[[r, round(a - origin, 2), round(b - origin, 2)] for r, a, b in p["windows"]],
            window_s=round(cfg.duration_s - cfg.settle_s, 2),
        )
    data["paced"] = {
        "samples": len(samples),
        "assigned": sum(len(w.samples) for w in windows),
        "dir": f"{PROXY_DIR}/{PACED_DIR}",
        "complete": state.paced_done,
    }


def _run_paced(cfg: ProxyBenchConfig, state: _State, traffic: tuple[str, ...], data: dict[str, Any], root: Path):
    names = list(state.endpoints)
    routes = {}
    for name, endpoint in state.endpoints.items():
        ca_file = root / name / "client-ca.pem"
        ca_file.write_bytes(b"\n".join(endpoint.ca_pems))
        routes[name] = _route(endpoint, cfg, ca_file)
    lead = LOCUST_START_S + cfg.users / cfg.spawn_rate + cfg.warmup_s
    orders, state.schedule = make_schedule(
        names, cfg.rounds, cfg.duration_s, time.time() + lead, data["conditions"]["seed"]
    )
    data["conditions"]["round_orders"] = orders
    plan = LoadPlan(
        target="interleaved",
        proxy=None,
        urls={},
        ca_file="",
        samples_dir="",
        user_rps=cfg.user_rps,
        model_body_bytes=cfg.model_body_bytes,
        stream=cfg.stream_bytes > 0,
        timeout_s=cfg.timeout_s,
        routes=routes,
        schedule=state.schedule,
    )
    spec = PhaseSpec(
        PACED_DIR,
        cfg.users,
        cfg.spawn_rate,
        lead,
        cfg.rounds * len(names) * cfg.duration_s,
        traffic,
        workers=cfg.workers,
        master_host=cfg.master_host,
        remote_workers=cfg.remote_workers,
        master_port=cfg.master_port,
    )
    assert state.upstream is not None
    groups = {"generator": [], "upstream": list(state.upstream.nginx.pids)}
    groups.update({f"proxy:{n}": list(e.pids) for n, e in state.endpoints.items()})
    state.cpu = CpuSampler(groups=groups)
    run_time = math.ceil(state.schedule[-1][1] - time.time()) + 1
    run_locust(plan, spec, run_time, root / PACED_DIR, state.supervisor, state.cpu)
    state.paced_done = True


def _collect_capacity(state: _State, data: dict[str, Any]) -> None:
    if state.capacity is None:
        return
    summary = capacity.summarise(state.capacity.cells, os.cpu_count() or 1)
    for name, per_workload in summary.items():
        t = data["targets"][name]
        t["capacity"] = per_workload
        # direct has no proxy to saturate: its capacity is hey's and nginx's by definition.
        t["capacity_notes"] = capacity.generator_first(per_workload) if name != DIRECT else []
    data["capacity"] = {
        "cells": len(state.capacity.cells),
        "planned": len(capacity.plan_cells(list(state.endpoints), state.capacity.spec, state.capacity.seed)),
        "dir": f"{PROXY_DIR}/{CAPACITY_DIR}",
        "wall_s": round(sum(c.wall_s for c in state.capacity.cells), 1),
    }


def run_proxy_bench(
    cfg: ProxyBenchConfig, run_dir: Path, supervisor: Supervisor, events: ProxyEvents | None = None
) -> dict[str, Any]:
    """Start every target in cfg.targets, run both phases, return the dict for results.json["proxy"]."""
    cfg.validate()
    events = events or ProxyEvents()
    root = run_dir / PROXY_DIR
    root.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31)
    order = list(dict.fromkeys(cfg.targets))
    random.Random(seed).shuffle(order)
    traffic = tuple(k for k in TRAFFIC_KINDS if k in cfg.traffic)
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "partial": False,
        "interrupted_by": None,
        "conditions": _conditions(cfg, seed, order),
        "targets": {},
        "peers": {name: {"installed": binary(name) is not None, "install": INSTALL[name]} for name in PEERS},
        "gateway_workers": gateway_workers(),
        "notes": [
            "Loopback only: generator, proxy and upstream share this host's cores (and any other tenant's load).",
            "Latency is of successful requests; every failure is counted by kind, never retried.",
        ],
        "dir": PROXY_DIR,
    }
    state = _State(supervisor)
    started = time.monotonic()
    try:
        events.stage("proxy bench: starting nginx and every target")
        state.upstream = Upstream.start(
            root / "nginx", supervisor, (cfg.download_bytes, *capacity.WORKLOAD_BYTES.values())
        )
        _start_targets(cfg, order, traffic, state, data, root)
        _save(root, data)
        if state.endpoints:
            events.stage(
                f"proxy bench: Locust, {cfg.rounds} rounds x {len(state.endpoints)} targets x {cfg.duration_s:g} s"
            )
            data["phases_wall_s"] = {"start": round(time.monotonic() - started, 1)}
            _run_paced(cfg, state, traffic, data, root)
            data["phases_wall_s"]["paced"] = round(time.monotonic() - started - data["phases_wall_s"]["start"], 1)
            _collect_paced(cfg, state, data, root)
            _save(root, finalise(data))
        if state.endpoints and cfg.capacity_s > 0:
            spec = CapacitySpec(
                levels=tuple(cfg.capacity_levels), rounds=cfg.capacity_rounds, duration_s=cfg.capacity_s
            )
            state.capacity = CapacityRun(state.endpoints, state.upstream, spec, root / CAPACITY_DIR, supervisor, seed)
            before = time.monotonic()
            state.capacity.run(events.stage)
            data.setdefault("phases_wall_s", {})["capacity"] = round(time.monotonic() - before, 1)
    except BaseException as exc:
        data["partial"] = True
        data["interrupted_by"] = type(exc).__name__
        raise
    finally:
        for endpoint in state.endpoints.values():
            endpoint.stop()
        if state.upstream is not None:
            state.upstream.stop()
        if not state.paced_done:
            _collect_paced(cfg, state, data, root)
        _collect_capacity(state, data)
        data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        data["wall_s"] = round(time.monotonic() - started, 1)
        _save(root, finalise(data))
    return data
