"""Runs one scenario: options, backend, journal and results.json around its steps."""

from __future__ import annotations

import signal
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any

from harness.bench import summarize_run
from harness.config import RunConfig, build
from harness.paths import cache_dir
from harness.report import render_report
from harness.results import SCHEMA, host_info, new_run_id, write_results
from harness.sandbox import BackendOptions, SandboxSpec, create_backend, describe_backend
from harness.scenario.base import Scenario, ScenarioContext
from harness.scenario.journal import Journal, now
from harness.scenario.loader import available_scenarios, load_scenario_module
from harness.supervisor import Interrupted, Supervisor, signals_raise

RUN_KEYS = frozenset(f.name for f in fields(RunConfig))
"""Keys of a scenario's values that are run settings (the common flags); the rest are its own options."""


@dataclass(frozen=True)
class PreparedScenario:
    """A scenario with every setting parsed and validated, before anything of its run is written."""

    name: str
    """Folder name under scenarios/."""
    module: ModuleType
    """Its scenario.py."""
    config: RunConfig
    """The run settings, with what the scenario needs (guest size, boot mode) applied."""
    options: Any
    """Its typed `Options`."""
    scenario: Scenario
    """What its `create(options)` made."""

    def config_record(self) -> dict[str, Any]:
        """results.json["config"]: the run settings and every option, paths as text."""
        merged = {**asdict(self.config), **asdict(self.options)}
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in merged.items()}


def prepare_scenario(name: str, values: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> PreparedScenario:
    """Parse and validate `values` (run settings and the scenario's options by name; None = not given) and
    create the scenario; a bad name or value is a ConfigError naming the fix, and nothing is written."""
    module = load_scenario_module(name)
    given = {k: v for k, v in values.items() if v is not None}
    config = build(RunConfig, {k: v for k, v in given.items() if k in RUN_KEYS}, labels)
    options = build(module.Options, {k: v for k, v in given.items() if k not in RUN_KEYS}, labels, owner=name)
    needs = getattr(module, "needs", None)
    if callable(needs):
        config = needs(options, config).apply(config)
    return PreparedScenario(name, module, config, options, module.create(options))


def sweep_leftovers() -> list[str]:
    """Ask every scenario that plants things on the host (a module-level `sweep_leftovers()`) to remove
    what a killed run left; return a line per thing removed."""
    removed: list[str] = []
    for name in available_scenarios():
        sweep = getattr(load_scenario_module(name), "sweep_leftovers", None)
        if callable(sweep):
            removed += [f"{name}: {line}" for line in sweep()]
    return removed


def run_scenario(name: str, values: Mapping[str, Any], out: Path | None = None) -> tuple[int, Path]:
    """Run scenario `name` with `values` (see prepare_scenario); always writes results.json (partial if
    interrupted) and report.html."""
    return run_prepared(prepare_scenario(name, {**values, "out": out}))


def run_prepared(prepared: PreparedScenario) -> tuple[int, Path]:
    """Run a prepared scenario; always writes results.json (partial if interrupted) and report.html."""
    name, config, scenario = prepared.name, prepared.config, prepared.scenario
    run_id = new_run_id()
    run_dir = config.out or Path("results") / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal(scenario=name)
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "partial": True,
        "interrupted_by": None,
        "host": host_info(),
        "backend": {"name": config.backend},
        "accel": None,
        "config": prepared.config_record(),
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
                config.backend,
                BackendOptions(
                    cache=cache_dir(), accel=config.accel, mem_mib=config.mem_mib, boot_mode=config.boot_mode
                ),
            )
            data["backend"] = describe_backend(backend)
            data["accel"] = backend.accel
            template = SandboxSpec(
                id="",
                workdir=run_dir,
                mem_mib=config.mem_mib,
                boot_timeout_s=config.boot_timeout_s,
            )
            ctx = ScenarioContext(
                run_dir=run_dir,
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
