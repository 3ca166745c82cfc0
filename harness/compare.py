"""Runs side by side: each figure against a baseline run with its confidence interval, the idle density each
run implies for its host, the isolation probe matrix, and the conditions of every figure.

Data flows one way, and nothing here prints:

    run directories --load_inputs--> RunInput list (a comparison directory expands into its sub-runs)
                    --compute_comparison--> plain data, saved in <out>/results.json under "comparison"
                    --harness.report--> <out>/report.html

`harness.comparing.compare_runs` does all three for `invoke compare`. A run over several backends writes a
comparison directory of its own (results.json with kind "comparison" and its sub-runs beside it);
`comparison_of` gives the report its comparison data: the saved one, or one computed from the sub-runs when
none was saved. This module computes only: the report imports it, and it imports no report.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError, HarnessError, ResultsUnreadable
from harness.metrics import ab
from harness.metrics.stats import percentile, summarize
from harness.results import COMPARISON_KIND, load_results

EMPTY: dict[str, Any] = {
    "baseline": None,
    "method": {},
    "runs": [],
    "figures": [],
    "density": [],
    "isolation": None,
    "rotations": [],
    "notes": [],
}
"""The comparison of no runs (every run of a comparison directory unreadable): the report shows its notes."""


@dataclass(frozen=True)
class Figure:
    """A figure with one sample per sandbox (or per round) in every run."""

    id: str
    """Key in the comparison data."""
    title: str
    """What it is, for the report."""
    unit: str
    """ms or bytes."""
    source: str
    """Which samples, in words (the figure's conditions)."""
    percentiles: tuple[str, ...] = ("p50",)
    """Shown per run; p50 is the one compared against the baseline."""


FIGURES = (
    Figure(
        "boot_ms",
        "Boot to agent-ready",
        "ms",
        "spawn to agent-ready of every sandbox that booted, measured rounds only (no warm-ups)",
        ("p50", "p95", "p99"),
    ),
    Figure(
        "pss_bytes",
        "Host PSS per idle sandbox",
        "bytes",
        "proportional set size of each booted sandbox's host processes with its round idle: its fair share of "
        "shared pages",
    ),
    Figure(
        "uss_bytes",
        "Host USS per idle sandbox",
        "bytes",
        "unique set size of each booted sandbox's host processes with its round idle: what stopping it frees",
    ),
    Figure(
        "mem_available_delta_bytes",
        "MemAvailable Δ per idle sandbox",
        "bytes",
        "host MemAvailable before the round's boots minus with them idle, over the sandboxes that booted: one "
        "sample per measured round",
    ),
    Figure(
        "provision_ms",
        "Provisioning after agent-ready",
        "ms",
        "installing the gateway's CA through the sandbox's agent, after agent-ready: an exec round trip",
    ),
)
"""Every figure compared, in report order."""

DENSITY_BASES = (
    ("pss_bytes", "PSS", "host PSS per idle sandbox (p50)"),
    ("mem_available_delta_bytes", "MemAvailable Δ", "MemAvailable Δ per idle sandbox (p50 of the rounds)"),
)
"""What per-sandbox cost the idle density is worked out from, by figure id."""

CONDITIONS = (
    ("what", "kind of run"),
    ("backend", "backend"),
    ("accel", "accelerator"),
    ("host", "host"),
    ("cores", "host cores"),
    ("host_memory_bytes", "host memory (MemTotal)"),
    ("sandboxes", "sandboxes per round (N)"),
    ("concurrency", "boot concurrency"),
    ("warmup", "warm-up rounds (discarded)"),
    ("repeat", "measured rounds"),
    ("mem_mib", "guest RAM (MiB)"),
    ("boot_mode", "boot mode"),
)
"""Conditions recorded per run (key, label), in report order."""

CONDITIONS_THAT_MATTER = ("what", "host", "cores", "host_memory_bytes", "sandboxes", "concurrency", "mem_mib")
"""Conditions that, when they differ between runs, make a difference of figures partly theirs (the backend,
its accelerator and boot mode are what a comparison is for)."""


@dataclass(frozen=True)
class RunInput:
    """One run to compare."""

    label: str
    """Unique among the runs compared: its backend's name (or its label in the comparison directory it came
    from), prefixed with its directory's name where two runs would share one."""
    dir: Path
    """The run directory, absolute."""
    data: dict[str, Any]
    """Its results.json."""
    group: Path | None = None
    """The comparison directory it is a sub-run of; None for a run given on its own."""


@dataclass(frozen=True)
class Rotation:
    """The order a run over several backends booted them in, per round."""

    dir: Path
    """Its comparison directory."""
    what: str
    """Its results.json["what"]: bench, scenario:NAME."""
    order: list[list[str]] = field(default_factory=list)
    """Per round, the labels (as in this comparison) in the order they ran."""


# ---- inputs --------------------------------------------------------------------------------------------------


def load_inputs(dirs: Sequence[Path], lenient: bool = False) -> tuple[list[RunInput], list[Rotation], list[str]]:
    """The runs in `dirs` (a comparison directory counts as its sub-runs, in its order), their rotations, and
    what could not be read. A directory that is missing or unreadable is a HarnessError naming it, unless
    `lenient` (a report of a comparison whose run was interrupted): then it is left out and listed."""
    found: list[tuple[str, Path, dict[str, Any], Path | None]] = []
    rotations: list[tuple[Path, str, list[list[str]], dict[str, int]]] = []
    problems: list[str] = []
    seen: set[Path] = set()
    for given in dirs:
        path = Path(given).expanduser().resolve()
        try:
            data = _load(path, given)
        except HarnessError as exc:
            if not lenient:
                raise
            problems.append(str(exc))
            continue
        if data.get("kind") != COMPARISON_KIND:
            _once(path, given, seen)
            found.append((run_backend(data), path, data, None))
            continue
        index_of: dict[str, int] = {}
        for entry in data["runs"]:
            sub = (path / str(entry["dir"])).resolve()
            try:
                sub_data = _load(sub, sub)
                if sub_data.get("kind") == COMPARISON_KIND:
                    raise ResultsUnreadable(f"{sub} is itself a comparison; pass its runs, or it, directly")
                _once(sub, sub, seen)
            except HarnessError as exc:
                if not lenient:
                    raise ResultsUnreadable(f"{given}: run {entry['label']!r}: {exc}") from None
                problems.append(f"run {entry['label']!r} of {given}: {exc}")
                continue
            index_of[str(entry["label"])] = len(found)
            found.append((str(entry["label"]), sub, sub_data, path))
        if data.get("order"):
            rotations.append((path, str(data.get("what", "")), data["order"], index_of))
    labels = unique_labels([(label, group or path) for label, path, _, group in found])
    runs = [
        RunInput(label=label, dir=path, data=data, group=group)
        for label, (_, path, data, group) in zip(labels, found, strict=True)
    ]
    return (
        runs,
        [
            Rotation(
                dir=path,
                what=what,
                order=[[labels[index_of[name]] if name in index_of else name for name in rnd] for rnd in order],
            )
            for path, what, order, index_of in rotations
        ],
        problems,
    )


def _load(path: Path, given: Path | str) -> dict[str, Any]:
    if not path.exists():
        raise ResultsUnreadable(f"{given}: no such directory; pass a run directory (results/<run-id>)")
    if not path.is_dir():
        raise ResultsUnreadable(f"{given} is a file; pass a run directory (results/<run-id>)")
    return load_results(path)


def _once(path: Path, given: Path | str, seen: set[Path]) -> None:
    if path in seen:
        raise ConfigError(f"{given}: the run {path} is given twice; a run compared with itself tells nothing")
    seen.add(path)


def run_backend(data: Mapping[str, Any]) -> str:
    return str((data.get("backend") or {}).get("name") or "run")


def unique_labels(pairs: Sequence[tuple[str, Path]]) -> list[str]:
    """Each (label, directory) pair's label, made unique: a label two runs share is prefixed with the name of
    each one's directory (the run's own, or the comparison directory it came from), then numbered if still
    shared."""
    counts = Counter(label for label, _ in pairs)
    labels = [f"{where.name}/{label}" if counts[label] > 1 else label for label, where in pairs]
    counts = Counter(labels)
    numbered: Counter[str] = Counter()
    result = []
    for label in labels:
        if counts[label] > 1:
            numbered[label] += 1
            label = f"{label}#{numbered[label]}"
        result.append(label)
    return result


# ---- the comparison as plain data ----------------------------------------------------------------------------


def samples(data: Mapping[str, Any]) -> dict[str, list[float]]:
    """Every figure's samples in one run's results.json, by figure id (see FIGURES)."""
    measured = [s for s in data.get("sandboxes", []) if s.get("ok") and (s.get("round") or 0) >= 0]

    def per_sandbox(key: str) -> list[float]:
        return [float(s[key]) for s in measured if s.get(key) is not None]

    return {
        "boot_ms": per_sandbox("boot_ms"),
        "pss_bytes": per_sandbox("host_pss_bytes"),
        "uss_bytes": per_sandbox("host_uss_bytes"),
        "mem_available_delta_bytes": [
            float(r["mem_available_delta_bytes_per_sandbox"])
            for r in data.get("rounds", [])
            if r.get("measured") and r.get("mem_available_delta_bytes_per_sandbox") is not None
        ],
        "provision_ms": per_sandbox("provision_ms"),
    }


def run_kind(data: Mapping[str, Any]) -> str:
    """bench, or scenario:NAME."""
    scenario = data.get("scenario")
    return f"scenario:{scenario.get('name')}" if isinstance(scenario, dict) else "bench"


def conditions(data: Mapping[str, Any]) -> dict[str, Any]:
    """What a run's figures were measured under (see CONDITIONS); None where it does not apply."""
    host, config, backend = data.get("host") or {}, data.get("config") or {}, data.get("backend") or {}
    bench = run_kind(data) == "bench"
    features = backend.get("features") or {}
    # A jail has no guest RAM setting and no snapshot: "n/a" there, not the flag's unused default.
    has_guest_ram = not features or features.get("min_mem_mib") is not None
    can_snapshot = not features or features.get("snapshot", False)
    return {
        "what": run_kind(data),
        "backend": backend.get("name"),
        "accel": data.get("accel"),
        "host": f"{host.get('hostname', '?')}: {host.get('cpu_model', '?')}, kernel {host.get('kernel', '?')}",
        "cores": host.get("cores"),
        "host_memory_bytes": host.get("memory_bytes"),
        "sandboxes": config.get("sandboxes"),
        "concurrency": config.get("concurrency"),
        "warmup": config.get("warmup") if bench else None,
        "repeat": config.get("repeat") if bench else None,
        "mem_mib": config.get("mem_mib") if has_guest_ram else "n/a",
        "boot_mode": (backend.get("boot_mode") or config.get("boot_mode")) if can_snapshot else "n/a",
    }


def describe(values: Sequence[float]) -> dict[str, Any]:
    """n, percentiles, quartiles (the spread), min, max, stdev, and the samples themselves (for the charts)."""
    stats: dict[str, Any] = dict(summarize(values))
    stats["p25"] = round(percentile(values, 25), 2) if values else None
    stats["p75"] = round(percentile(values, 75), 2) if values else None
    stats["samples"] = list(values)
    return stats


def success(data: Mapping[str, Any]) -> dict[str, Any]:
    """Boots of the measured rounds that reached agent-ready, of all boots there."""
    measured = [s for s in data.get("sandboxes", []) if (s.get("round") or 0) >= 0]
    ok = sum(1 for s in measured if s.get("ok"))
    return {"ok": ok, "boots": len(measured), "rate": round(ok / len(measured), 4) if measured else None}


def density(memory_bytes: int | None, cost_bytes: float | None) -> dict[str, Any]:
    """Idle sandboxes that fit in `memory_bytes` at `cost_bytes` each, or why none can be said."""
    if memory_bytes is None:
        return {"cost_bytes": cost_bytes, "sandboxes": None, "reason": "the run did not record the host's memory"}
    if cost_bytes is None:
        return {"cost_bytes": None, "sandboxes": None, "reason": "not measured"}
    if cost_bytes <= 0:
        return {
            "cost_bytes": cost_bytes,
            "sandboxes": None,
            "reason": "cost not above zero: within noise",
        }
    return {"cost_bytes": cost_bytes, "sandboxes": math.floor(memory_bytes / cost_bytes), "reason": None}


def compute_comparison(
    runs: Sequence[RunInput],
    rotations: Sequence[Rotation] = (),
    baseline: str | None = None,
    resamples: int = ab.RESAMPLES,
    seed: int = ab.SEED,
    problems: Sequence[str] = (),
) -> dict[str, Any]:
    """The comparison of `runs` against `baseline` (a label; the first run when None) as plain data, saved
    under results.json["comparison"] and read by the report alone."""
    if not runs:
        raise ConfigError("nothing to compare: no run could be read")
    labels = [run.label for run in runs]
    base = baseline if baseline is not None else labels[0]
    if base not in labels:
        raise ConfigError(f"--baseline {base!r} is none of the runs compared; choose one of: {', '.join(labels)}")
    per_run = {run.label: samples(run.data) for run in runs}
    figures = []
    for figure in FIGURES:
        if not any(per_run[label][figure.id] for label in labels):
            continue
        figures.append(
            {
                "id": figure.id,
                "title": figure.title,
                "unit": figure.unit,
                "source": figure.source,
                "percentiles": list(figure.percentiles),
                "runs": {label: describe(per_run[label][figure.id]) for label in labels},
                "vs_baseline": {
                    label: ab.compare(
                        per_run[base][figure.id], per_run[label][figure.id], resamples, seed=seed
                    ).to_json()
                    for label in labels
                    if label != base
                },
            }
        )
    run_records = [_run_record(run) for run in runs]
    return {
        "baseline": base,
        "method": {
            "statistic": "median (p50)",
            "interval": f"{ab.CONFIDENCE:.0%} percentile-bootstrap interval ({resamples} resamples, seed {seed})",
            "test": "two-sided Mann-Whitney U test (normal approximation, tie and continuity corrected)",
            "alpha": ab.ALPHA,
            "min_samples": ab.MIN_SAMPLES,
            "significant": "the interval of the difference excludes 0 and p < alpha",
            "confidence": ab.CONFIDENCE,
            "resamples": resamples,
            "seed": seed,
        },
        "runs": run_records,
        "figures": figures,
        "density": [_density(run, per_run[run.label]) for run in runs],
        "isolation": isolation_matrix(runs),
        "rotations": [{"dir": str(r.dir), "what": r.what, "order": r.order} for r in rotations],
        "notes": [*problems, *_caveats(run_records)],
    }


def _run_record(run: RunInput) -> dict[str, Any]:
    data = run.data
    backend = data.get("backend") or {}
    return {
        "label": run.label,
        "dir": str(run.dir),
        "group": str(run.group) if run.group else None,
        "run_id": data.get("run_id"),
        "created": data.get("created"),
        "partial": bool(data.get("partial")),
        "interrupted_by": data.get("interrupted_by"),
        "what": run_kind(data),
        "backend": {"name": backend.get("name"), "features": backend.get("features") or {}},
        "conditions": conditions(data),
        "success": success(data),
    }


def _density(run: RunInput, run_samples: Mapping[str, list[float]]) -> dict[str, Any]:
    memory = (run.data.get("host") or {}).get("memory_bytes")
    bases = []
    for figure_id, short, basis in DENSITY_BASES:
        values = run_samples[figure_id]
        entry = {"by": basis, "short": short, **density(memory, ab.median(values) if values else None)}
        if entry["sandboxes"] is not None and min(values) <= 0:
            entry["reason"] = "loose: a round measured <= 0, within noise"
        bases.append(entry)
    return {"label": run.label, "host_memory_bytes": memory, "bases": bases}


def _caveats(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Plain sentences on what makes the runs less comparable: conditions that differ, interrupted runs."""
    notes = []
    labels = dict(CONDITIONS)
    for key in CONDITIONS_THAT_MATTER:
        values = {r["label"]: r["conditions"].get(key) for r in records}
        if len({repr(v) for v in values.values() if v not in (None, "n/a")}) > 1:
            listed = "; ".join(f"{label}: {value if value is not None else '—'}" for label, value in values.items())
            notes.append(
                f"The runs differ in {labels[key]} ({listed}): differences below are partly this one's, "
                "not only the backends'."
            )
    for record in records:
        if record["partial"]:
            notes.append(
                f"{record['label']} is a PARTIAL run (interrupted by {record['interrupted_by']}): its figures "
                "cover only what was measured before the interruption."
            )
    return notes


# ---- the isolation matrix ------------------------------------------------------------------------------------


def isolation_matrix(runs: Sequence[RunInput]) -> dict[str, Any] | None:
    """Probe x run for the isolation scenario runs among `runs`: each cell the verdict over the run's sandboxes
    (fail if any failed, pass if none failed and one passed, n/a if none applied, missing if never run) with
    each sandbox's verdict, reason and (already redacted) evidence; None when no run is an isolation run."""
    iso = [run for run in runs if _isolation_data(run.data) is not None]
    if not iso:
        return None
    catalogue: dict[str, dict[str, Any]] = {}
    for run in iso:
        info = _isolation_data(run.data) or {}
        for probe in info.get("probe_catalogue") or []:
            catalogue.setdefault(probe["id"], _probe_description(probe))
        for card in info.get("scorecards") or []:
            for probe in card.get("probes", []):
                catalogue.setdefault(probe["id"], _probe_description(probe))
    columns = []
    for run in iso:
        info = _isolation_data(run.data) or {}
        cells = {probe_id: _cell(probe_id, info.get("scorecards") or []) for probe_id in catalogue}
        detector = info.get("detector")
        columns.append(
            {
                "label": run.label,
                "backend": info.get("backend") or run_backend(run.data),
                "leaky": bool(info.get("leaky")),
                "sandboxes": len(info.get("scorecards") or []),
                "exit_code": (run.data.get("scenario") or {}).get("exit_code"),
                "partial": bool(run.data.get("partial")),
                "detector_armed": _steady_before(run.data).get("met") if detector else None,
                "evidence_clean": (info.get("evidence_clean") or {}).get("clean"),
                "red": sum(1 for cell in cells.values() if cell["verdict"] == "fail"),
                "ran": sum(1 for cell in cells.values() if cell["verdict"] != "missing"),
                "cells": cells,
            }
        )
    return {"probes": list(catalogue.values()), "runs": columns}


def _steady_before(data: Mapping[str, Any]) -> dict[str, Any]:
    """The scenario's steady state before its run (for isolation: whether the detector was armed)."""
    journal = (data.get("scenario") or {}).get("journal") or {}
    return (journal.get("steady_states") or {}).get("before") or {}


def _isolation_data(data: Mapping[str, Any]) -> dict[str, Any] | None:
    scenario = data.get("scenario")
    if not isinstance(scenario, dict) or scenario.get("name") != "isolation":
        return None
    info = scenario.get("data") or {}
    return info if "scorecards" in info else None


def _probe_description(probe: Mapping[str, Any]) -> dict[str, Any]:
    described = {k: probe.get(k, "") for k in ("id", "title", "proves", "fails_when", "finding")}
    if probe.get("field_evaluation"):  # the field evaluation's own command and what it saw there
        described["field_evaluation"] = dict(probe["field_evaluation"])
    return described


def _cell(probe_id: str, cards: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    results = []
    for card in cards:
        for probe in card.get("probes", []):
            if probe.get("id") == probe_id:
                results.append(
                    {
                        "sandbox": card.get("sandbox"),
                        "passed": probe.get("passed"),
                        "reason": probe.get("reason", ""),
                        "evidence": probe.get("evidence", []),
                        "facts": probe.get("facts", {}),
                    }
                )
    passed = [r["passed"] for r in results]
    if not results:
        verdict = "missing"
    elif False in passed:
        verdict = "fail"
    elif True in passed:
        verdict = "pass"
    else:
        verdict = "n/a"
    return {
        "verdict": verdict,
        "passed": passed.count(True),
        "failed": passed.count(False),
        "not_applicable": passed.count(None),
        "sandboxes": results,
    }


# ---- the comparison directory --------------------------------------------------------------------------------


def comparison_of(run_dir: Path, data: Mapping[str, Any]) -> dict[str, Any]:
    """The comparison data of a comparison directory: the one saved in its results.json, or, for a run over
    several backends (which saves none), one computed now from its sub-runs (runs that cannot be read are
    left out and named in its notes)."""
    saved = data.get("comparison")
    if isinstance(saved, dict):
        return saved
    runs, rotations, problems = load_inputs([run_dir], lenient=True)
    if data.get("partial"):
        problems = [
            f"PARTIAL: this run over several backends was interrupted by {data.get('interrupted_by')}; the runs "
            "below are those that had started, each as far as it got.",
            *problems,
        ]
    if not runs:
        return {**EMPTY, "notes": [*problems, "No run of this comparison could be read."]}
    baseline = (data.get("config") or {}).get("baseline")
    return compute_comparison(
        runs, rotations, baseline if baseline in {r.label for r in runs} else None, problems=problems
    )
