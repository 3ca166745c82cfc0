"""Runs one scenario: options, backend, journal and results.json around its steps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from harness.config import RunConfig, build
from harness.errors import ConfigError
from harness.multirun import open_comparison
from harness.results import new_run_id
from harness.run import open_run
from harness.sandbox import backend_label
from harness.scenario.base import Needs, Scenario, ScenarioContext
from harness.scenario.journal import Journal, now
from harness.scenario.loader import available_scenarios, load_scenario_module
from harness.supervisor import Interrupted

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
    boots_sandboxes: bool = True
    """False for a host-side client (its needs say no_sandboxes): the report then names no backend."""

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
    declared = needs(options, config) if callable(needs) else Needs()
    if declared.image is not None and declared.image != config.image:
        if "image" in given:
            raise ConfigError(
                f"{name} runs its clients on the {declared.image} image, not {config.image}; "
                f"leave --image out or give --image {declared.image}"
            )
        # Built again rather than replaced, so the image's own default RAM applies when --mem-mib was not given.
        config = build(
            RunConfig, {**{k: v for k, v in given.items() if k in RUN_KEYS}, "image": declared.image}, labels
        )
        declared = needs(options, config) if callable(needs) else Needs()
    if declared.no_sandboxes and given.get("backend") not in (None, "host"):
        raise ConfigError(f"{name} boots no sandbox, so --backend does not apply; leave it out")
    config = declared.apply(config, name)
    return PreparedScenario(name, module, config, options, module.create(options), not declared.no_sandboxes)


def prepare_comparison(
    name: str, values: Mapping[str, Any], labels: Mapping[str, str] | None = None
) -> tuple[RunConfig, list[PreparedScenario]]:
    """Scenario `name` once per backend of a --backend list, each prepared (and so checked: a backend that
    lacks what the scenario needs is refused) before anything is written; returns the comparison's settings,
    with its run directory decided, and the sub-runs, each into a directory of its own under it."""
    whole = prepare_scenario(name, values, labels)
    out = whole.config.out or Path("results") / new_run_id()
    config = replace(whole.config, out=out)
    subs = [
        prepare_scenario(name, {**values, "backend": backend, "out": out / backend_label(backend)}, labels)
        for backend in config.backends
    ]
    return config, subs


def run_comparison(name: str, config: RunConfig, subs: list[PreparedScenario]) -> tuple[int, Path]:
    """Run prepared sub-runs one after the other (never two at once) under one comparison directory; the exit
    code is the worst of theirs. Always writes every results.json and the comparison's report."""
    exit_code = 0
    record = {**subs[0].config_record(), "backend": config.backend, "out": str(config.out)}
    with open_comparison(config, f"scenario:{name}", record) as comparison:
        comparison.rotation(0)
        for prepared in subs:
            code, _ = run_prepared(prepared)
            exit_code = max(exit_code, code)
            comparison.save()
    return exit_code, comparison.run_dir


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
    scenario = prepared.scenario
    journal = Journal(scenario=prepared.name)
    section: dict[str, Any] = {
        "name": prepared.name,
        "boots_sandboxes": prepared.boots_sandboxes,
        "journal": journal.to_dict(),
        "data": {},
        "exit_code": None,
    }
    with open_run(prepared.config, prepared.config_record(), {"scenario": section}) as run:
        run.before_save.append(lambda: section.update(journal=journal.to_dict()))
        exit_code = 1
        try:
            backend = run.open_backend()
            assert run.template is not None
            ctx = ScenarioContext(
                run_dir=run.run_dir,
                supervisor=run.supervisor,
                backend=backend,
                template=run.template,
                journal=journal,
                data=section["data"],
                boots=run.sandboxes,
                save=run.save,
            )
            try:
                scenario.setup(ctx)
                run.save()
                journal.steady_states["before"] = scenario.steady_state(ctx)
                before = journal.steady_states["before"]
                if before is not None and not before.get("met", True):
                    journal.status = "aborted"
                else:
                    scenario.run(ctx)
                    run.save()
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
        except (KeyboardInterrupt, Interrupted):
            journal.status = "interrupted"
            raise
        except Exception:
            journal.status = "failed"
            raise
        finally:
            journal.end = now()
            section["exit_code"] = exit_code
    return exit_code, run.run_dir
