"""Runs one scenario: options, backend, journal and results.json around its steps."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from harness.bench import summarize_run
from harness.paths import cache_dir
from harness.report import render_report
from harness.results import SCHEMA, host_info, new_run_id, write_results
from harness.sandbox import BackendOptions, SandboxSpec, create_backend
from harness.scenario.base import Scenario, ScenarioContext
from harness.scenario.journal import Journal, now
from harness.scenario.loader import available_scenarios, load_scenario_module
from harness.supervisor import Interrupted, Supervisor, signals_raise

COMMON_DEFAULTS: dict[str, Any] = {
    "backend": "qemu",
    "accel": "auto",
    "mem_mib": 128,
    "boot_timeout_s": 60.0,
    "boot_mode": "snapshot",
}


def sweep_leftovers() -> list[str]:
    """Ask every scenario that plants things on the host (a module-level `sweep_leftovers()`) to remove
    what a killed run left; return a line per thing removed."""
    removed: list[str] = []
    for name in available_scenarios():
        sweep = getattr(load_scenario_module(name), "sweep_leftovers", None)
        if callable(sweep):
            removed += [f"{name}: {line}" for line in sweep()]
    return removed


def run_scenario(name: str, options: dict[str, Any], out: Path | None = None) -> tuple[int, Path]:
    """Run scenario `name`; always writes results.json (partial if interrupted) and report.html."""
    module = load_scenario_module(name)
    options = {**COMMON_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    scenario: Scenario = module.create(options)
    run_id = new_run_id()
    run_dir = out or Path("results") / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal(scenario=name)
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "partial": True,
        "interrupted_by": None,
        "host": host_info(),
        "backend": {"name": options["backend"]},
        "accel": None,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
        "rounds": [],
        "sandboxes": [],
        "summary": summarize_run({"sandboxes": [], "rounds": []}),
        "scenario": {"name": name, "journal": journal.to_dict(), "data": {}, "exit_code": None},
    }
    supervisor = Supervisor(run_id)
    ctx: ScenarioContext | None = None

    def save() -> None:
        data["scenario"]["journal"] = journal.to_dict()
        if ctx is not None:
            data["scenario"]["data"] = ctx.data
            data["sandboxes"] = list(ctx.boots)
            data["summary"] = summarize_run(data)
        write_results(run_dir, data)

    save()
    exit_code = 1
    try:
        with signals_raise():
            backend = create_backend(
                options["backend"],
                BackendOptions(
                    cache=cache_dir(),
                    accel=options["accel"],
                    mem_mib=options["mem_mib"],
                    boot_mode=options["boot_mode"],
                ),
            )
            data["backend"] = {"name": backend.name, **backend.describe()}
            data["accel"] = backend.accel
            template = SandboxSpec(
                id="",
                workdir=run_dir,
                accel=backend.accel,
                mem_mib=options["mem_mib"],
                boot_timeout_s=options["boot_timeout_s"],
            )
            ctx = ScenarioContext(
                run_dir=run_dir,
                options=options,
                supervisor=supervisor,
                backend=backend,
                template=template,
                journal=journal,
                save=save,
            )
            try:
                scenario.setup(ctx)
                save()
                journal.steady_states["before"] = scenario.steady_state(ctx)
                before = journal.steady_states["before"]
                if before is not None and not before.get("met", True):
                    journal.status = "aborted"
                else:
                    scenario.run(ctx)
                    save()
                    after = scenario.steady_state(ctx)
                    journal.steady_states["after"] = after
                    journal.deviated = after is not None and not after.get("met", True)
                    journal.status = "completed"
            finally:
                try:
                    scenario.rollback(ctx)
                finally:
                    with journal.activity("release-resources", "rollback"):
                        ctx.resources.close()
            exit_code = scenario.exit_code(ctx)
            data["partial"] = False
    except (KeyboardInterrupt, Interrupted) as exc:
        journal.status = "interrupted"
        data["interrupted_by"] = signal.Signals(exc.signum).name if isinstance(exc, Interrupted) else "SIGINT"
        raise
    except Exception as exc:
        journal.status = "failed"
        data["interrupted_by"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        journal.end = now()
        supervisor.shutdown()
        data["scenario"]["exit_code"] = exit_code
        save()
        try:
            render_report(run_dir)
        except Exception as exc:  # results.json is safe; a report bug must not hide the run's own outcome
            data["report_error"] = f"{type(exc).__name__}: {exc}"
            write_results(run_dir, data)
    return exit_code, run_dir
