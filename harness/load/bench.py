"""`invoke bench`'s proxy part: the same Locust load through each target in randomised order.

    from harness.load.bench import ProxyBenchConfig, run_proxy_bench
    proxy = run_proxy_bench(ProxyBenchConfig(...), run_dir, supervisor)   # -> results.json["proxy"]

Per target, two phases, each with its own warm-up that is discarded:
  paced       `users` users at `user_rps` each: latency at a fixed offered load, the figure
              to compare with direct (added latency) and with the peers;
  saturation  `saturation_users` users with no wait (closed loop): the most requests/s the
              target, the generator and the upstream sustain together on this host.
Figures are exact percentiles over per-request samples; Locust's CSVs are kept beside them in
run_dir/proxy/<target>/<phase>/. run_dir/proxy/proxy.json is rewritten after every target, so
an interrupted run keeps what it measured; on KeyboardInterrupt or any exception everything
started here is stopped, proxy.json is saved with partial=true, and the exception propagates.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.gateway.credentials import SENTINEL
from harness.load.analyse import COMPARABLE_KINDS, added
from harness.load.peers import INSTALL, PEERS, PeerMissing, binary
from harness.load.plan import TRAFFIC_KINDS, LoadPlan
from harness.load.runner import PhaseSpec, run_phase
from harness.load.targets import (
    ALL_TARGETS,
    DIRECT,
    GATEWAY,
    GATEWAY_INTERCEPT,
    KEY_HEADER,
    Endpoint,
    Upstream,
    start_target,
)
from harness.supervisor import Supervisor

PROXY_DIR = "proxy"
PROXY_FILE = "proxy.json"
SCHEMA = "blastradius/proxy/v1"
PLAIN_HTTP_KIND = "download"
CONNECT_KIND = "model"
P50_VS_SQUID = 1.5
P99_VS_SQUID = 2.0
THROUGHPUT_VS_MITMPROXY = 5.0
"""Issue #4's targets: gateway added latency <= 1.5x (p50) and 2x (p99) squid's, plain http and
CONNECT; gateway throughput at saturation >= 5x mitmproxy's."""
MAX_USERS = 10_000


class ProxyEvents:
    """Callbacks for the terminal layer; the bench prints nothing itself."""

    def stage(self, text: str) -> None: ...


@dataclass
class ProxyBenchConfig:
    users: int = 10
    """Concurrent Locust users in the paced phase."""
    spawn_rate: float = 10.0
    """Users started per second."""
    duration_s: float = 20.0
    """Measured seconds per target in the paced phase (after warm-up)."""
    workers: int = 1
    """Local Locust worker processes (0: one standalone Locust process)."""
    master_host: str | None = None
    """Address the Locust master binds for workers; None = 127.0.0.1."""
    remote_workers: int = 0
    """Workers the master also waits for, started by hand on other machines (see README)."""
    master_port: int = 0
    """Port the Locust master binds; 0 = a free one per phase."""
    targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    traffic: list[str] = field(default_factory=lambda: list(TRAFFIC_KINDS))
    warmup_s: float = 3.0
    """Discarded seconds at the start of each phase (covers the user ramp at the default rate)."""
    seed: int | None = None
    """Seed of the target order; None draws one (recorded)."""
    user_rps: float = 10.0
    """Requests/s per user in the paced phase (constant_throughput)."""
    saturation_s: float = 5.0
    """Measured seconds of the closed-loop phase; 0 skips it."""
    saturation_users: int = 20
    saturation_warmup_s: float = 2.0
    saturation_traffic: list[str] = field(default_factory=lambda: ["model"])
    """Kinds in the closed-loop phase: model requests, what mitmproxy's published req/s is about."""
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
        bad = [k for k in (*self.traffic, *self.saturation_traffic) if k not in TRAFFIC_KINDS]
        if bad:
            raise ConfigError(f"unknown traffic kind(s) {bad}; choose from {', '.join(TRAFFIC_KINDS)}")
        if not self.targets or not self.traffic:
            raise ConfigError("--targets and --traffic must each name at least one")
        if not 1 <= self.users <= MAX_USERS or not 1 <= self.saturation_users <= MAX_USERS:
            raise ConfigError(f"--users must be between 1 and {MAX_USERS}")
        if self.spawn_rate <= 0 or self.duration_s <= 0 or self.warmup_s < 0 or self.saturation_s < 0:
            raise ConfigError("--spawn-rate and --duration must be positive, warm-up and saturation >= 0")
        if self.workers < 0 or self.remote_workers < 0:
            raise ConfigError("--workers must be >= 0")


def _phase_specs(cfg: ProxyBenchConfig, traffic: tuple[str, ...]) -> list[PhaseSpec]:
    common = {
        "workers": cfg.workers,
        "master_host": cfg.master_host,
        "remote_workers": cfg.remote_workers,
        "master_port": cfg.master_port,
    }
    specs = [PhaseSpec("paced", cfg.users, cfg.spawn_rate, cfg.warmup_s, cfg.duration_s, traffic, **common)]
    sat = tuple(k for k in cfg.saturation_traffic if k in traffic)
    if cfg.saturation_s > 0 and sat:
        rate = max(cfg.spawn_rate, cfg.saturation_users / max(cfg.saturation_warmup_s, 1.0))
        specs.append(
            PhaseSpec(
                "saturation", cfg.saturation_users, rate, cfg.saturation_warmup_s, cfg.saturation_s, sat, **common
            )
        )
    return specs


def _plan(endpoint: Endpoint, cfg: ProxyBenchConfig, ca_file: Path, user_rps: float) -> LoadPlan:
    headers = {k: dict(v) for k, v in endpoint.headers.items()}
    if "model" in endpoint.urls:
        # Every target's model request carries the same header; only the gateway swaps it for the key.
        headers.setdefault("model", {KEY_HEADER: SENTINEL})
    return LoadPlan(
        target=endpoint.name,
        proxy=endpoint.proxy,
        urls=endpoint.urls,
        ca_file=str(ca_file),
        samples_dir="",
        user_rps=user_rps,
        model_body_bytes=cfg.model_body_bytes,
        stream=cfg.stream_bytes > 0,
        headers=headers,
        timeout_s=cfg.timeout_s,
    )


def _conditions(cfg: ProxyBenchConfig, seed: int, order: list[str]) -> dict[str, Any]:
    conf = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    conf.update(seed=seed, order=order, cores=os.cpu_count(), offered_rps=round(cfg.users * cfg.user_rps, 1))
    return conf


def _target_result(name: str, endpoint: Endpoint | None, phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    paced = phases.get("paced", {})
    comparable = [k for k in COMPARABLE_KINDS if k in paced.get("traffic", {})]
    result: dict[str, Any] = {
        "status": "ok",
        "proxy": dict(endpoint.describe) if endpoint else {},
        "latency_ms": paced.get("latency_ms"),
        "rps": paced.get("rps"),
        "requests": paced.get("requests"),
        "ok": paced.get("ok"),
        "failures": paced.get("failures", {}),
        "failure_count": paced.get("failure_count"),
        "traffic": paced.get("traffic", {}),
        "comparable_kinds": comparable,
        "cpu": paced.get("cpu"),
        "generator_saturated": bool(paced.get("generator_saturated")),
        "host_saturated": bool(paced.get("host_saturated")),
        "timeline": paced.get("timeline", []),
        "history": paced.get("history", []),
        "window_s": paced.get("window_s"),
        "phases": {k: {kk: vv for kk, vv in v.items() if kk not in ("timeline", "history")} for k, v in phases.items()},
    }
    sat = phases.get("saturation")
    result["saturation"] = (
        None
        if sat is None
        else {
            "rps": sat.get("rps"),
            "requests": sat.get("requests"),
            "failures": sat.get("failures"),
            "latency_ms": sat.get("latency_ms"),
            "users": sat["spec"]["users"],
            "cpu": sat.get("cpu"),
            "generator_saturated": bool(sat.get("generator_saturated")),
            "host_saturated": bool(sat.get("host_saturated")),
            "timeline": sat.get("timeline", []),
            "traffic": list(sat["spec"]["traffic"]),
        }
    )
    return result


def finalise(data: dict[str, Any]) -> dict[str, Any]:
    """Added latency vs direct and the issue's performance checks, from what was measured."""
    targets = data["targets"]
    direct = targets.get(DIRECT, {})
    direct_ok = direct.get("status") == "ok"
    for name, t in targets.items():
        if t.get("status") != "ok":
            continue
        for kind, fig in t["traffic"].items():
            base = direct.get("traffic", {}).get(kind) if direct_ok else None
            fig["added_latency_ms"] = added(fig["latency_ms"], base["latency_ms"]) if base else None
        comp = t.get("phases", {}).get("paced", {}).get("comparable")
        base_comp = direct.get("phases", {}).get("paced", {}).get("comparable") if direct_ok else None
        t["added_latency_ms"] = (
            added(comp["latency_ms"], base_comp["latency_ms"])
            if comp and base_comp and name != DIRECT
            else ({k: 0.0 for k in ("p50", "p90", "p95", "p99", "p99.9")} if name == DIRECT else None)
        )
    data["checks"] = _checks(targets)
    data["generator_saturated_any"] = any(t.get("generator_saturated") for t in targets.values())
    return data


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, 2)


def _checks(targets: dict[str, Any]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    gw, squid = targets.get(GATEWAY, {}), targets.get("squid", {})
    for kind, label in ((PLAIN_HTTP_KIND, "plain http"), (CONNECT_KIND, "CONNECT")):
        for pct, limit in (("p50", P50_VS_SQUID), ("p99", P99_VS_SQUID)):
            check: dict[str, Any] = {"name": f"gateway added {pct} vs squid ({label})", "limit": f"<= {limit}x"}
            if gw.get("status") != "ok" or squid.get("status") != "ok":
                check.update(status="skipped", reason="needs gateway, squid and direct in the run")
            else:
                g = ((gw["traffic"].get(kind) or {}).get("added_latency_ms") or {}).get(pct)
                s = ((squid["traffic"].get(kind) or {}).get("added_latency_ms") or {}).get(pct)
                check.update(gateway_ms=g, squid_ms=s)
                if g is None or s is None:
                    check.update(status="skipped", reason=f"no {kind} figures vs direct")
                else:
                    # Sub-0.1 ms differences are below what this loopback bench resolves.
                    check["ratio"] = _ratio(g, s)
                    check["status"] = "pass" if g <= max(s, 0.0) * limit or g <= 0.1 else "fail"
            checks.append(check)
    mitm = targets.get("mitmproxy", {})
    for name in (GATEWAY, GATEWAY_INTERCEPT):
        t = targets.get(name, {})
        check = {"name": f"{name} saturation throughput vs mitmproxy", "limit": f">= {THROUGHPUT_VS_MITMPROXY}x"}
        if t.get("status") != "ok" or not t.get("saturation"):
            check.update(status="skipped", reason=f"{name} has no saturation figure")
        elif mitm.get("status") != "ok" or not mitm.get("saturation"):
            check.update(status="skipped", reason=mitm.get("reason") or "mitmproxy was not in the run")
        else:
            g, m = t["saturation"]["rps"], mitm["saturation"]["rps"]
            check.update(
                gateway_rps=g,
                mitmproxy_rps=m,
                ratio=_ratio(g, m),
                status="pass" if g is not None and m and g >= THROUGHPUT_VS_MITMPROXY * m else "fail",
                generator_bound=bool(t["saturation"]["generator_saturated"]),
            )
        checks.append(check)
    return checks


def _save(proxy_dir: Path, data: dict[str, Any]) -> None:
    tmp = proxy_dir / (PROXY_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(proxy_dir / PROXY_FILE)


def load_partial(run_dir: Path) -> dict[str, Any] | None:
    """What an interrupted run_proxy_bench saved (run_dir/proxy/proxy.json), or None."""
    path = run_dir / PROXY_DIR / PROXY_FILE
    return json.loads(path.read_text()) if path.exists() else None


def run_proxy_bench(
    cfg: ProxyBenchConfig, run_dir: Path, supervisor: Supervisor, events: ProxyEvents | None = None
) -> dict[str, Any]:
    """Run every target in cfg.targets (randomised order); return the dict for results.json["proxy"]."""
    cfg.validate()
    events = events or ProxyEvents()
    proxy_dir = run_dir / PROXY_DIR
    proxy_dir.mkdir(parents=True, exist_ok=True)
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
        "notes": [
            "Loopback only: generator, proxy and upstream share this host's cores.",
            "Latency is of successful requests; every failure is counted by kind, never retried.",
        ],
        "dir": PROXY_DIR,
    }
    upstream: Upstream | None = None
    endpoint: Endpoint | None = None
    try:
        upstream = Upstream.start()
        for index, name in enumerate(order, 1):
            events.stage(f"proxy bench {index}/{len(order)}: {name}")
            workdir = proxy_dir / name
            phases: dict[str, dict[str, Any]] = {}
            try:
                endpoint = start_target(
                    name,
                    workdir,
                    supervisor,
                    upstream,
                    traffic,
                    cfg.download_bytes,
                    cfg.stream_bytes,
                    cfg.gateway_ca_dir,
                )
            except PeerMissing as missing:
                data["targets"][name] = {"status": "skipped", "reason": str(missing), "install": missing.install}
                _save(proxy_dir, data)
                continue
            except Exception as error:  # a target that cannot start is a finding, not a crash
                data["targets"][name] = {"status": "failed", "reason": f"start: {error}"}
                _save(proxy_dir, data)
                continue
            ca_file = workdir / "client-ca.pem"
            ca_file.write_bytes(b"\n".join(endpoint.ca_pems))
            try:
                for spec in _phase_specs(cfg, tuple(k for k in traffic if k in endpoint.urls)):
                    rate = cfg.user_rps if spec.name == "paced" else 0.0
                    phases[spec.name] = run_phase(
                        _plan(endpoint, cfg, ca_file, rate), spec, workdir / spec.name, supervisor, endpoint.pids
                    )
                data["targets"][name] = _target_result(name, endpoint, phases)
            except Exception as error:
                result = _target_result(name, endpoint, phases)
                result.update(status="failed", reason=f"{type(error).__name__}: {error}")
                data["targets"][name] = result
            finally:
                endpoint.stop()
                endpoint = None
            _save(proxy_dir, finalise(data))
    except BaseException as exc:
        data["partial"] = True
        data["interrupted_by"] = type(exc).__name__
        raise
    finally:
        if endpoint is not None:
            endpoint.stop()
        if upstream is not None:
            upstream.server.stop()
        data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _save(proxy_dir, finalise(data))
    return data
