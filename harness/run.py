"""The one run wrapper the bench and every scenario share.

with open_run(config, config_record, sections) as run:   # run dir, header, results.json (partial)
    backend = run.open_backend(stage)                      # backend, its description, the spec template
    ...                                                    # steps; run.save() after each
# on the way out, however it ends: interrupted_by and partial recorded, every child process stopped,
# results.json saved, report.html rendered (a report bug is recorded, never hiding the run's own error)
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config import RUN_MARKER, RunConfig
from harness.errors import ConfigError
from harness.ksm import ksm_switched_on
from harness.metrics.stats import summarize
from harness.paths import cache_dir
from harness.report import render_report
from harness.results import SCHEMA, host_info, new_run_id, write_results
from harness.sandbox import Backend, BackendOptions, SandboxSpec, create_backend, describe_backend
from harness.sandbox.base import SandboxRecord
from harness.supervisor import Interrupted, Supervisor, interruption, signals_deferred, signals_raise


@dataclass
class Run:
    """A run in progress: its results so far, written after every step, and what it owns."""

    run_id: str
    """results/<run-id> unless --out says otherwise; also in every child process's name."""
    run_dir: Path
    """Where results.json, the report and the raw files go."""
    config: RunConfig
    """The run settings."""
    supervisor: Supervisor
    """Owns every process the run starts; shut down on every exit path."""
    data: dict[str, Any]
    """results.json as plain data, except `sandboxes` (from `sandboxes` below) and `summary` (derived)."""
    sandboxes: list[SandboxRecord] = field(default_factory=list)
    """Every boot of the run so far, in the order they were recorded."""
    before_save: list[Callable[[], None]] = field(default_factory=list)
    """Called before each save, to bring `data` up to date (e.g. a scenario's journal)."""
    backend: Backend | None = None
    """The backend, once `open_backend` made it."""
    template: SandboxSpec | None = None
    """The spec every sandbox starts from, once `open_backend` made it."""

    def open_backend(self, stage: Callable[[str], None] = lambda text: None) -> Backend:
        """Create the run's backend (image, accelerator, snapshot template) and record what it is."""
        config = self.config
        stage(f"preparing backend {config.backend} (image, accelerator)")
        self.backend = create_backend(
            config.backend,
            BackendOptions(
                cache=cache_dir(),
                accel=config.accel,
                mem_mib=config.mem_mib,
                boot_mode=config.boot_mode,
                memory_sharing=config.memory_sharing,
                image=config.image,
            ),
        )
        self.data["backend"] = describe_backend(self.backend)
        self.data["accel"] = self.backend.accel
        self.template = SandboxSpec(
            id="",
            workdir=self.run_dir,
            mem_mib=config.mem_mib,
            boot_timeout_s=config.boot_timeout_s,
            reclaim=self.backend.features.reclaim,  # off where sharing a template's RAM file forbids discards
            shared_ram="file" in config.memory_sharing and self.backend.features.snapshot,
        )
        self.save()
        return self.backend

    def save(self) -> Path:
        """Write results.json atomically, as it stands now."""
        for refresh in self.before_save:
            refresh()
        self.data["summary"] = summarize_run(self.sandboxes, self.data["rounds"])
        return write_results(self.run_dir, {**self.data, "sandboxes": [r.to_json() for r in self.sandboxes]})


def prepare_run_dir(run_dir: Path, force: bool) -> None:
    """Make the run directory (emptied of an earlier run with --force, which RunConfig.validate allowed);
    a file system that refuses is one line naming the fix."""
    try:
        if force and (run_dir / RUN_MARKER).exists():
            for entry in run_dir.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {run_dir}: {exc.strerror}; name a directory you can write to") from None


def interrupted_by(exc: BaseException) -> str:
    """results.json's `interrupted_by` for what ended a run early: the signal's name, or the error in one line."""
    if isinstance(exc, Interrupted):
        return signal.Signals(exc.signum).name
    if isinstance(exc, KeyboardInterrupt):
        return "SIGINT"
    return f"{type(exc).__name__}: {exc}"


@contextmanager
def open_run(
    config: RunConfig, config_record: Mapping[str, Any], sections: Mapping[str, Any] | None = None
) -> Iterator[Run]:
    """Create the run directory and a partial results.json (with `config_record` as its config and `sections`
    as further top-level keys), and yield the Run with SIGTERM raising. However the body ends, the run is
    marked complete or partial with what interrupted it, every child is stopped, results.json is saved
    and the report rendered; the body's own exception propagates unchanged."""
    run_id = new_run_id()
    run_dir = config.out or Path("results") / run_id
    prepare_run_dir(run_dir, config.force)
    run = Run(
        run_id=run_id,
        run_dir=run_dir,
        config=config,
        supervisor=Supervisor(run_id),
        data={
            "schema": SCHEMA,
            "run_id": run_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "partial": True,
            "interrupted_by": None,
            "host": host_info(),
            "backend": {"name": config.backend},
            "accel": None,
            "config": dict(config_record),
            "rounds": [],
            "sandboxes": [],
            "summary": {},
            **(sections or {}),
        },
    )
    run.save()
    try:
        with signals_raise(), ksm_switched_on("ksm" in config.memory_sharing) as ksm:
            run.data["ksm"] = ksm
            yield run
            run.data["partial"] = False
    except (KeyboardInterrupt, Interrupted, Exception) as exc:
        run.data["interrupted_by"] = interrupted_by(exc)
        raise
    finally:
        with signals_deferred() as late:
            run.supervisor.shutdown()
            run.save()
            try:
                render_report(run_dir)
            except Exception as exc:  # the results are safe on disk; a report bug must not hide the run's own error
                run.data["report_error"] = f"{type(exc).__name__}: {exc}"
                run.save()
        if late:  # a signal while the run was being put away: everything is written, now honour it
            raise interruption(late[0])


def summarize_run(sandboxes: list[SandboxRecord], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json's `summary`: boot time and phases of the sandboxes that booted, success rate, memory."""
    ok = [s for s in sandboxes if s.ok]
    deltas = [
        r["mem_available_delta_bytes_per_sandbox"]
        for r in rounds
        if r["measured"] and "mem_available_delta_bytes_per_sandbox" in r
    ]
    pss = [s.host_pss_bytes for s in ok if s.host_pss_bytes is not None]
    shared = [r["shared_file_resident_bytes"] for r in rounds if r["measured"] and "shared_file_resident_bytes" in r]
    delta = int(sum(deltas) / len(deltas)) if deltas else None
    shared_bytes = int(sum(shared) / len(shared)) if shared else None
    uss = [s.host_uss_bytes for s in ok if s.host_uss_bytes is not None]
    own = [s.host_pss_bytes - (s.host_shared_pss_bytes or 0) for s in ok if s.host_pss_bytes is not None]
    own_p50 = summarize(own)["p50"] if own else None
    phase_names = sorted({name for s in ok for name in s.phases_ms})
    return {
        "boot_ms": summarize([s.boot_ms for s in ok if s.boot_ms is not None]),
        "phases_ms": {name: summarize([s.phases_ms[name] for s in ok if name in s.phases_ms]) for name in phase_names},
        "success_rate": round(len(ok) / len(sandboxes), 4) if sandboxes else None,
        "boots": len(sandboxes),
        "failures": len(sandboxes) - len(ok),
        "mem_available_delta_bytes_per_sandbox": delta,
        "pss_bytes_per_sandbox_p50": summarize(pss)["p50"] if pss else None,
        "pss_bytes_per_sandbox": summarize(pss),
        "uss_bytes_per_sandbox": summarize(uss),
        "rss_bytes_per_sandbox": summarize([s.host_rss_bytes for s in ok if s.host_rss_bytes]),
        "shared_file_resident_bytes": shared_bytes,
        "mem_available_delta_with_shared_bytes_per_sandbox": _with_shared(delta, shared_bytes, rounds),
        "host_bytes_per_sandbox": _with_shared(own_p50, shared_bytes, rounds),
    }


def _with_shared(own: int | None, shared: int | None, rounds: list[dict[str, Any]]) -> int | None:
    """A sandbox's own cost plus an even share (÷ N) of the files all sandboxes of a round map, resident before
    the round and so in no MemAvailable Δ. With `own` its PSS less its PSS of those files, this is the
    density projection's figure: every page once (PSS splits what clones share, KSM's merges included; the
    template counts whole, mapped or not), and unmoved by the rest of a busy host, unlike MemAvailable."""
    if own is None:
        return None
    sizes = [r["ok"] for r in rounds if r["measured"] and r.get("ok")]
    if not shared or not sizes:
        return own
    return own + shared // round(sum(sizes) / len(sizes))
