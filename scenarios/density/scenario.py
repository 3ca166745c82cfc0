"""density: the divergence curve. Idle clones flatter every system; this boots N clones per arm and walks
them through agent-like work steps, measuring after each what one more clone costs the host.

Steps, run in every clone of an arm, each measured after it settles:
  idle   - just booted;
  files  - FILES_MIB of incompressible files written in /tmp;
  burst  - BURST_MIB allocated, touched and freed;
  hold   - HOLD_MIB allocated and kept.
Arms (one after another, never at once, each torn down before the next):
  off       - each clone holds its own copy of the template's RAM; free page reporting on (today's default);
  file      - the template's RAM is a file every clone maps privately; free page reporting off;
  ksm / file+ksm - the same with Linux KSM on for the arm (restored after; waits for two full scans).
The host cost per clone (the projection's figure) is its PSS less its share of the template RAM file, plus
the file's resident pages over N: each page once, the template whole, mapped or not. MemAvailable's fall
since the arm began (plus the template pages already resident then) is recorded beside it, as the check
that moves with the rest of the host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from harness.config import RunConfig
from harness.errors import ConfigError
from harness.ksm import ksm_switched_on
from harness.ksm import settle as ksm_settle
from harness.metrics.memory import file_resident_bytes, mapped_pss_bytes, mem_available_bytes, process_memory
from harness.sandbox import BootFailed, Sandbox, backend_features
from harness.scenario.base import Needs

MIB = 1024 * 1024

ARMS = ("off", "file", "ksm", "file+ksm")
"""Memory sharing modes an arm can run in (as --memory-sharing)."""

STEPS = ("idle", "files", "burst", "hold")
"""The work steps, in order; each is measured after it."""

MIN_GUEST_MIB = 256
"""A 128 MiB guest has ~64 MiB free after boot: too little for the burst step on top of the others."""

ALLOC_AWK = "awk 'BEGIN {{ for (i = 0; i < {mib}; i++) heap[i] = sprintf(\"%1048576d\", i){hold} }}'"
"""Allocate and touch `mib` distinct MiB in the guest (ram-pressure's allocator, without the concatenation)."""

FLOOR_FRACTION = 0.10
"""Host memory kept free in the density projection: this fraction of MemTotal."""


@dataclass(frozen=True)
class Options:
    """`invoke scenario density --set key=value`."""

    sandboxes: int = 4
    """Clones per arm."""
    arms: str = "off,file"
    """Comma list of memory sharing modes, one arm each, in turn: off, file, ksm, file+ksm."""
    files_mib: int = 16
    """MiB of files each clone writes in /tmp (random bytes: nothing to merge or share)."""
    burst_mib: int = 64
    """MiB each clone allocates, touches and frees."""
    hold_mib: int = 32
    """MiB each clone allocates and keeps."""
    settle_s: float = 3.0
    """Wait after a step before measuring (free page reporting acts after ~2 s)."""

    @property
    def arm_list(self) -> list[str]:
        return [arm.strip() for arm in self.arms.split(",") if arm.strip()]

    def validate(self) -> None:
        unknown = [arm for arm in self.arm_list if arm not in ARMS]
        if not self.arm_list or unknown or len(set(self.arm_list)) != len(self.arm_list):
            raise ConfigError(
                f"--set arms takes a comma list of distinct modes of {', '.join(ARMS)}, not {self.arms!r}"
            )
        if self.sandboxes < 1 or self.files_mib < 1 or self.burst_mib < 1 or self.hold_mib < 1 or self.settle_s < 0:
            raise ConfigError("density needs sandboxes, files_mib, burst_mib and hold_mib >= 1 and settle_s >= 0")
        if self.files_mib > 24:
            raise ConfigError("--set files_mib must be at most 24: the guest's /tmp holds 32 MiB")


class Density:
    name = "density"

    def __init__(self, options: Options) -> None:
        self.options = options
        self.arms: list[dict[str, Any]] = []

    def setup(self, ctx: Any) -> None:
        o = self.options
        ctx.data.update(
            sandboxes=o.sandboxes,
            steps=list(STEPS),
            work={"files_mib": o.files_mib, "burst_mib": o.burst_mib, "hold_mib": o.hold_mib},
            guest_mem_mib=ctx.template.mem_mib,
            settle_s=o.settle_s,
            host_mem_total_bytes=psutil.virtual_memory().total,
            arms=self.arms,
        )

    def steady_state(self, ctx: Any) -> dict[str, Any] | None:
        return {"met": True, "mem_available_bytes": mem_available_bytes(), "hypothesis": "measured, not judged"}

    def run(self, ctx: Any) -> None:
        for mode in self.options.arm_list:
            with ctx.journal.activity(f"arm:{mode}", "action") as step:
                arm = self._arm(ctx, mode)
                step.output = {"steps": len(arm["steps"]), "error": arm.get("error")}
            ctx.save()

    def _arm(self, ctx: Any, mode: str) -> dict[str, Any]:
        o = self.options
        shared_ram = "file" in mode
        arm: dict[str, Any] = {"mode": mode, "reclaim": not shared_ram, "steps": [], "error": None}
        self.arms.append(arm)
        with (
            ksm_switched_on("ksm" in mode) as ksm,
            ctx.fleet(None, reclaim=not shared_ram, shared_ram=shared_ram) as fleet,
        ):
            arm["ksm"] = ksm
            # A first clone, stopped before the baseline, makes the arm's template (if it is not cached), so
            # the template's boot is in no figure; its RAM file, if any, is counted below as shared.
            try:
                ctx.boot(fleet, f"{mode.replace('+', '-')}-warmup")
            except BootFailed as exc:
                arm["error"] = f"boot failed: {exc.reason}"
                return arm
            fleet.stop_all()
            time.sleep(o.settle_s)
            baseline = mem_available_bytes()
            shared_before = _shared_resident(ctx)
            arm.update(baseline_mem_available_bytes=baseline, shared_resident_at_start_bytes=shared_before)
            clones: list[Sandbox] = []
            try:
                for index in range(o.sandboxes):
                    clones.append(ctx.boot(fleet, f"{mode.replace('+', '-')}-{index + 1:02d}"))
            except BootFailed as exc:
                arm["error"] = f"boot failed: {exc.reason}"
                return arm
            for name in STEPS:
                command = self._command(name)
                if command is not None:
                    for clone in clones:
                        result = clone.exec(command, timeout=120)
                        if result.rc != 0:
                            arm["error"] = f"{name} in {clone.id}: exit {result.rc} {result.stderr[-200:]!r}"
                            return arm
                time.sleep(o.settle_s)
                arm["steps"].append(self._measure(ctx, fleet, name, baseline, shared_before, ksm is not None))
                ctx.save()
        return arm

    def _command(self, step: str) -> str | None:
        o = self.options
        if step == "files":
            return f"for i in $(seq {o.files_mib}); do head -c 1048576 /dev/urandom > /tmp/work-$i; done"
        if step == "burst":
            return ALLOC_AWK.format(mib=o.burst_mib, hold="")
        if step == "hold":
            # Backgrounded with setsid so it outlives the agent connection, like a service in the guest.
            hold = ALLOC_AWK.format(mib=o.hold_mib, hold='; system("sleep 100000")')
            return f"setsid sh -c {_quote(hold)} </dev/null >/dev/null 2>&1 & sleep 2"
        return None

    def _measure(
        self, ctx: Any, fleet: Any, step: str, baseline: int, shared_before: int, ksm_on: bool
    ) -> dict[str, Any]:
        ksm = ksm_settle() if ksm_on else None
        available = mem_available_bytes()
        pss, uss, shared_pss = [], [], []
        files = ctx.backend.describe().get("shared_files") or []
        for pids in fleet.pids().values():
            memory = [process_memory(pid) for pid in pids]
            pss.append(sum(m["pss"] for m in memory))
            uss.append(sum(m["uss"] for m in memory))
            shared_pss.append(sum(mapped_pss_bytes(pid, files) for pid in pids))
        n = len(pss)
        shared_now = _shared_resident(ctx)
        return {
            "step": step,
            "n": n,
            "mem_available_bytes": available,
            "mem_available_delta_bytes_per_sandbox": (baseline - available) // max(n, 1),
            "pss_bytes_per_sandbox": sum(pss) // max(n, 1),
            "uss_bytes_per_sandbox": sum(uss) // max(n, 1),
            "shared_resident_bytes": shared_now,
            # Shared pages resident before the arm began are in no Δ: count them, once, over N.
            "mem_available_with_shared_bytes_per_sandbox": (baseline - available + shared_before) // max(n, 1),
            # The projection's figure: every page once (PSS without the clone's share of the template, and the
            # template whole over N). MemAvailable moves by more than a clone costs on a busy host.
            "host_bytes_per_sandbox": (sum(pss) - sum(shared_pss) + shared_now) // max(n, 1),
            "ksm": ksm,
        }

    def rollback(self, ctx: Any) -> None:
        with ctx.journal.activity("teardown", "rollback") as step:
            step.output = {"live_after": 0}  # each arm's fleet context already stopped its clones

    def exit_code(self, ctx: Any) -> int:
        return 0 if self.arms and all(arm["error"] is None for arm in self.arms) else 1


def _shared_resident(ctx: Any) -> int:
    """Resident bytes of the files every sandbox maps (a template's RAM), as the backend names them."""
    paths = ctx.backend.describe().get("shared_files") or []
    return sum(file_resident_bytes(Path(path)) or 0 for path in paths)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def projected_limit(host_total: int, cost: int) -> int | None:
    """Clones this host could hold at `cost` each, keeping FLOOR_FRACTION of its memory free."""
    return int(host_total * (1 - FLOOR_FRACTION) // cost) if cost > 0 else None


def needs(options: Options, config: RunConfig) -> Needs:
    """Snapshot clones (there is nothing to share otherwise) of at least MIN_GUEST_MIB, on a backend that shares
    memory in every arm's mode."""
    if config.boot_mode != "snapshot":
        raise ConfigError("density measures snapshot clones; drop --boot-mode cold")
    able = backend_features(config.backend).memory_sharing
    if missing := [arm for arm in options.arm_list if arm not in able]:
        raise ConfigError(
            f"density arms {', '.join(missing)}: the {config.backend} backend shares memory only as {', '.join(able)}"
        )
    return Needs(mem_mib=max(config.mem_mib, MIN_GUEST_MIB), features=("snapshot",))


def create(options: Options) -> Density:
    return Density(options)


def terminal_summary(data: dict[str, Any]) -> str:
    """Each arm's host cost per clone after each step."""
    lines = []
    for arm in data.get("arms", []):
        costs = ", ".join(f"{s['step']} {s['host_bytes_per_sandbox'] / MIB:.1f}" for s in arm.get("steps", []))
        lines.append(
            f"{arm['mode']}: host MiB per clone after {costs or 'no step'}"
            + (f" ({arm['error']})" if arm.get("error") else "")
        )
    return "\n".join(lines) or "no arm ran"
