"""`invoke bench`: boot N sandboxes per round, measure boot phases and host memory, write results."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.config import RunConfig
from harness.errors import ConfigError
from harness.fleet import Fleet, boot_into, open_fleet
from harness.gateway.audit import summarise as summarise_audit
from harness.gateway.policy import PolicyError, load_policy
from harness.gateway.process import GatewayConfig
from harness.ksm import settle as ksm_settle
from harness.load.bench import ProxyBenchConfig, load_partial, run_proxy_bench
from harness.load.guest import sample_in_guest
from harness.metrics.memory import (
    MemorySampler,
    file_resident_bytes,
    mapped_pss_bytes,
    mem_available_bytes,
    process_memory,
)
from harness.multirun import Comparison, open_comparison
from harness.results import BOOT_SAMPLES_FILE, MEMORY_SAMPLES_FILE
from harness.run import Run, open_run
from harness.sandbox import BootFailed
from harness.sandbox.base import SandboxRecord
from harness.standins.upstream import DEFAULT_NAMES as UPSTREAM_NAMES
from harness.standins.upstream import UpstreamServer

IDLE_SETTLE_S = 2.0
"""Wait after the last boot of a round before reading idle memory."""

GATEWAY_AUDIT_FILE = "gateway-audit.jsonl"

GUEST_SAMPLE_HOST = "deb.debian.org"
"""A host the balanced policy allows on plain http :80; the gateway sends it to the local upstream."""
GUEST_SAMPLE_URL = f"http://{GUEST_SAMPLE_HOST}/bytes/1024"

MAX_SANDBOXES = 256
"""Sanity bound on --sandboxes; ram-pressure finds the real limit."""


@dataclass(frozen=True)
class BenchConfig(RunConfig):
    """Everything a bench run is parameterised by (the run settings, then the bench's own); recorded verbatim
    in results.json."""

    sandboxes: int = 4
    """N sandboxes booted concurrently per round."""
    concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Boots in flight at once (default: the host's cores)."""
    warmup: int = 1
    """Discarded rounds before the measured ones."""
    repeat: int = 1
    """Measured rounds."""
    idle_settle_s: float = IDLE_SETTLE_S
    """Idle time before memory is read."""
    policy: str = "balanced"
    """Gateway policy: open, balanced, locked or a policy YAML."""
    guest_samples: int = 10
    """Timed requests through the gateway from inside each sandbox of the last round (0 = none)."""
    proxy: ProxyBenchConfig | None = field(default_factory=ProxyBenchConfig)
    """The Locust latency comparison through the gateway and its peers; None skips it."""

    def validate(self) -> None:
        super().validate()
        if self.proxy is not None:
            self.proxy.validate()
        if self.guest_samples < 0:
            raise ConfigError("--guest-samples must be >= 0")
        if not 1 <= self.sandboxes <= MAX_SANDBOXES:
            raise ConfigError(f"--sandboxes must be between 1 and {MAX_SANDBOXES}, not {self.sandboxes}")
        if self.concurrency < 1:
            raise ConfigError(f"--concurrency must be at least 1, not {self.concurrency}")
        if self.warmup < 0 or self.repeat < 1:
            raise ConfigError("--warmup must be >= 0 and --repeat >= 1")
        try:
            load_policy(self.policy)
        except PolicyError as exc:
            raise ConfigError(f"--policy: {exc}") from None


class BenchEvents:
    """Callbacks the terminal layer implements; the bench itself prints nothing."""

    def stage(self, text: str) -> None: ...
    def round_started(self, label: str, total: int) -> None: ...
    def sandbox_done(self, record: SandboxRecord) -> None: ...
    def round_finished(self, label: str) -> None: ...


def _config_dict(config: BenchConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}


def boot_one(fleet: Fleet, record: SandboxRecord) -> None:
    """Boot one sandbox into `record`; a failed boot is recorded with its reason, never retried."""
    with contextlib.suppress(BootFailed):
        boot_into(fleet, record)


def run_round(
    run: Run,
    config: BenchConfig,
    fleet: Fleet,
    round_index: int,
    measured: bool,
    events: BenchEvents,
    while_live: Callable[[list[SandboxRecord]], None] | None = None,
    title: str = "",
) -> list[SandboxRecord]:
    """Boot N at once, read idle memory, stop them all, and check no VMM is left."""
    label = f"round {round_index}" if measured else f"warm-up {-round_index}"
    label = f"{title} {label}" if title else label
    prefix = f"r{round_index}" if measured else f"w{-round_index}"
    records = [SandboxRecord(f"{prefix}-sb{i}", round_index) for i in range(config.sandboxes)]
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
    ok = [r for r in records if r.ok]
    round_info: dict[str, Any] = {
        "index": round_index,
        "measured": measured,
        "wall_ms": round(wall_ms, 1),
        "ok": len(ok),
        "failed": len(records) - len(ok),
    }
    if ok:
        time.sleep(config.idle_settle_s)
        if run.data.get("ksm"):
            round_info["ksm"] = ksm_settle()  # KSM merges nothing until ksmd has seen a page twice
        mem_idle = mem_available_bytes()
        round_info.update(
            mem_available_before_bytes=mem_before,
            mem_available_idle_bytes=mem_idle,
            mem_available_delta_bytes_per_sandbox=(mem_before - mem_idle) // len(ok),
        )
        # Files every sandbox maps (a template's RAM): resident before the round began, so in no Δ, and
        # only a share of them in each PSS.
        shared_files = run.data["backend"].get("shared_files") or []
        if shared_files:
            round_info["shared_file_resident_bytes"] = sum(file_resident_bytes(Path(p)) or 0 for p in shared_files)
        for record in ok:
            pids = fleet.live[record.id].pids()
            if not pids:
                continue  # a backend that cannot name its host processes (a command stack without pids): n/a, not 0
            totals = {"rss": 0, "pss": 0, "uss": 0}
            for pid in pids:
                for key, value in process_memory(pid).items():
                    totals[key] += value
            record.host_rss_bytes, record.host_pss_bytes, record.host_uss_bytes = (
                totals["rss"],
                totals["pss"],
                totals["uss"],
            )
            record.host_shared_pss_bytes = sum(mapped_pss_bytes(pid, shared_files) for pid in pids)
        if while_live:
            while_live(ok)
    run.data["leftover_vmm_pids"] += fleet.stop_all()
    events.round_finished(label)
    run.data["rounds"].append(round_info)
    return records


def sample_guests(run: Run, config: BenchConfig, fleet: Fleet, ok: list[SandboxRecord], events: BenchEvents) -> None:
    """The latency an agent inside actually sees: timed requests through its gateway listener."""
    events.stage(f"timing {config.guest_samples} requests through the gateway from inside each sandbox")
    samples = {}
    for record in ok:
        samples[record.id] = sample_in_guest(fleet.live[record.id], GUEST_SAMPLE_URL, n=config.guest_samples)
    run.data["guest_latency"] = {"url": GUEST_SAMPLE_URL, "accel": run.data["accel"], "sandboxes": samples}


@dataclass
class BackendBench:
    """One backend's bench run, open for rounds: its run directory, gateway, fleet and memory sampler."""

    run: Run
    """Its run: results.json, report, supervisor."""
    config: BenchConfig
    """Its settings (`backend` names this one backend)."""
    fleet: Fleet
    """Its gateway and sandboxes."""
    events: BenchEvents
    """Progress callbacks."""
    title: str = ""
    """Prefix of its round labels in progress output (the backend, when several share a run)."""

    def round(self, round_index: int) -> None:
        """Boot, measure and stop one round; negative indexes are warm-ups. The last measured round also times
        requests through the gateway from inside (--guest-samples)."""
        config, run = self.config, self.run
        measured = round_index >= 0
        last = round_index == config.repeat - 1
        sample = (
            (lambda ok: sample_guests(run, config, self.fleet, ok, self.events))
            if last and config.guest_samples
            else None
        )
        records = run_round(run, config, self.fleet, round_index, measured, self.events, sample, self.title)
        if measured:
            run.sandboxes += records
            with (run.run_dir / BOOT_SAMPLES_FILE).open("a") as boot_samples:
                for record in records:
                    boot_samples.write(json.dumps(record.to_json()) + "\n")
        run.save()


def bench_rounds(config: BenchConfig) -> list[int]:
    """Every round's index in the order run: warm-ups (negative) first, then the measured ones."""
    return [-warm for warm in range(1, config.warmup + 1)] + list(range(config.repeat))


def bench_sections() -> dict[str, Any]:
    """results.json sections every bench run starts with."""
    return {
        "leftover_vmm_pids": [],
        "files": {"memory_samples": MEMORY_SAMPLES_FILE, "boot_samples": BOOT_SAMPLES_FILE},
    }


@contextmanager
def open_bench_fleet(run: Run, config: BenchConfig, events: BenchEvents, title: str = "") -> Iterator[BackendBench]:
    """The run's backend made, an upstream stand-in and the gateway started, and the fleet open for rounds; on
    the way out (however it ends) every sandbox is stopped and the gateway's audit summarised."""
    run_dir = run.run_dir
    fleet: Fleet | None = None
    upstream: UpstreamServer | None = None
    sampler = MemorySampler(run_dir / MEMORY_SAMPLES_FILE, lambda: fleet.pids() if fleet else {})
    try:
        backend = run.open_backend(events.stage)
        events.stage(
            f"{title or backend.name}: accelerator {backend.accel} — {run.data['backend'].get('accel_reason', '')}"
        )
        assert run.template is not None
        upstream = UpstreamServer(names=(*UPSTREAM_NAMES, GUEST_SAMPLE_HOST)).start()
        gateway_config = GatewayConfig(
            policy=config.policy,
            audit_path=run_dir / GATEWAY_AUDIT_FILE,
            state_dir=run_dir / "gateway",
            upstream_overrides=upstream.overrides(),
            upstream_ca_file=upstream.ca_file,
        )
        events.stage(f"starting the gateway (policy {config.policy}); every sandbox egresses through it")
        with open_fleet(backend, run.supervisor, run_dir, run.template, gateway_config) as fleet:
            run.data["gateway"] = {"policy": config.policy, "audit_file": GATEWAY_AUDIT_FILE}
            sampler.start()
            yield BackendBench(run, config, fleet, events, title)
    finally:
        sampler.stop()
        if upstream is not None:
            upstream.stop()
        if fleet is not None:
            run.data["leftover_vmm_pids"] += fleet.stop_all()
        # The fleet's exit stopped the gateway, so its audit log is complete.
        if (run_dir / GATEWAY_AUDIT_FILE).exists():
            run.data.setdefault("gateway", {})["decisions"] = summarise_audit(run_dir / GATEWAY_AUDIT_FILE)
        run.save()


def run_bench(config: BenchConfig, events: BenchEvents | None = None) -> Run:
    """Run the whole bench on one backend; always writes results.json (partial when interrupted) and the
    report. (Several backends: run_bench_comparison.)"""
    config.validate()
    events = events or BenchEvents()
    with open_run(config, _config_dict(config), bench_sections()) as run:
        try:
            with open_bench_fleet(run, config, events) as bench:
                for round_index in bench_rounds(config):
                    bench.round(round_index)
            if config.proxy is not None:
                events.stage("proxy bench: Locust rounds and hey capacity through direct, gateway and peer proxies")
                run.data["proxy"] = run_proxy_bench(config.proxy, run.run_dir, run.supervisor, events)
                run.save()
        finally:
            if config.proxy is not None and "proxy" not in run.data and (partial_proxy := load_partial(run.run_dir)):
                run.data["proxy"] = partial_proxy
    return run


def run_bench_comparison(config: BenchConfig, events: BenchEvents | None = None) -> tuple[Comparison, list[Run]]:
    """The bench on several backends (--backend a,b,...) in one run, under the same conditions: each backend
    has a sub-run of its own (X/<label>/), all are prepared first, and then they take turns, round by round
    in a rotating order, so no two ever run at once and host drift is spread over all of them. The proxy
    comparison does not depend on the backend: it runs once, after every fleet is down, into X/results.json."""
    config.validate()
    events = events or BenchEvents()
    runs: list[Run] = []
    with open_comparison(config, "bench", _config_dict(config)) as comparison:
        try:
            with ExitStack() as stack:
                benches: dict[str, BackendBench] = {}
                for name in config.backends:
                    sub = replace(config, backend=name, out=comparison.sub_dir(name), proxy=None)
                    run = stack.enter_context(open_run(sub, _config_dict(sub), bench_sections()))
                    runs.append(run)
                    benches[name] = stack.enter_context(open_bench_fleet(run, sub, events, comparison.label(name)))
                for turn, round_index in enumerate(bench_rounds(config)):
                    for name in comparison.rotation(turn):
                        benches[name].round(round_index)
                    comparison.save()
            if config.proxy is not None:
                events.stage("proxy bench: Locust rounds and hey capacity through direct, gateway and peer proxies")
                comparison.data["proxy"] = run_proxy_bench(
                    config.proxy, comparison.run_dir, comparison.supervisor, events
                )
        finally:
            partial_proxy = (
                config.proxy is not None and "proxy" not in comparison.data and load_partial(comparison.run_dir)
            )
            if partial_proxy:
                comparison.data["proxy"] = partial_proxy
    return comparison, runs
