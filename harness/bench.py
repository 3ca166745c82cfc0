"""`invoke bench`: boot N sandboxes per round, measure boot phases and host memory, write results."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.fleet import Fleet, boot_into, boot_record, open_fleet
from harness.gateway.audit import summarise as summarise_audit
from harness.gateway.policy import PolicyError, load_policy
from harness.gateway.process import GatewayConfig
from harness.gateway.upstream import DEFAULT_NAMES as UPSTREAM_NAMES
from harness.gateway.upstream import UpstreamServer
from harness.load.bench import ProxyBenchConfig, load_partial, run_proxy_bench
from harness.load.guest import sample_in_guest
from harness.metrics.memory import MemorySampler, mem_available_bytes, process_memory
from harness.metrics.stats import summarize
from harness.paths import cache_dir
from harness.report import render_report
from harness.results import (
    BOOT_SAMPLES_FILE,
    MEMORY_SAMPLES_FILE,
    SCHEMA,
    host_info,
    new_run_id,
    write_results,
)
from harness.sandbox import (
    BackendOptions,
    BootFailed,
    SandboxSpec,
    available_backends,
    backend_features,
    create_backend,
    describe_backend,
)
from harness.sandbox.base import BOOT_MODES
from harness.supervisor import Interrupted, Supervisor, signals_raise

IDLE_SETTLE_S = 2.0
"""Wait after the last boot of a round before reading idle memory."""

GATEWAY_AUDIT_FILE = "gateway-audit.jsonl"

GUEST_SAMPLE_HOST = "deb.debian.org"
"""A host the balanced policy allows on plain http :80; the gateway sends it to the local upstream."""
GUEST_SAMPLE_URL = f"http://{GUEST_SAMPLE_HOST}/bytes/1024"

MAX_SANDBOXES = 256
"""Sanity bound on --sandboxes; ram-pressure finds the real limit."""


@dataclass(frozen=True)
class BenchConfig:
    """Everything a bench run is parameterised by; recorded verbatim in results.json."""

    sandboxes: int = 4
    """N sandboxes booted concurrently per round."""
    backend: str = "qemu"
    """Sandbox backend module name."""
    out: Path | None = None
    """Run directory; results/<run-id> by default."""
    accel: str = "auto"
    """auto, kvm or tcg."""
    concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Boots in flight at once."""
    warmup: int = 1
    """Discarded rounds before the measured ones."""
    repeat: int = 1
    """Measured rounds."""
    mem_mib: int = 128
    """Guest RAM per sandbox."""
    boot_timeout_s: float = 60.0
    """A sandbox not ready by then counts as a failed boot."""
    idle_settle_s: float = IDLE_SETTLE_S
    """Idle time before memory is read."""
    policy: str = "balanced"
    """Gateway policy preset or file."""
    boot_mode: str = "snapshot"
    """snapshot: restore each sandbox from a booted template; cold: boot its kernel."""
    guest_samples: int = 10
    """Timed requests through the gateway from inside each sandbox of the last round (0 = none)."""
    proxy: ProxyBenchConfig | None = field(default_factory=ProxyBenchConfig)
    """The Locust latency comparison through the gateway and its peers; None skips it."""

    def validate(self) -> None:
        if self.proxy is not None:
            self.proxy.validate()
        if self.guest_samples < 0:
            raise ConfigError("--guest-samples must be >= 0")
        if not 1 <= self.sandboxes <= MAX_SANDBOXES:
            raise ConfigError(f"--sandboxes must be between 1 and {MAX_SANDBOXES}, not {self.sandboxes}")
        if self.backend not in available_backends():
            raise ConfigError(f"unknown backend {self.backend!r}; choose one of: {', '.join(available_backends())}")
        if self.concurrency < 1:
            raise ConfigError(f"--concurrency must be at least 1, not {self.concurrency}")
        if self.warmup < 0 or self.repeat < 1:
            raise ConfigError("--warmup must be >= 0 and --repeat >= 1")
        floor = backend_features(self.backend).min_mem_mib
        if floor is not None and self.mem_mib < floor:
            raise ConfigError(f"--mem-mib must be at least {floor} for the {self.backend} backend, not {self.mem_mib}")
        try:
            load_policy(self.policy)
        except PolicyError as exc:
            raise ConfigError(f"--policy: {exc}") from None
        if self.boot_mode not in BOOT_MODES:
            raise ConfigError(f"--boot-mode must be one of {', '.join(BOOT_MODES)}, not {self.boot_mode!r}")
        if self.boot_timeout_s <= 0:
            raise ConfigError("--boot-timeout must be positive")


class BenchEvents:
    """Callbacks the terminal layer implements; the bench itself prints nothing."""

    def stage(self, text: str) -> None: ...
    def round_started(self, label: str, total: int) -> None: ...
    def sandbox_done(self, record: dict[str, Any]) -> None: ...
    def round_finished(self, label: str) -> None: ...


@dataclass
class BenchRun:
    """A bench in progress: the results it has so far, written after every step."""

    config: BenchConfig
    run_dir: Path
    run_id: str
    data: dict[str, Any]

    def save(self) -> Path:
        return write_results(self.run_dir, self.data)


def _config_dict(config: BenchConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}


def boot_one(fleet: Fleet, record: dict[str, Any]) -> None:
    """Boot one sandbox into `record`; a failed boot is recorded with its reason, never retried."""
    with contextlib.suppress(BootFailed):
        boot_into(fleet, record)


def run_round(
    run: BenchRun,
    fleet: Fleet,
    round_index: int,
    measured: bool,
    events: BenchEvents,
    while_live: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Boot N at once, read idle memory, stop them all, and check no VMM is left."""
    config = run.config
    label = f"round {round_index}" if measured else f"warm-up {-round_index}"
    prefix = f"r{round_index}" if measured else f"w{-round_index}"
    records = [boot_record(f"{prefix}-sb{i}", round_index) for i in range(config.sandboxes)]
    mem_before = mem_available_bytes()
    events.round_started(label, config.sandboxes)
    started = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="boot")
    try:
        futures = {pool.submit(boot_one, fleet, record): record for record in records}
        for future in as_completed(futures):
            future.result()
            events.sandbox_done(futures[future])
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    wall_ms = (time.monotonic() - started) * 1000
    ok = [r for r in records if r["ok"]]
    round_info: dict[str, Any] = {
        "index": round_index,
        "measured": measured,
        "wall_ms": round(wall_ms, 1),
        "ok": len(ok),
        "failed": len(records) - len(ok),
    }
    if ok:
        time.sleep(config.idle_settle_s)
        mem_idle = mem_available_bytes()
        round_info.update(
            mem_available_before_bytes=mem_before,
            mem_available_idle_bytes=mem_idle,
            mem_available_delta_bytes_per_sandbox=(mem_before - mem_idle) // len(ok),
        )
        for record in ok:
            totals = {"rss": 0, "pss": 0, "uss": 0}
            for pid in fleet.live[record["id"]].pids():
                for key, value in process_memory(pid).items():
                    totals[key] += value
            record.update(host_rss_bytes=totals["rss"], host_pss_bytes=totals["pss"], host_uss_bytes=totals["uss"])
        if while_live:
            while_live(ok)
    run.data["leftover_vmm_pids"] += fleet.stop_all()
    events.round_finished(label)
    run.data["rounds"].append(round_info)
    return records


def sample_guests(run: BenchRun, fleet: Fleet, ok: list[dict[str, Any]], events: BenchEvents) -> None:
    """The latency an agent inside actually sees: timed requests through its gateway listener."""
    events.stage(f"timing {run.config.guest_samples} requests through the gateway from inside each sandbox")
    samples = {}
    for record in ok:
        samples[record["id"]] = sample_in_guest(fleet.live[record["id"]], GUEST_SAMPLE_URL, n=run.config.guest_samples)
    run.data["guest_latency"] = {"url": GUEST_SAMPLE_URL, "accel": run.data["accel"], "sandboxes": samples}


def summarize_run(data: dict[str, Any]) -> dict[str, Any]:
    sandboxes = data["sandboxes"]
    ok = [s for s in sandboxes if s["ok"]]
    deltas = [
        r["mem_available_delta_bytes_per_sandbox"]
        for r in data["rounds"]
        if r["measured"] and "mem_available_delta_bytes_per_sandbox" in r
    ]
    pss = [s["host_pss_bytes"] for s in ok if s["host_pss_bytes"] is not None]
    phase_names = sorted({name for s in ok for name in s["phases_ms"]})
    return {
        "boot_ms": summarize([s["boot_ms"] for s in ok]),
        "phases_ms": {
            name: summarize([s["phases_ms"][name] for s in ok if name in s["phases_ms"]]) for name in phase_names
        },
        "success_rate": round(len(ok) / len(sandboxes), 4) if sandboxes else None,
        "boots": len(sandboxes),
        "failures": len(sandboxes) - len(ok),
        "mem_available_delta_bytes_per_sandbox": int(sum(deltas) / len(deltas)) if deltas else None,
        "pss_bytes_per_sandbox_p50": summarize(pss)["p50"] if pss else None,
        "pss_bytes_per_sandbox": summarize(pss),
        "rss_bytes_per_sandbox": summarize([s["host_rss_bytes"] for s in ok if s["host_rss_bytes"]]),
    }


def run_bench(
    config: BenchConfig, events: BenchEvents | None = None, after_setup: Callable[[BenchRun], None] | None = None
) -> BenchRun:
    """Run the whole bench; always writes results.json (partial when interrupted) and the report."""
    config.validate()
    events = events or BenchEvents()
    run_id = new_run_id()
    run_dir = config.out or Path("results") / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    run = BenchRun(
        config=config,
        run_dir=run_dir,
        run_id=run_id,
        data={
            "schema": SCHEMA,
            "run_id": run_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "partial": True,
            "interrupted_by": None,
            "host": host_info(),
            "backend": {"name": config.backend},
            "accel": None,
            "config": _config_dict(config),
            "rounds": [],
            "sandboxes": [],
            "summary": summarize_run({"sandboxes": [], "rounds": []}),
            "leftover_vmm_pids": [],
            "files": {"memory_samples": MEMORY_SAMPLES_FILE, "boot_samples": BOOT_SAMPLES_FILE},
        },
    )
    run.save()
    supervisor = Supervisor(run_id)
    fleet: Fleet | None = None
    upstream: UpstreamServer | None = None
    sampler = MemorySampler(run_dir / MEMORY_SAMPLES_FILE, lambda: fleet.pids() if fleet else {})
    try:
        with signals_raise():
            events.stage(f"preparing backend {config.backend} (image, accelerator)")
            backend = create_backend(
                config.backend,
                BackendOptions(
                    cache=cache_dir(), accel=config.accel, mem_mib=config.mem_mib, boot_mode=config.boot_mode
                ),
            )
            run.data["backend"] = describe_backend(backend)
            run.data["accel"] = backend.accel
            events.stage(f"accelerator: {backend.accel} — {run.data['backend'].get('accel_reason', '')}")
            run.save()
            template = SandboxSpec(
                id="",
                workdir=run_dir,
                mem_mib=config.mem_mib,
                boot_timeout_s=config.boot_timeout_s,
            )
            upstream = UpstreamServer(names=(*UPSTREAM_NAMES, GUEST_SAMPLE_HOST)).start()
            gateway_config = GatewayConfig(
                policy=config.policy,
                audit_path=run_dir / GATEWAY_AUDIT_FILE,
                state_dir=run_dir / "gateway",
                upstream_overrides=upstream.overrides(),
                upstream_ca_file=upstream.ca_file,
            )
            events.stage(f"starting the gateway (policy {config.policy}); every sandbox egresses through it")
            with open_fleet(backend, supervisor, run_dir, template, gateway_config) as fleet:
                run.data["gateway"] = {"policy": config.policy, "audit_file": GATEWAY_AUDIT_FILE}
                if after_setup:
                    after_setup(run)
                sampler.start()
                for warm in range(1, config.warmup + 1):
                    run_round(run, fleet, -warm, measured=False, events=events)
                    run.save()
                with (run_dir / BOOT_SAMPLES_FILE).open("a") as boot_samples:
                    for round_index in range(config.repeat):
                        last = round_index == config.repeat - 1
                        records = run_round(
                            run,
                            fleet,
                            round_index,
                            measured=True,
                            events=events,
                            while_live=(lambda ok: sample_guests(run, fleet, ok, events))
                            if last and config.guest_samples
                            else None,
                        )
                        run.data["sandboxes"] += records
                        for record in records:
                            boot_samples.write(json.dumps(record) + "\n")
                        run.data["summary"] = summarize_run(run.data)
                        run.save()
            if config.proxy is not None:
                events.stage("proxy latency under load: Locust through direct, gateway and peer proxies")
                run.data["proxy"] = run_proxy_bench(config.proxy, run_dir, supervisor)
                run.save()
            run.data["partial"] = False
    except (KeyboardInterrupt, Interrupted) as exc:
        run.data["interrupted_by"] = signal.Signals(exc.signum).name if isinstance(exc, Interrupted) else "SIGINT"
        raise
    except Exception as exc:
        run.data["interrupted_by"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        sampler.stop()
        if upstream is not None:
            upstream.stop()
        if config.proxy is not None and "proxy" not in run.data and (partial_proxy := load_partial(run_dir)):
            run.data["proxy"] = partial_proxy
        if fleet is not None:
            run.data["leftover_vmm_pids"] += fleet.stop_all()
        supervisor.shutdown()
        if (run_dir / GATEWAY_AUDIT_FILE).exists():
            run.data.setdefault("gateway", {})["decisions"] = summarise_audit(run_dir / GATEWAY_AUDIT_FILE)
        run.data["summary"] = summarize_run(run.data)
        run.save()
        try:
            render_report(run_dir)
        except Exception as exc:  # the results are safe on disk; a report bug must not hide the run's own error
            run.data["report_error"] = f"{type(exc).__name__}: {exc}"
            run.save()
    return run
