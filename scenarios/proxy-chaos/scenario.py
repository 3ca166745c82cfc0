"""proxy-chaos: Toxiproxy-style faults inside the gateway, switched on and off under a running
Locust load, against a steady-state hypothesis -- Chaos Toolkit's shape, run on our own gateway.

A timeline file (YAML, `--file`, default latency-spike.yaml) says:

    title: Model API latency spike
    load: {users: 8, user_rps: 4}                        # Locust ModelUsers (harness/load)
    steady_state:
      window_s: 4                                        # measured before the faults and after
      probes:
        - {name: model-api-p95, metric: p95_ms, below: 300}
        - {name: model-api-errors, metric: error_rate_pct, below: 1}
    faults:
      - name: slow-model
        at_s: 4                                          # seconds after the run starts
        for_s: 8
        toxic: {type: latency, stream: downstream, upstream: api.anthropic.com,
                attributes: {latency: 400, jitter: 50}}
    recovery_s: 3                                        # wait after the last fault ends

Probes read the gateway's audit log (its own word on every request it handled); the charts use
both the audit log and Locust's per-request samples, because only the client sees a connection
that the gateway refused ("gateway down"). Every toxic is removed in rollback, whatever happened;
the gateway also drops them all on SIGUSR1 and on exit.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.errors import ConfigError
from harness.fleet import Fleet
from harness.gateway.process import CredentialSpec, GatewayConfig, GatewayProcess
from harness.gateway.toxics import Toxic
from harness.metrics.stats import percentile
from harness.scenario.base import ScenarioContext
from harness.scenario.journal import Activity, now
from harness.standins.upstream import UpstreamServer

NAME = "proxy-chaos"
HERE = Path(__file__).resolve().parent
DEFAULT_FILE = HERE / "latency-spike.yaml"
MODEL_HOST = "api.anthropic.com"
MODEL_URL = f"https://{MODEL_HOST}/v1/messages"
MODEL_KEY_ENV = "BR_CHAOS_MODEL_KEY"
MODEL_KEY = "sk-ant-chaos-standin-0123456789abcdef"
LOAD_SANDBOX = "load"
"""The gateway listener the Locust users come through (a sandbox id toxics can be scoped to)."""
METRICS = ("p95_ms", "p50_ms", "error_rate_pct", "rps")
BIN_S = 1.0
DEFAULT_USERS = 8
DEFAULT_USER_RPS = 4.0
DEFAULT_WINDOW_S = 4.0
DEFAULT_RECOVERY_S = 3.0
LOAD_SLACK_S = 4.0  # Locust keeps running a little past the after-window, so the window is full
LOAD_START_WAIT_S = 30.0
REQUEST_TIMEOUT_S = 5.0  # a held ("timeout") request fails after this, rather than the default 10 s
POLICY = """\
name: proxy-chaos
deny_mode: 403-explained
rules:
  - allow: api.anthropic.com
"""


@dataclass(frozen=True)
class Options:
    """`invoke scenario proxy-chaos --set key=value`."""

    file: Path = DEFAULT_FILE
    """Timeline YAML: the load, the steady-state probes and the faults (see this module's docstring)."""
    duration_s: float = 0.0
    """Seconds of load at least, to stretch it beyond what the timeline needs."""

    def validate(self) -> None:
        if not self.file.is_file():
            raise ConfigError(f"proxy-chaos: timeline {self.file} not found; pass --file PATH to a timeline YAML")
        if self.duration_s < 0:
            raise ConfigError("proxy-chaos: --duration must be >= 0")


def create(options: Options) -> ChaosScenario:
    return ChaosScenario(options)


def load_timeline(path: Path) -> dict[str, Any]:
    """Read and check a timeline; toxics are validated by the gateway's own parser. A bad timeline is a
    ConfigError naming the file, before the run writes anything."""
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not YAML: {exc}") from None
    faults = spec.get("faults") or []
    if not faults:
        raise ConfigError(f"{path}: a timeline needs at least one fault")
    for index, fault in enumerate(faults):
        fault.setdefault("name", f"fault-{index}")
        if "at_s" not in fault or "for_s" not in fault or "toxic" not in fault:
            raise ConfigError(f"{path}: fault {fault['name']} needs at_s, for_s and toxic")
        fault["toxic"] = {**fault["toxic"], "name": fault["name"]}
        try:
            Toxic.from_dict(fault["toxic"])
        except ValueError as exc:
            raise ConfigError(f"{path}: fault {fault['name']}: {exc}") from None
    steady = spec.setdefault("steady_state", {})
    steady.setdefault("window_s", DEFAULT_WINDOW_S)
    for probe in steady.setdefault("probes", []):
        if probe.get("metric") not in METRICS or "below" not in probe:
            raise ConfigError(f"{path}: probe {probe} needs metric (one of {METRICS}) and below")
    spec.setdefault("load", {})
    spec.setdefault("recovery_s", DEFAULT_RECOVERY_S)
    spec.setdefault("title", path.stem)
    return spec


def audit_figures(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """Model-API figures from audit records: latency (duration_ms) of 2xx, share of the rest."""
    model = [r for r in records if r.get("host") == MODEL_HOST and r.get("event") == "request"]
    ok = [
        float(r["duration_ms"])
        for r in model
        if r.get("decision") == "allow" and 200 <= int(r.get("status") or 0) < 300 and r.get("duration_ms")
    ]
    total = len(model)
    return {
        "requests": total,
        "p50_ms": round(percentile(ok, 50), 3) if ok else None,
        "p95_ms": round(percentile(ok, 95), 3) if ok else None,
        "error_rate_pct": round(100.0 * (total - len(ok)) / total, 3) if total else None,
        "rps": None,
    }


def read_audit(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return out


def series(points: list[tuple[float, float, bool]], start: float, end: float) -> list[list[float | None]]:
    """[t, requests/s, p50 ms, p95 ms, error %] per BIN_S from (t, ms, ok) points."""
    bins: dict[int, list[tuple[float, bool]]] = {}
    for t, ms, ok in points:
        if start <= t <= end:
            bins.setdefault(math.floor((t - start) / BIN_S), []).append((ms, ok))
    rows: list[list[float | None]] = []
    for index in range(math.ceil((end - start) / BIN_S)):
        group = bins.get(index, [])
        good = [ms for ms, ok in group if ok]
        rows.append(
            [
                round(index * BIN_S, 2),
                round(len(group) / BIN_S, 2),
                round(percentile(good, 50), 3) if good else None,
                round(percentile(good, 95), 3) if good else None,
                round(100.0 * (len(group) - len(good)) / len(group), 2) if group else None,
            ]
        )
    return rows


class ChaosScenario:
    name = NAME

    def __init__(self, options: Options) -> None:
        self.options = options
        self.file = options.file
        self.spec = load_timeline(self.file)
        self.upstream: UpstreamServer | None = None
        self.fleet: Fleet | None = None
        self.load_thread: threading.Thread | None = None
        self.load_result: dict[str, Any] = {}
        self.t0: float | None = None  # wall clock when the fault timeline started
        self.load_start: float | None = None
        self.windows: list[dict[str, Any]] = []
        self.deviated = False

    @property
    def gateway(self) -> GatewayProcess:
        assert self.fleet is not None and self.fleet.gateway is not None
        return self.fleet.gateway

    def timeline_s(self) -> float:
        return max(float(f["at_s"]) + float(f["for_s"]) for f in self.spec["faults"])

    # ---- setup: stand-in model API, gateway, Locust load ---------------------------------------
    def setup(self, ctx: ScenarioContext) -> None:
        with ctx.journal.activity("start-model-api-stand-in") as act:
            self.upstream = ctx.keep(UpstreamServer(expected={MODEL_HOST: ("x-api-key", MODEL_KEY)}))
            act.output = {"https_port": self.upstream.https_port}
        policy = ctx.run_dir / "proxy-chaos-policy.yaml"
        policy.write_text(POLICY)
        config = GatewayConfig(
            policy=policy,
            audit_path=ctx.run_dir / "gateway-audit.jsonl",
            state_dir=ctx.run_dir / "gateway",
            credentials=[CredentialSpec("anthropic", MODEL_HOST, "x-api-key", env=MODEL_KEY_ENV)],
            upstream_overrides=self.upstream.overrides((MODEL_HOST,)),
            upstream_ca_file=self.upstream.ca_file,
            extra_env={MODEL_KEY_ENV: MODEL_KEY},
        )
        self.fleet = ctx.keep(ctx.fleet(config))
        with ctx.journal.activity("start-locust-load") as act:
            act.output = self.start_load(ctx)

    def start_load(self, ctx: ScenarioContext) -> dict[str, Any]:
        # harness.load imports no locust itself: Locust runs in processes the Supervisor owns.
        from harness.load.plan import LoadPlan
        from harness.load.runner import PhaseSpec, run_phase

        assert self.upstream is not None and self.upstream.ca_file is not None
        port = self.gateway.add_sandbox(LOAD_SANDBOX)
        bundle = ctx.run_dir / "chaos-ca-bundle.pem"
        bundle.write_bytes(self.gateway.ca_cert_pem() + b"\n" + self.upstream.ca_file.read_bytes())
        load = self.spec["load"]
        steady = self.spec["steady_state"]
        duration = 2 * float(steady["window_s"]) + self.timeline_s() + float(self.spec["recovery_s"]) + LOAD_SLACK_S
        duration = max(duration, self.options.duration_s)
        users = int(load.get("users", DEFAULT_USERS))
        plan = LoadPlan(
            target="gateway-chaos",
            proxy=("127.0.0.1", port),
            urls={"model": MODEL_URL},
            ca_file=str(bundle),
            samples_dir="",
            user_rps=float(load.get("user_rps", DEFAULT_USER_RPS)),
            headers={"model": {"x-api-key": "proxy-managed"}},
            timeout_s=REQUEST_TIMEOUT_S,
        )
        phase = PhaseSpec(
            name="chaos",
            users=users,
            spawn_rate=users,
            warmup_s=0.0,
            duration_s=duration,
            traffic=("model",),
            workers=0,
        )
        out_dir = ctx.run_dir / "locust"

        def run() -> None:
            try:
                self.load_result = run_phase(plan, phase, out_dir, ctx.supervisor, [self.gateway.pid])
            except Exception as exc:  # surfaced in results; the probes see the missing traffic anyway
                self.load_result = {"error": f"{type(exc).__name__}: {exc}"}

        self.load_start = time.time()
        self.load_thread = threading.Thread(target=run, name="chaos-load", daemon=True)
        self.load_thread.start()
        # Wait until the users' requests show up in the audit log: the load is running.
        deadline = time.monotonic() + LOAD_START_WAIT_S
        while time.monotonic() < deadline:
            if any(r.get("sandbox") == LOAD_SANDBOX for r in read_audit(self.gateway.audit_path)):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"no load reached the gateway in {LOAD_START_WAIT_S}s: {self.load_result}")
        return {"users": users, "user_rps": plan.user_rps, "duration_s": duration, "listener_port": port}

    # ---- steady state ---------------------------------------------------------------------------
    def steady_state(self, ctx: ScenarioContext) -> dict[str, Any]:
        steady = self.spec["steady_state"]
        when = "after" if self.t0 is not None else "before"
        if when == "after":
            time.sleep(float(self.spec["recovery_s"]))
        window = float(steady["window_s"])
        with ctx.journal.activity(f"probe:steady-state-{when}", "probe") as act:
            start = time.time()
            time.sleep(window)
            end = time.time()
            records = [
                r
                for r in read_audit(self.gateway.audit_path)
                if r.get("sandbox") == LOAD_SANDBOX and start <= float(r["ts"]) <= end
            ]
            figures = audit_figures(records)
            figures["rps"] = round(figures["requests"] / window, 2) if figures["requests"] else 0.0
            probes = []
            for probe in steady["probes"]:
                value = figures.get(probe["metric"])
                met = value is not None and float(value) < float(probe["below"])
                probes.append(
                    {
                        "name": probe.get("name", probe["metric"]),
                        "metric": probe["metric"],
                        "value": value,
                        "tolerance": f"< {probe['below']}",
                        "met": met,
                    }
                )
            act.output = {"figures": figures, "probes": probes}
        self.windows.append({"when": when, "start": start, "end": end})
        return {
            "met": all(p["met"] for p in probes),
            "probes": probes,
            "figures": figures,
            "window_s": window,
            "source": "gateway audit log",
        }

    # ---- the timeline -----------------------------------------------------------------------------
    def run(self, ctx: ScenarioContext) -> None:
        events: list[tuple[float, str, dict[str, Any]]] = []
        for fault in self.spec["faults"]:
            events.append((float(fault["at_s"]), "on", fault))
            events.append((float(fault["at_s"]) + float(fault["for_s"]), "off", fault))
        events.sort(key=lambda e: (e[0], e[1] == "on"))  # at the same instant, switch off first
        self.t0 = time.time()
        started = time.monotonic()
        open_acts: dict[str, Activity] = {}
        windows: list[dict[str, Any]] = []
        for at_s, what, fault in events:
            delay = at_s - (time.monotonic() - started)
            if delay > 0:
                time.sleep(delay)
            if what == "on":
                act = Activity(name=f"fault:{fault['name']}", type="action")
                ctx.journal.run.append(act)
                open_acts[fault["name"]] = act
                try:
                    toxic = self.gateway.add_toxic(fault["toxic"])
                    act.output = {"toxic": toxic, "on_s": round(time.time() - self.t0, 3)}
                except Exception as exc:
                    act.status, act.error, act.end = "failed", f"{type(exc).__name__}: {exc}", now()
                    raise
            else:
                act = open_acts.pop(fault["name"])
                removed = self.gateway.remove_toxic(fault["name"])
                off_s = round(time.time() - self.t0, 3)
                act.output = {**(act.output or {}), "off_s": off_s, "removed": removed}
                act.status, act.end, act.duration_s = "succeeded", now(), round(off_s - act.output["on_s"], 3)
                windows.append(
                    {
                        "name": fault["name"],
                        "type": fault["toxic"]["type"],
                        "on_s": act.output["on_s"],
                        "off_s": off_s,
                        "toxic": act.output["toxic"],
                    }
                )
            ctx.save()
        ctx.data["chaos"] = {"title": self.spec["title"], "file": str(self.file), "faults": windows}

    def rollback(self, ctx: ScenarioContext) -> None:
        """Clear every toxic, let the load finish, and collect; the runner then stops the fleet and stand-in."""
        with ctx.journal.activity("clear-toxics", "rollback") as act:
            act.output = {
                "removed": self.gateway.clear_toxics() if self.fleet else [],
                "applied": self.gateway.toxics()["applied"] if self.fleet else {},
            }
            applied = act.output["applied"]
        with ctx.journal.activity("wait-for-load", "rollback"):
            if self.load_thread is not None:
                self.load_thread.join(timeout=self.timeline_s() + 120)
        self.collect(ctx, applied)

    def collect(self, ctx: ScenarioContext, applied: dict[str, int]) -> None:
        """Per-second series from Locust's samples (client view) and the audit log (gateway view)."""
        from harness.load.analyse import read_samples

        data = ctx.data.setdefault("chaos", {"title": self.spec["title"], "file": str(self.file), "faults": []})
        origin = self.t0 or self.load_start or time.time()
        samples = read_samples(ctx.run_dir / "locust" / "samples")
        first = min([s.t for s in samples], default=origin)
        last = max([s.t for s in samples], default=origin)
        client = [(s.t, s.ms, not s.failure) for s in samples if s.name == "model"]
        failures: dict[str, int] = {}
        for s in samples:
            if s.failure:
                failures[s.failure] = failures.get(s.failure, 0) + 1
        audit = [
            r
            for r in read_audit(self.gateway.audit_path if self.fleet else Path("/nonexistent"))
            if r.get("sandbox") == LOAD_SANDBOX and r.get("host") == MODEL_HOST and r.get("event") == "request"
        ]
        gateway_points = [
            (
                float(r["ts"]),
                float(r.get("duration_ms") or 0.0),
                r.get("decision") == "allow" and 200 <= int(r.get("status") or 0) < 300,
            )
            for r in audit
        ]
        data.update(
            origin=origin,
            load_offset_s=round(first - origin, 3),
            client_series=[[round(row[0] + first - origin, 2), *row[1:]] for row in series(client, first, last)],
            gateway_series=[
                [round(row[0] + first - origin, 2), *row[1:]] for row in series(gateway_points, first, last)
            ],
            columns=["t_s", "rps", "p50_ms", "p95_ms", "error_pct"],
            client_failures=failures,
            steady_windows=[
                {"when": w["when"], "start_s": round(w["start"] - origin, 3), "end_s": round(w["end"] - origin, 3)}
                for w in self.windows
            ],
            toxics_applied=applied,
            load={k: v for k, v in self.load_result.items() if k not in ("timeline", "history")},
            steady_state_held=None,
        )
        ctx.save()

    def exit_code(self, ctx: ScenarioContext) -> int:
        journal = ctx.journal
        held = journal.status == "completed" and not journal.deviated
        if "chaos" in ctx.data:
            ctx.data["chaos"]["steady_state_held"] = held
        return 0 if held else 1


def terminal_summary(data: dict[str, Any]) -> str:
    """Whether the steady state held, and the faults that ran, from the run's saved data."""
    chaos = data.get("chaos") or {}
    faults = ", ".join(f"{f['name']} ({f['type']}, {f['on_s']} to {f['off_s']} s)" for f in chaos.get("faults", []))
    return (
        f"{chaos.get('title', 'proxy-chaos')}: faults {faults or 'none'}; "
        f"steady state held: {chaos.get('steady_state_held')}"
    )
