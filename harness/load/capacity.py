"""The capacity phase: Debian's `hey` (Go, compiled) through every target at fixed concurrency levels, so the
most requests per second a proxy sustains is not set by a Python generator.

    cells = run_capacity(endpoints, upstream, CapacitySpec(...), out_dir, supervisor, seed)

Per round, for every concurrency level and workload, the targets take turns in a shuffled order, each for
one cell of `duration_s` with hey's `-c <concurrency>` kept-alive connections (`-x` names the proxy; for
https hey sends CONNECT, then TLS inside the tunnel). hey's `-o csv` gives one row per response, so the
percentiles are exact (to hey's 0.1 ms resolution) and the rate is counted over the steady part of the cell,
after the last connection was dialled (or over all of it when the dialling took most of it). CPU over the
cell, in % of one core:
  generator  hey's own user+system time, from the kernel's rusage when it is reaped (all its threads)
  proxy      the proxy's processes and their children, psutil cpu_times before and after
  upstream   nginx's master and worker, likewise
  host       every core's busy time, from /proc/stat (psutil)
"""

from __future__ import annotations

import contextlib
import csv
import os
import random
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from harness.errors import EnvironmentMissing
from harness.load.targets import DIRECT, GATEWAY_INTERCEPT, Endpoint, Upstream
from harness.metrics.stats import percentile
from harness.supervisor import Supervisor

INSTALL = "apt-get install -y hey"
LEVELS = (1, 8, 32, 128)
"""Concurrent connections per cell."""
WORKLOADS = {
    "http-1k": "plain http, 1 KiB",
    "http-256k": "plain http, 256 KiB",
    "connect-1k": "CONNECT, 1 KiB over TLS",
}
"""Workload id -> what it is."""
WORKLOAD_BYTES = {"http-1k": 1024, "http-256k": 256 * 1024, "connect-1k": 1024}
INTERCEPT_ONLY = ("connect-1k",)
"""gateway-intercept differs from gateway only where it intercepts: its plain-http path is the same code."""
SATURATED_PCT = 90.0
"""A single-threaded process (the proxy, nginx's one worker) above this share of a core is the limit."""
HOST_BUSY_SHARE = 0.9
"""The host counts as saturated above this share of all its cores."""
STEADY_SHARE = 0.5
"""A cell whose last connection was dialled later than this share of it is counted whole."""
HEY_SLACK_S = 20.0
"""Time hey gets past its -z before it counts as hung and is stopped."""
POLL_S = 0.01


def hey_binary() -> str | None:
    return shutil.which("hey") or next((p for p in ("/usr/bin/hey",) if os.access(p, os.X_OK)), None)


def require_hey() -> str:
    exe = hey_binary()
    if exe is None:
        raise EnvironmentMissing(f"hey is not installed (the bench's capacity generator); install it with: {INSTALL}")
    return exe


@dataclass(frozen=True)
class CapacitySpec:
    """What the capacity phase runs."""

    levels: tuple[int, ...] = LEVELS
    """Concurrency levels."""
    workloads: tuple[str, ...] = tuple(WORKLOADS)
    """Workload ids (WORKLOADS)."""
    rounds: int = 3
    """Rounds of the levels in `repeat_levels`; each cell's figure is the median over its rounds."""
    repeat_levels: tuple[int, ...] = (8,)
    """Levels measured in every round (the checks' level, which needs an interval); the others once."""
    duration_s: float = 0.6
    """Seconds of hey per cell (hey -z)."""


@dataclass
class Cell:
    """One hey run: a target, a workload, a concurrency level, a round."""

    target: str
    workload: str
    concurrency: int
    round: int
    rps: float | None = None
    """Responses per second over the steady part of the cell."""
    p50_ms: float | None = None
    p99_ms: float | None = None
    responses: int = 0
    non_2xx: int = 0
    """Responses with another status (hey's CSV lists no transport errors: see `shortfall`)."""
    steady_s: float = 0.0
    """Seconds from the last dialled connection's first response to the last response: what `rps` is over."""
    generator_cpu_pct: float | None = None
    proxy_cpu_pct: float | None = None
    upstream_cpu_pct: float | None = None
    host_cpu_pct: float | None = None
    wall_s: float = 0.0
    error: str = ""
    """Why the cell has no figure (hey failed, or no response came back)."""


def _cpu_seconds(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
    return total


def _host_busy_seconds() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def hey_argv(exe: str, endpoint: Endpoint, upstream: Upstream, workload: str, concurrency: int, duration_s: float):
    """hey's command line for one cell."""
    size = WORKLOAD_BYTES[workload]
    argv = [exe, "-z", f"{int(duration_s * 1000)}ms", "-c", str(concurrency), "-o", "csv"]
    if workload.startswith("connect"):
        url = endpoint.https_url(upstream, upstream.nginx.add_bytes(size))
        for name, value in endpoint.tls_headers.items():
            argv += ["-H", f"{name}: {value}"]
    else:
        url = upstream.http_url(size)
    if endpoint.proxy is not None:
        argv += ["-x", f"http://{endpoint.proxy[0]}:{endpoint.proxy[1]}"]
    return [*argv, url]


def parse_hey_csv(path: Path) -> tuple[list[float], list[float], list[float], int]:
    """(latencies in ms of 2xx responses, when each finished in s since hey started, when each response that
    dialled a connection finished, non-2xx count). hey's `offset` is when a request started."""
    latencies: list[float] = []
    finished: list[float] = []
    dials: list[float] = []
    non_2xx = 0
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                total, dial, status, offset = (
                    float(row["response-time"]),
                    float(row["DNS+dialup"]),
                    int(row["status-code"]),
                    float(row["offset"]),
                )
            except (KeyError, TypeError, ValueError):
                continue
            if dial > 0:
                dials.append(offset + total)
            if 200 <= status < 300:
                latencies.append(total * 1000.0)
                finished.append(offset + total)
            else:
                non_2xx += 1
    return latencies, finished, dials, non_2xx


def rate(finished: Sequence[float], dials: Sequence[float]) -> tuple[float, float]:
    """(responses per second, seconds counted over) of one cell, from when each response finished and when
    each connection's first response did."""
    # Count the responses that finished after the last connection's first one (TLS handshakes and CONNECTs
    # are over); when that took more than half of the cell (a slow proxy at c=128), count the whole cell
    # instead: a short tail after a late dial is a burst, not a rate.
    end = max(finished)
    settled = max(dials, default=0.0)
    steady = [t for t in finished if t > settled]
    if settled > end * STEADY_SHARE or len(steady) < 2:
        settled, steady = 0.0, list(finished)
    span = max(end - settled, 1e-3)
    return round(len(steady) / span, 1), round(span, 3)


def run_cell(
    exe: str,
    endpoint: Endpoint,
    upstream: Upstream,
    cell: Cell,
    duration_s: float,
    out_dir: Path,
    supervisor: Supervisor,
) -> Cell:
    """Run hey once and fill `cell` in; a failed run is a cell with an error, never an exception."""
    out = out_dir / f"{cell.target}-{cell.workload}-c{cell.concurrency}-r{cell.round}.csv"
    argv = hey_argv(exe, endpoint, upstream, cell.workload, cell.concurrency, duration_s)
    proxy0, upstream0, host0 = _cpu_seconds(endpoint.pids), _cpu_seconds(upstream.nginx.pids), _host_busy_seconds()
    t0 = time.monotonic()
    with open(out, "wb") as stdout, open(out.with_suffix(".err"), "wb") as stderr:
        proc = supervisor.spawn(argv, f"hey:{cell.target}", stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
    usage = None
    try:
        deadline = t0 + duration_s + HEY_SLACK_S
        while time.monotonic() < deadline:
            # wait4 reaps hey and returns its rusage: the CPU of all its threads, counted by the kernel.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            time.sleep(POLL_S)
    finally:
        supervisor.stop(proc.pid)
    wall = time.monotonic() - t0
    cell.wall_s = round(wall, 3)
    cell.proxy_cpu_pct = round((_cpu_seconds(endpoint.pids) - proxy0) / wall * 100, 1) if endpoint.pids else None
    cell.upstream_cpu_pct = round((_cpu_seconds(upstream.nginx.pids) - upstream0) / wall * 100, 1)
    cell.host_cpu_pct = round((_host_busy_seconds() - host0) / wall * 100, 1)
    if usage is None:
        cell.error = f"hey ran past {duration_s + HEY_SLACK_S:.0f} s and was stopped"
        return cell
    cell.generator_cpu_pct = round((usage.ru_utime + usage.ru_stime) / wall * 100, 1)
    if proc.returncode != 0:
        cell.error = f"hey exited {proc.returncode}: {out.with_suffix('.err').read_text(errors='replace')[-300:]}"
        return cell
    latencies, finished, dials, cell.non_2xx = parse_hey_csv(out)
    cell.responses = len(latencies)
    if not latencies:
        cell.error = f"no 2xx response ({cell.non_2xx} other)"
        return cell
    cell.rps, cell.steady_s = rate(finished, dials)
    cell.p50_ms = round(percentile(latencies, 50), 3)
    cell.p99_ms = round(percentile(latencies, 99), 3)
    return cell


def plan_cells(targets: Sequence[str], spec: CapacitySpec, seed: int) -> list[Cell]:
    """Every cell in the order run: rounds, then levels, then workloads, the targets shuffled in each."""
    rng = random.Random(seed)
    cells: list[Cell] = []
    for r in range(spec.rounds):
        for level in spec.levels:
            if r > 0 and level not in spec.repeat_levels:
                continue
            for workload in spec.workloads:
                names = [t for t in targets if t != GATEWAY_INTERCEPT or workload in INTERCEPT_ONLY]
                rng.shuffle(names)
                cells += [Cell(name, workload, level, r) for name in names]
    return cells


def limit_of(cell: dict[str, Any], cores: int) -> str:
    """What most likely bounded a cell: "proxy" or "upstream" (a single-threaded process pegged a core),
    "generator" (our processes together filled the host and hey took the biggest share), "host" (they filled
    it, hey not the biggest), "other load" (the host was full but mostly with other tenants' work), else
    "none" (latency-bound: nobody was short of CPU)."""
    proxy, upstream, gen, host = (
        cell.get(k) or 0.0 for k in ("proxy_cpu", "upstream_cpu", "generator_cpu", "host_cpu")
    )
    full = HOST_BUSY_SHARE * 100 * cores
    if proxy >= SATURATED_PCT:
        return "proxy"
    if upstream >= SATURATED_PCT:
        return "upstream"
    if gen + proxy + upstream >= full:
        return "generator" if gen >= max(proxy, upstream) else "host"
    if host >= full:
        return "other load"
    return "none"


def summarise(cells: Sequence[Cell], cores: int) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """target -> workload -> str(concurrency) -> medians over rounds (rps, p50, p99, CPU), the per-round
    figures, and the limit."""
    grouped: dict[tuple[str, str, int], list[Cell]] = {}
    for c in cells:
        grouped.setdefault((c.target, c.workload, c.concurrency), []).append(c)
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for (target, workload, level), group in sorted(grouped.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        ok = [c for c in group if c.rps is not None]

        def med(key: str, ok: list[Cell] = ok) -> float | None:
            values = [getattr(c, key) for c in ok if getattr(c, key) is not None]
            return round(statistics.median(values), 3) if values else None

        entry: dict[str, Any] = {
            "rps": med("rps"),
            "p50_ms": med("p50_ms"),
            "p99_ms": med("p99_ms"),
            "generator_cpu": med("generator_cpu_pct"),
            "proxy_cpu": med("proxy_cpu_pct") if target != DIRECT else None,
            "upstream_cpu": med("upstream_cpu_pct"),
            "host_cpu": med("host_cpu_pct"),
            "non_2xx": sum(c.non_2xx for c in group),
            "rounds": [
                {k: v for k, v in asdict(c).items() if k not in ("target", "workload", "concurrency")}
                for c in sorted(group, key=lambda c: c.round)
            ],
            "errors": sorted({c.error for c in group if c.error}),
        }
        entry["limit"] = limit_of(entry, cores)
        out.setdefault(target, {}).setdefault(workload, {})[str(level)] = entry
    return out


def generator_first(capacity: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Per workload of one target, whether the generator saturated at a lower concurrency than the proxy:
    one sentence per such workload."""
    found: list[str] = []
    for workload, levels in capacity.items():
        ordered = sorted(levels.items(), key=lambda kv: int(kv[0]))
        first = {
            kind: next((int(c) for c, e in ordered if e.get("limit") == kind), None) for kind in ("generator", "proxy")
        }
        if first["generator"] is not None and (first["proxy"] is None or first["generator"] < first["proxy"]):
            found.append(f"{WORKLOADS.get(workload, workload)}: the generator saturated first (c={first['generator']})")
    return found


@dataclass
class CapacityRun:
    """The capacity phase over started targets."""

    endpoints: dict[str, Endpoint]
    upstream: Upstream
    spec: CapacitySpec
    out_dir: Path
    supervisor: Supervisor
    seed: int
    cells: list[Cell] = field(default_factory=list)
    """Cells run so far (an interrupted phase keeps them)."""

    def run(self, progress: Any = None) -> list[Cell]:
        exe = require_hey()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        planned = plan_cells(list(self.endpoints), self.spec, self.seed)
        for index, cell in enumerate(planned):
            if progress is not None and index % 16 == 0:
                progress(f"capacity (hey): cell {index + 1}/{len(planned)}")
            self.cells.append(
                run_cell(
                    exe,
                    self.endpoints[cell.target],
                    self.upstream,
                    cell,
                    self.spec.duration_s,
                    self.out_dir,
                    self.supervisor,
                )
            )
        return self.cells
