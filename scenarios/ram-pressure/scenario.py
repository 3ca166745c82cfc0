"""ram-pressure: boot sandboxes one at a time until the host says stop, and find this host's density limit.

Before every boot the stop conditions are checked (never after): host MemAvailable minus the next sandbox's
expected cost below a floor, memory PSI `some avg10` above a ceiling, the cap; a boot that fails also stops
the ramp. The ramp runs once per reclaim setting (virtio-balloon free page reporting on / off) so the report
can show the difference side by side. Every sandbox is stopped at the end of each ramp, on any exit path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import psutil

from harness.config import RunConfig
from harness.errors import ConfigError
from harness.metrics.memory import mem_available_bytes, memory_pressure, process_memory
from harness.sandbox import BootFailed
from harness.scenario.base import Needs

MIB = 1024 * 1024

MIN_FLOOR_MIB = 2048
"""MemAvailable floor: keep at least this much (or FLOOR_FRACTION of RAM, if larger) for the host itself."""

FLOOR_FRACTION = 0.10

MAX_PSI_SOME_AVG10 = 10.0
"""Percent of the last 10 s in which some task stalled on memory; above this the host is already suffering."""

VMM_OVERHEAD_MIB = 96
"""Prior for a sandbox's cost beyond its guest RAM (QEMU + TCG translation cache), until one is measured."""

ALLOC_AWK = (
    'awk -v mib={mib} \'BEGIN {{ chunk = sprintf("%1048576s", ""); '
    "for (i = 0; i < mib; i++) heap[i] = chunk i{hold} }}'"
)
"""Allocate and touch `mib` distinct MiB in the guest (the payments workload's allocator)."""

RECLAIM_MIN_GUEST_MIB = 256
"""Guest RAM below which free page reporting never acts: the guest kernel (6.1) reports only while
32 free 2 MiB blocks stand above its low watermark, which a 128 MiB guest never has. Measured: a
256 MiB guest went 290 -> 200 MiB RSS within 6 s of freeing a 100 MiB burst, a 128 MiB one not at all."""


@dataclass(frozen=True)
class Options:
    """`invoke scenario ram-pressure --set key=value`."""

    max_sandboxes: int = 12
    """Cap on sandboxes per ramp."""
    min_mem_available_mib: int | None = None
    """Host MemAvailable floor in MiB; none: MIN_FLOOR_MIB or FLOOR_FRACTION of RAM, whichever is larger."""
    max_psi_some_avg10: float = MAX_PSI_SOME_AVG10
    """Memory PSI `some avg10` (percent) above which the host is already suffering and the ramp stops."""
    reclaim: Literal["on", "off", "both"] = "both"
    """Free page reporting: on, off, or one ramp each, side by side."""
    workload: Literal["none", "burst", "hold"] = "burst"
    """none: idle guests; burst: each allocates and frees burst_mib once; hold: each keeps hold_mib."""
    burst_mib: int = 96
    """MiB each guest allocates and frees with workload=burst (what reclaim can give back)."""
    hold_mib: int = 150
    """MiB each guest keeps allocated with workload=hold (payments-service's ~150Mi)."""
    settle_s: float = 5.0
    """Wait after each boot and its workload before sampling; free page reporting acts after ~2 s and
    then works through the freed blocks."""

    def validate(self) -> None:
        if self.max_sandboxes < 1 or self.burst_mib < 1 or self.hold_mib < 1 or self.settle_s < 0:
            raise ConfigError("ram-pressure needs max_sandboxes, burst_mib and hold_mib >= 1 and settle_s >= 0")


class Thresholds(NamedTuple):
    """The stop conditions of one ramp (see stop_reason)."""

    min_mem_available_bytes: int
    max_psi_some_avg10: float
    cap: int


def default_floor_bytes() -> int:
    total = psutil.virtual_memory().total
    return max(MIN_FLOOR_MIB * MIB, int(total * FLOOR_FRACTION))


def stop_reason(
    n: int, available: int, psi: dict[str, float] | None, next_cost: int, limits: Thresholds
) -> tuple[str, str] | None:
    """Why the next boot must not happen, or None. Checked before each boot, so a boot that would take the
    host below the floor is never started."""
    if n >= limits.cap:
        return "cap", f"reached the cap of {limits.cap} sandboxes"
    if available - next_cost < limits.min_mem_available_bytes:
        return "mem-available", (
            f"MemAvailable {available // MIB} MiB minus the next sandbox's ~{next_cost // MIB} "
            f"MiB would fall below the {limits.min_mem_available_bytes // MIB} MiB floor"
        )
    if psi is not None and psi.get("some_avg10", 0.0) > limits.max_psi_some_avg10:
        return "psi", f"memory PSI some avg10 {psi['some_avg10']:.2f}% > {limits.max_psi_some_avg10:g}%"
    return None


class RamPressure:
    name = "ram-pressure"

    def __init__(self, options: Options) -> None:
        self.options = options
        self.arms: list[dict[str, Any]] = []

    def setup(self, ctx: Any) -> None:
        o = self.options
        floor = o.min_mem_available_mib * MIB if o.min_mem_available_mib is not None else default_floor_bytes()
        self.limits = Thresholds(floor, o.max_psi_some_avg10, o.max_sandboxes)
        settings = {"on": [True], "off": [False], "both": [True, False]}[o.reclaim]
        self.settings = settings
        ctx.data.update(
            thresholds={
                "min_mem_available_bytes": floor,
                "max_psi_some_avg10": self.limits.max_psi_some_avg10,
                "cap": self.limits.cap,
            },
            workload={"kind": o.workload, "burst_mib": o.burst_mib, "hold_mib": o.hold_mib},
            guest_mem_mib=ctx.template.mem_mib,
            settle_s=o.settle_s,
            arms=self.arms,
        )

    def steady_state(self, ctx: Any) -> dict[str, Any] | None:
        available, psi = mem_available_bytes(), memory_pressure()
        return {
            "met": True,
            "mem_available_bytes": available,
            "psi": psi,
            "hypothesis": "the host is not under memory pressure before and after the ramps",
        }

    def run(self, ctx: Any) -> None:
        for reclaim in self.settings:
            with ctx.journal.activity(f"ramp:reclaim-{'on' if reclaim else 'off'}", "action") as step:
                arm = self._ramp(ctx, reclaim)
                step.output = {k: arm[k] for k in ("stop", "density_limit", "marginal_mib_per_sandbox")}
            ctx.save()

    def _workload(self, sandbox: Any) -> None:
        o = self.options
        if o.workload == "burst":
            sandbox.exec(ALLOC_AWK.format(mib=o.burst_mib, hold=""), timeout=60)
        elif o.workload == "hold":
            # Backgrounded with setsid so it outlives the agent connection, like a service in the guest.
            command = ALLOC_AWK.format(mib=o.hold_mib, hold='; system("sleep 100000")')
            sandbox.exec(f"setsid sh -c {_quote(command)} </dev/null >/dev/null 2>&1 &", timeout=10)
            time.sleep(1)

    def _ramp(self, ctx: Any, reclaim: bool) -> dict[str, Any]:
        o = self.options
        label = "on" if reclaim else "off"
        arm: dict[str, Any] = {
            "reclaim": reclaim,
            "steps": [],
            "stop": None,
            "density_limit": 0,
            "marginal_mib_per_sandbox": None,
            "baseline_mem_available_bytes": None,
        }
        self.arms.append(arm)
        next_cost = (ctx.template.mem_mib + VMM_OVERHEAD_MIB) * MIB
        started = time.monotonic()
        with ctx.fleet(None, reclaim=reclaim) as fleet:
            baseline = mem_available_bytes()
            arm["baseline_mem_available_bytes"] = baseline
            n = 0
            while True:
                available, psi = mem_available_bytes(), memory_pressure()
                reason = stop_reason(n, available, psi, next_cost, self.limits)
                if reason is not None:
                    arm["stop"] = {
                        "reason": reason[0],
                        "detail": reason[1],
                        "n": n,
                        "mem_available_bytes": available,
                        "psi": psi,
                    }
                    break
                sandbox_id = f"{label}-{n + 1:02d}"
                try:
                    sandbox = ctx.boot(fleet, sandbox_id)
                except BootFailed as exc:
                    arm["stop"] = {
                        "reason": "boot-failed",
                        "detail": f"{sandbox_id}: {exc.reason}",
                        "n": n,
                        "mem_available_bytes": mem_available_bytes(),
                        "psi": memory_pressure(),
                    }
                    break
                n += 1
                self._workload(sandbox)
                time.sleep(o.settle_s)
                pss: dict[str, int] = {}
                for sid, pids in fleet.pids().items():
                    pss[sid] = sum(process_memory(pid)["pss"] for pid in pids)
                available = mem_available_bytes()
                marginal = (baseline - available) / n
                # The next boot is expected to cost what the ramp has measured so far, never less than the PSS
                # the newest sandbox already holds.
                next_cost = max(int(marginal), pss.get(sandbox_id, 0))
                arm["steps"].append(
                    {
                        "n": n,
                        "t_s": round(time.monotonic() - started, 2),
                        "mem_available_bytes": available,
                        "psi": memory_pressure(),
                        "pss_bytes": pss,
                        "pss_total_bytes": sum(pss.values()),
                        "newest": sandbox_id,
                        "newest_boot_ms": sandbox.boot.boot_ms,
                        "marginal_bytes_per_sandbox": int(marginal),
                    }
                )
                ctx.save()
        arm["density_limit"] = n
        if arm["steps"]:
            last = arm["steps"][-1]
            arm["marginal_mib_per_sandbox"] = round(last["marginal_bytes_per_sandbox"] / MIB, 1)
            arm["pss_mib_per_sandbox"] = round(last["pss_total_bytes"] / n / MIB, 1)
            # Where MemAvailable would hit the floor at the measured marginal cost: the limit this host would
            # reach without a cap.
            if last["marginal_bytes_per_sandbox"] > 0:
                arm["projected_limit"] = int(
                    (baseline - self.limits.min_mem_available_bytes) // last["marginal_bytes_per_sandbox"]
                )
        return arm

    def rollback(self, ctx: Any) -> None:
        # Each ramp's fleet context already stopped its sandboxes; the supervisor reaps anything left.
        with ctx.journal.activity("teardown", "rollback") as step:
            step.output = {"live_after": 0}

    def exit_code(self, ctx: Any) -> int:
        return 0 if self.arms and all(a["stop"] is not None for a in self.arms) else 1


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def needs(options: Options, config: RunConfig) -> Needs:
    """A backend that reclaims freed guest memory, and guests of at least RECLAIM_MIN_GUEST_MIB, when a ramp
    runs with free page reporting on. Both arms boot the same way (--boot-mode, snapshot by default): the
    backend keeps one template per device set, so a guest with reclaim off restores from a template made so."""
    if options.reclaim == "off":
        return Needs()
    if "file" in config.memory_sharing:
        raise ConfigError(
            f"ram-pressure reclaim={options.reclaim} measures free page reporting, which --memory-sharing "
            f"{config.memory_sharing} keeps off (a discard would punch holes into the shared template file); "
            "add --set reclaim=off or use --memory-sharing off"
        )
    return Needs(mem_mib=max(config.mem_mib, RECLAIM_MIN_GUEST_MIB), features=("reclaim",))


def create(options: Options) -> RamPressure:
    return RamPressure(options)


def terminal_summary(data: dict[str, Any]) -> str:
    """Each arm's density limit and why it stopped, from the run's saved data."""
    lines = []
    for arm in data.get("arms", []):
        stop = arm.get("stop") or {}
        lines.append(
            f"reclaim {arm.get('reclaim')}: stopped at N={stop.get('n')} ({stop.get('reason')}: "
            f"{stop.get('detail')}); marginal {arm.get('marginal_mib_per_sandbox')} MiB per sandbox, "
            f"PSS {arm.get('pss_mib_per_sandbox')} MiB per sandbox"
        )
    return "\n".join(lines) or "no arm ran"
