"""Run one Locust phase in its own processes: a master plus W local workers (or one standalone
process when W is 0), all owned by the Supervisor, with CPU sampled while it runs.

    phase = run_phase(plan, PhaseSpec(...), out_dir, supervisor, proxy_pids=[...])

Locust writes its CSVs (stats, failures, exceptions, full stats history) into out_dir; each
generating process appends its per-request samples to out_dir/samples/.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.load.analyse import read_history, read_samples, summarise_phase, timeline
from harness.load.cpu import CpuSampler, generator_saturated, host_saturated
from harness.load.plan import USER_CLASS, LoadPlan
from harness.supervisor import Supervisor

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
LOOPBACK = "127.0.0.1"
STOP_TIMEOUT_S = 2
"""Locust's --stop-timeout: users get this long to finish their request when the run ends."""
STARTUP_SLACK_S = 45.0
"""Time allowed for Locust processes to start and workers to connect, on top of the run time."""
EXPECT_WORKERS_MAX_WAIT_S = 30
POLL_S = 0.1
CSV_PREFIX = "locust"


class LoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class PhaseSpec:
    name: str
    """"paced" (latency at a fixed offered load) or "saturation" (closed loop, no wait)."""
    users: int
    spawn_rate: float
    warmup_s: float
    duration_s: float
    traffic: tuple[str, ...]
    workers: int = 1
    """Local Locust worker processes; 0 runs a single standalone Locust process."""
    master_host: str | None = None
    """Address the master binds for workers; loopback unless the user asks for another."""
    remote_workers: int = 0
    """Workers the master also waits for, started by the user on other machines."""
    master_port: int = 0
    """Port the master binds for workers; 0 picks a free one (fix it when workers run elsewhere)."""


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _locust(*args: str) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *args]


def worker_command(master_host: str, master_port: int) -> list[str]:
    """What to run on another machine to join this master (documented in harness/load/README.md)."""
    return _locust("--worker", "--master-host", master_host, "--master-port", str(master_port))


def run_phase(
    plan: LoadPlan, spec: PhaseSpec, out_dir: Path, supervisor: Supervisor, proxy_pids: list[int]
) -> dict[str, Any]:
    """Run Locust for spec.warmup_s + spec.duration_s; return the phase's figures and conditions."""
    samples_dir = out_dir / "samples"
    run_time = math.ceil(spec.warmup_s + spec.duration_s)
    # "upstream" is this process: the loopback upstream runs in a thread of the harness.
    cpu = CpuSampler(groups={"generator": [], "proxy": list(proxy_pids), "upstream": [os.getpid()]})
    t_start = time.time()
    returncode = run_locust(plan, spec, run_time, out_dir, supervisor, cpu)
    samples = read_samples(samples_dir)
    figures = summarise_phase(samples, spec.warmup_s, spec.duration_s)
    start, end = figures.pop("window")
    cpu_figures = cpu.summary(start, end, per_root_of="generator")
    origin = samples[0].t if samples else t_start
    figures.update(
        spec=asdict(spec),
        exit_code=returncode,
        cpu=cpu_figures,
        generator_saturated=generator_saturated(cpu_figures),
        host_saturated=host_saturated(cpu_figures),
        timeline=timeline(samples, origin),
        history=read_history(out_dir / f"{CSV_PREFIX}_stats_history.csv", origin),
        files={"dir": str(out_dir), "csv_prefix": CSV_PREFIX},
    )
    if returncode not in (0, None) and not samples:
        tail = (out_dir / "locust-master.log").read_text(errors="replace")[-1500:]
        raise LoadError(f"locust exited {returncode} with no samples: {tail}")
    return figures


def run_locust(
    plan: LoadPlan, spec: PhaseSpec, run_time: int, out_dir: Path, supervisor: Supervisor, cpu: CpuSampler
) -> int | None:
    """Run Locust (master and workers, or one standalone process) for `run_time` seconds, its generating
    processes added to `cpu`'s "generator" group while it samples; returns the master's exit code. Every
    process is stopped on the way out, however it ends."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plan.samples_dir = str(out_dir / "samples")
    classes = [USER_CLASS[k] for k in spec.traffic]
    common = [
        "--headless",
        "-u",
        str(spec.users),
        "-r",
        str(spec.spawn_rate),
        "-t",
        f"{run_time}s",
        "--csv",
        str(out_dir / CSV_PREFIX),
        "--csv-full-history",
        "--only-summary",
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        "--exit-code-on-error",
        "0",
        "--loglevel",
        "WARNING",
        "--br-plan",
        plan.to_json(),
    ]
    distributed = spec.workers > 0 or spec.remote_workers > 0
    bind = spec.master_host or LOOPBACK
    master_port = (spec.master_port or _free_port(bind)) if distributed else 0
    if distributed:
        # What a worker on another machine runs to join this phase.
        (out_dir / "worker-command.txt").write_text(" ".join(worker_command(bind, master_port)) + "\n")
    argv = _locust(*common)
    if distributed:
        argv += [
            "--master",
            "--master-bind-host",
            bind,
            "--master-bind-port",
            str(master_port),
            "--expect-workers",
            str(spec.workers + spec.remote_workers),
            "--expect-workers-max-wait",
            str(EXPECT_WORKERS_MAX_WAIT_S),
        ]
    argv += classes
    started: list[subprocess.Popen[bytes]] = []
    try:
        with open(out_dir / "locust-master.log", "ab") as log:
            master = supervisor.spawn(
                argv,
                f"locust-master:{plan.target}:{spec.name}",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(master)
        cpu.add("generator-master" if distributed else "generator", master.pid)
        for index in range(spec.workers):
            with open(out_dir / f"locust-worker-{index}.log", "ab") as log:
                worker = supervisor.spawn(
                    _locust(
                        "--worker",
                        "--master-host",
                        LOOPBACK,
                        "--master-port",
                        str(master_port),
                        "--loglevel",
                        "WARNING",
                    ),
                    f"locust-worker:{plan.target}:{spec.name}:{index}",
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            started.append(worker)
            cpu.add("generator", worker.pid)
        cpu.start()
        deadline = time.monotonic() + run_time + STOP_TIMEOUT_S + STARTUP_SLACK_S
        while master.poll() is None:
            if time.monotonic() > deadline:
                raise LoadError(f"locust master for {plan.target}/{spec.name} ran past {run_time}s + slack")
            time.sleep(POLL_S)
        # Workers quit when the master tells them to; give them a moment to flush their samples.
        for proc in started[1:]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_TIMEOUT_S + 3)
    finally:
        cpu.stop()
        for proc in started:
            supervisor.stop(proc.pid)
    return master.returncode
