"""Terminal side of the tasks: rich progress, summary tables, one-line errors and exit codes."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness.bench import BenchConfig, BenchEvents, run_bench, run_bench_comparison
from harness.config import (
    BENCH_FLAGS,
    PROXY_FLAGS,
    SCENARIO_ALIASES,
    SCENARIO_FLAGS,
    RunConfig,
    build,
    check_configured,
    flag_name,
    layered,
    parse_sets,
    parse_value,
    settings,
)
from harness.errors import ConfigError, HarnessError
from harness.gateway.errors import SetupError
from harness.load.bench import ProxyBenchConfig
from harness.report.format import mib, ms
from harness.run import Run
from harness.sandbox.base import SandboxRecord
from harness.scratch import sweep_scratch_dirs
from harness.supervisor import Interrupted, reap_leftovers

console = Console(stderr=True, soft_wrap=True)

EXIT_ERROR = 2
"""Bad flags or a missing prerequisite."""
EXIT_INTERRUPTED = 130
"""128 + SIGINT; SIGTERM exits 143."""

T = TypeVar("T")


@contextmanager
def user_errors() -> Iterator[None]:
    """A HarnessError (or the gateway's SetupError) becomes one red line and exit 2; an interrupt exits 130
    after cleanup ran."""
    try:
        yield
    except (HarnessError, SetupError) as exc:
        # No emoji: "bwrap:x:" is a backend name, not a :x: shortcode.
        console.print(f"[bold red]error:[/] {escape(' '.join(str(exc).split()))}", highlight=False, emoji=False)
        sys.exit(EXIT_ERROR)
    except (KeyboardInterrupt, Interrupted) as exc:
        name = str(exc) if isinstance(exc, Interrupted) else "SIGINT"  # KeyboardInterrupt's str is empty
        console.print(f"[yellow]interrupted ({name}); partial results were written[/]")
        sys.exit(128 + exc.signum if isinstance(exc, Interrupted) else EXIT_INTERRUPTED)


class ProgressEvents(BenchEvents):
    """Shows bench progress with rich."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None

    def stage(self, text: str) -> None:
        self.progress.console.print(f"[cyan]•[/] {text}")

    def round_started(self, label: str, total: int) -> None:
        self.task = self.progress.add_task(f"booting ({label})", total=total)

    def sandbox_done(self, record: SandboxRecord) -> None:
        if self.task is not None:
            self.progress.advance(self.task)
        if not record.ok:
            self.progress.console.print(f"[red]✗ {record.id}:[/] {record.error}")

    def round_finished(self, label: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=f"done ({label})")


def with_progress(body: Callable[[ProgressEvents], T]) -> T:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        return body(ProgressEvents(progress))


def bench(configured: Mapping[str, Any], flags: Mapping[str, Any]) -> Path:
    """Run the bench from task flags over invoke's config (`configured`: invoke.yaml and the environment) and
    print its summary; returns the run directory."""
    with user_errors():
        config = bench_config(configured, flags)
        if len(config.backends) > 1:
            comparison, runs = with_progress(lambda events: run_bench_comparison(config, events))
            run_dir, proxy = comparison.run_dir, comparison.data.get("proxy")
        else:
            runs = [with_progress(lambda events: run_bench(config, events))]
            run_dir, proxy = runs[0].run_dir, runs[0].data.get("proxy")
    for run in runs:
        console.print(boot_table(run, config))
        summary = run.data["summary"]
        console.print(
            f"success rate {summary['success_rate']:.0%} ({summary['failures']} failed of {summary['boots']}); "
            f"MemAvailable Δ per idle sandbox {mib(summary['mem_available_delta_bytes_per_sandbox'])}"
            + (
                f"; shared template RAM resident {mib(summary['shared_file_resident_bytes'])}; host memory per "
                f"sandbox (PSS without the template + template ÷ N) {mib(summary['host_bytes_per_sandbox'])}"
                if summary.get("shared_file_resident_bytes") is not None
                else ""
            )
        )
    if proxy:
        console.print(proxy_table(proxy))
    console.print(f"results: {run_dir / 'results.json'}\nreport:  {run_dir / 'report.html'}")
    leftovers = {run.data["backend"]["name"]: run.data["leftover_vmm_pids"] for run in runs}
    if any(leftovers.values()):
        console.print(f"[red]sandbox processes survived stop: {leftovers}[/]")
        sys.exit(1)
    return run_dir


def boot_table(run: Run, config: BenchConfig) -> Table:
    """One backend's boot time, its phases and its host PSS per sandbox, with their spread."""
    summary = run.data["summary"]
    table = Table(
        title=f"blastradius bench — {run.data['backend']['name']} under {run.data['accel']}, "
        f"N={config.sandboxes}, rounds={config.repeat}, warm-ups={config.warmup}, "
        f"memory sharing {config.memory_sharing}"
    )
    for column in ("metric", "p50", "p95", "p99", "min", "max", "stdev"):
        table.add_column(column)
    boot = summary["boot_ms"]
    table.add_row("boot to agent-ready", *(ms(boot[k]) for k in ("p50", "p95", "p99", "min", "max", "stdev")))
    for phase, stats in summary["phases_ms"].items():
        table.add_row(f"  phase {phase}", *(ms(stats[k]) for k in ("p50", "p95", "p99", "min", "max", "stdev")))
    memory = {"host PSS / sandbox": "pss_bytes_per_sandbox", "host USS / sandbox": "uss_bytes_per_sandbox"}
    for label, key in memory.items():
        stats = summary.get(key) or {}
        table.add_row(label, *(mib(stats.get(k)) for k in ("p50", "p95", "p99", "min", "max", "stdev")))
    return table


def proxy_table(proxy: dict[str, Any]) -> Table:
    """One row per proxy target: paced latency, what it adds over direct (with its interval), capacity at c=8,
    failures; then the checks."""
    cond = proxy.get("conditions", {})
    table = Table(
        title=f"proxy bench — {cond.get('users')} users x {cond.get('user_rps')} req/s, {cond.get('rounds')} rounds "
        f"x {cond.get('duration_s')} s per target; hey {cond.get('capacity_s')} s per cell"
    )
    for column in ("target", "status", "p50", "added p50: page", "model", "rps c=8: http 1k", "connect 1k", "failures"):
        table.add_column(column)
    for name, target in proxy.get("targets", {}).items():
        traffic = target.get("traffic") or {}
        cap = target.get("capacity") or {}

        def added(kind: str, traffic: dict[str, Any] = traffic) -> str:
            fig = ((traffic.get(kind) or {}).get("added_latency_ms") or {}).get("p50") or {}
            ci, verdict = fig.get("ci"), fig.get("verdict")
            if fig.get("estimate") is None or ci is None:
                return "—"
            bounds = f"[{ci[0]:.2f},{ci[1]:.2f}]"
            return (
                f"{verdict} {bounds}"
                if verdict in ("within noise", "below direct")
                else f"+{fig['estimate']:.2f} {bounds}"
            )

        def rps(workload: str, cap: dict[str, Any] = cap) -> str:
            value = ((cap.get(workload) or {}).get("8") or {}).get("rps")
            return "—" if value is None else f"{value:,.0f}"

        table.add_row(
            name,
            str(target.get("status")),
            ms((target.get("latency_ms") or {}).get("p50")),
            added("page"),
            added("model"),
            rps("http-1k"),
            rps("connect-1k"),
            str(target.get("failure_count", "—")),
        )
    for check in proxy.get("checks", []):
        table.caption = (table.caption or "") + f"\n{check['verdict'].upper()}: {check['name']} — {check['measured']}"
    return table


def clean() -> list[str]:
    from harness.image.debian import sweep_partial_builds
    from harness.ksm import sweep_ksm
    from harness.paths import cache_dir
    from harness.sandbox import sweep_backend_leftovers
    from harness.scenario.runner import sweep_leftovers

    # Processes first: a gVisor container's record can only go once its runsc processes are gone.
    removed = reap_leftovers() + sweep_backend_leftovers() + sweep_scratch_dirs() + sweep_leftovers() + sweep_ksm()
    removed += sweep_partial_builds(cache_dir())
    for line in removed:
        # Plain text: a process named locust-master:squid:paced must not turn into an emoji.
        console.print(line, markup=False, emoji=False, highlight=False)
    if not removed:
        console.print("nothing to clean")
    return removed


def parse_number(value: str | float | None, kind: type[int] | type[float]) -> Any:
    if value is None or isinstance(value, kind):
        return value
    with user_errors():
        try:
            return kind(value)
        except ValueError:
            raise HarnessError(f"expected a {'whole ' if kind is int else ''}number, got {value!r}") from None


def bench_config(configured: Mapping[str, Any], flags: Mapping[str, Any]) -> BenchConfig:
    """The validated bench settings: each from its flag, else from invoke's config, else BenchConfig's default.
    `flags["proxy"]` is True unless --no-proxy was given (a switch cannot say "not given")."""
    check_configured("bench", configured)
    flags = {**flags, "proxy": None if flags.get("proxy") is True else flags.get("proxy")}
    values, labels = layered("bench", BENCH_FLAGS, flags, configured)
    proxy_values, proxy_labels = layered("bench", PROXY_FLAGS, flags, configured)
    enabled = parse_value(values.get("proxy", True), bool, labels.get("proxy", "--proxy"))
    if enabled:
        values["proxy"] = build(ProxyBenchConfig, proxy_values, proxy_labels)
    else:
        given = [flag_name(flag) for flag in PROXY_FLAGS if flags.get(flag) is not None]
        if given:
            raise ConfigError(
                f"--no-proxy runs no Locust comparison, so {', '.join(given)} would be ignored; drop one or the other"
            )
        values["proxy"] = None
    return build(BenchConfig, values, labels)


def report(run_dir: Path) -> Path:
    from harness.report import render_report

    with user_errors():
        try:
            path = render_report(run_dir)
        except OSError as exc:
            raise HarnessError(f"cannot write the report into {run_dir}: {exc.strerror}") from None
    console.print(f"report: {path}")
    return path


def compare(runs: Iterable[str], out: str | None, baseline: str | None, force: bool) -> Path:
    """Compare the run directories `runs` (a comparison directory counts as its runs) and print the report's
    path; bad input is one line and exit 2."""
    from harness.comparing import compare_runs

    with user_errors():
        try:
            path = compare_runs([Path(run) for run in runs], Path(out) if out else None, baseline=baseline, force=force)
        except OSError as exc:
            raise HarnessError(f"cannot write the comparison into {out or 'results/'}: {exc.strerror}") from None
    console.print(f"results: {path.parent / 'results.json'}\nreport:  {path}")
    return path


def image(name: str = "busybox") -> None:
    from harness.image import build_image
    from harness.image.catalog import image_kind
    from harness.paths import cache_dir

    with user_errors():
        image_kind(name)
        started = time.monotonic()
        built = build_image(cache_dir(), name)
    console.print(
        f"{name} image in {time.monotonic() - started:.1f} s (0 when cached)\n"
        f"guest kernel {built.kernel_release}: {built.kernel}\n"
        f"initramfs ({built.initrd.stat().st_size // 1024} KiB, modules {', '.join(built.modules)}): "
        f"{built.initrd}"
    )
    if built.disk is not None:
        build = built.build
        console.print(
            f"root disk ({built.disk.stat().st_size / 2**20:.0f} MiB squashfs of a "
            f"{int(str(build.get('rootfs_bytes', 0))) / 2**20:.0f} MiB root; cold build {build.get('build_s')} s): "
            f"{built.disk}"
        )


def scenario(
    name: str,
    configured: Mapping[str, Any],
    flags: Mapping[str, Any],
    aliases: Mapping[str, Any],
    sets: Iterable[str],
    help_options: bool = False,
) -> None:
    """Run scenario `name` from task flags: the common `flags` (RunConfig's, over invoke's config in
    `configured`), option `aliases` (`--fixer X`) and `--set key=value` items; with help_options, list its
    options instead. Everything is checked before anything is written."""
    from harness.scenario.runner import prepare_comparison, prepare_scenario, run_comparison, run_prepared

    with user_errors():
        if help_options:
            print(options_help(name))
            return
        values, labels = scenario_values(configured, flags, aliases, sets)
        prepared = prepare_scenario(name, values, labels)
        if len(prepared.config.backends) > 1:
            exit_code, run_dir = run_comparison(name, *prepare_comparison(name, values, labels))
            sub_dirs = [run_dir / entry["dir"] for entry in json.loads((run_dir / "results.json").read_text())["runs"]]
        else:
            exit_code, run_dir = run_prepared(prepared)
            sub_dirs = [run_dir]
    for sub_dir in sub_dirs:
        if not (sub_dir / "results.json").exists():
            continue
        if len(sub_dirs) > 1:
            console.print(f"[bold]{sub_dir.name}[/]")
        summary = scenario_summary(name, json.loads((sub_dir / "results.json").read_text()))
        if summary is not None:
            console.print(summary)
    console.print(
        f"scenario {name}: exit {exit_code}\nresults: {run_dir / 'results.json'}\nreport:  {run_dir / 'report.html'}"
    )
    sys.exit(exit_code)


def scenario_values(
    configured: Mapping[str, Any], flags: Mapping[str, Any], aliases: Mapping[str, Any], sets: Iterable[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The scenario's raw values by setting name, and where each came from (for error messages)."""
    check_configured("scenario", configured)
    values, labels = layered("scenario", SCENARIO_FLAGS, flags, configured)
    for flag, value in aliases.items():
        # An alias that is a switch (--leaky) arrives as False when not given.
        if value is not None and value is not False:
            values[SCENARIO_ALIASES[flag]] = value
            labels[SCENARIO_ALIASES[flag]] = flag_name(flag)
    for key, value in parse_sets(sets).items():
        values[key] = value
        labels[key] = f"--set {key}"
    return values, labels


def options_help(name: str) -> str:
    """Every option of scenario `name` (type, default, meaning, alias flag), then the common flags: plain
    lines, readable in a pipe as in a terminal."""
    from harness.scenario.loader import load_scenario_module

    alias_of = {field: flag_name(flag) for flag, field in SCENARIO_ALIASES.items()}
    lines = [f"{name} options, set with --set KEY=VALUE (repeatable):"]
    for option in settings(load_scenario_module(name).Options):
        alias = f"   (also {alias_of[option.name]})" if option.name in alias_of else ""
        lines += [f"  {option.name}: {option.kind} = {_shown(option.default)}{alias}", f"      {option.help}"]
    lines.append("common flags:")
    flag_of = {field: flag for flag, field in SCENARIO_FLAGS.items()}
    for setting in settings(RunConfig):
        lines += [
            f"  {flag_name(flag_of[setting.name])}: {setting.kind} = {_shown(setting.default)}",
            f"      {setting.help}",
        ]
    return "\n".join(lines)


def _shown(default: Any) -> str:
    """A default as a user would type it."""
    if default is None:
        return "none"
    if isinstance(default, Path):
        return str(default.relative_to(Path.cwd())) if default.is_relative_to(Path.cwd()) else str(default)
    return str(default).lower() if isinstance(default, bool) else str(default)


def scenario_summary(name: str, results: dict[str, Any]) -> RenderableType | None:
    """What the scenario's own `terminal_summary(data)` makes of its saved data, if it has one."""
    from harness.scenario.loader import load_scenario_module

    render = getattr(load_scenario_module(name), "terminal_summary", None)
    return render(results["scenario"]["data"]) if callable(render) else None


def gateway(
    policy: str,
    listen: str,
    port: int,
    deny_mode: str | None,
    audit: Path | None,
    overrides: list[str] | None = None,
    upstream_ca: Path | None = None,
) -> None:
    """Run the gateway in the foreground for sandboxes of the user's own; a bad policy, key or flag is one line."""
    from harness.gateway.cli import parse_overrides, run_gateway
    from harness.gateway.policy import PolicyError, load_policy

    with user_errors():
        try:
            load_policy(policy)
        except PolicyError as exc:
            raise HarnessError(f"--policy: {exc}") from None
        table = parse_overrides(overrides or [])
        console.print(f"gateway on {listen}:{port}, policy {policy}; audit log {audit or '(in its state dir)'}")
        run_gateway(
            policy,
            listen_host=listen,
            port=port,
            deny_mode=deny_mode,
            audit_path=audit,
            upstream_overrides=table,
            upstream_ca=upstream_ca,
        )
