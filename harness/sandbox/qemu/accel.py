"""Deciding the accelerator: KVM only if a canary guest really boots under it, else TCG.

An openable /dev/kvm proves nothing: on our machines KVM_CREATE_VM succeeds and the guest then
hangs at the switch to protected mode. So the verdict comes from a real boot under a timeout.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import ConfigError, EnvironmentMissing
from harness.image import GuestImage
from harness.sandbox.base import BootFailed, SandboxSpec
from harness.sandbox.qemu.vm import Microvm, qemu_version
from harness.scratch import scratch_dir
from harness.supervisor import Supervisor

CANARY_TIMEOUT_S = 15.0
"""A KVM guest reaches its agent in well under a second; a hung one never does."""

ACCELS = ("auto", "kvm", "tcg")
"""Values of --accel."""


@dataclass(frozen=True)
class AccelVerdict:
    """The accelerator chosen and why."""

    accel: str
    """kvm or tcg."""
    reason: str
    """One line a user can read."""
    cached: bool = False
    """True when the verdict came from the cache rather than a fresh canary."""
    canary_ms: float | None = None
    """Canary boot time under KVM, when it booted."""
    kvm_problem: str | None = None
    """Why KVM cannot be used here, when it cannot (what --accel kvm reports)."""


def kvm_device_problem(path: Path = Path("/dev/kvm")) -> str | None:
    """Why /dev/kvm cannot be used at all, or None if it opens read-write."""
    if not path.exists():
        return f"{path} does not exist"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{path} cannot be opened: {exc.strerror}"
    os.close(fd)
    return None


def canary_boots(
    image: GuestImage, accel: str, timeout_s: float, extra_args: tuple[str, ...] = ()
) -> tuple[bool, str, float | None]:
    """Boot one guest under `accel`; (booted, reason, boot_ms). Never leaves the guest running."""
    with scratch_dir("br-canary-") as tmp, Supervisor(f"canary-{os.getpid()}") as supervisor:
        spec = SandboxSpec(id="canary", workdir=Path(tmp), boot_timeout_s=timeout_s)
        vm = Microvm(spec, image, supervisor, accel, extra_args=extra_args)
        vm.spawn()
        try:
            vm.wait_ready()
        except BootFailed as exc:
            return False, exc.reason, None
        finally:
            vm.stop()
        return True, f"canary guest booted under {accel} in {vm.boot.boot_ms:.0f} ms", vm.boot.boot_ms


def _cache_key(image: GuestImage) -> str:
    return f"{qemu_version()}|{platform.release()}|{image.digest}"


def decide_accel(
    requested: str, image: GuestImage, cache_file: Path, timeout_s: float = CANARY_TIMEOUT_S
) -> AccelVerdict:
    """Resolve --accel auto|kvm|tcg into kvm or tcg, booting a KVM canary unless cached."""
    if requested not in ACCELS:
        raise ConfigError(f"--accel must be one of {', '.join(ACCELS)}, not {requested!r}")
    if requested == "tcg":
        return AccelVerdict("tcg", "TCG requested with --accel tcg")
    if shutil.which("qemu-system-x86_64") is None:
        raise EnvironmentMissing("qemu-system-x86_64 not found; run `apt-get install qemu-system-x86`")
    problem = kvm_device_problem()
    if problem:
        if requested == "kvm":
            raise EnvironmentMissing(f"--accel kvm but {problem}; use --accel auto or --accel tcg")
        return AccelVerdict("tcg", f"{problem}; using TCG", kvm_problem=problem)
    key = _cache_key(image)
    cache = _read_cache(cache_file)
    if (cached := _cached_verdict(cache.get(key))) is not None:
        verdict = cached
    else:
        started = time.monotonic()
        booted, reason, boot_ms = canary_boots(image, "kvm", timeout_s)
        if booted:
            verdict = AccelVerdict("kvm", reason, canary_ms=boot_ms)
        else:
            waited = time.monotonic() - started
            failure = f"/dev/kvm opens but a KVM canary guest failed ({reason}, gave up after {waited:.1f} s)"
            verdict = AccelVerdict("tcg", f"{failure}; using TCG", kvm_problem=failure)
        cache[key] = asdict(verdict)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        staged = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.partial")
        staged.write_text(json.dumps(cache, indent=2))
        staged.replace(cache_file)
    if requested == "kvm" and verdict.accel != "kvm":
        problem = verdict.kvm_problem or verdict.reason
        raise EnvironmentMissing(f"--accel kvm but KVM does not work here: {problem}; run with --accel tcg or auto")
    return verdict


def _read_cache(cache_file: Path) -> dict[str, dict[str, object]]:
    """The cached verdicts; a file that does not parse (a crash mid-write, an edit) is a cache miss."""
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _cached_verdict(entry: object) -> AccelVerdict | None:
    """A verdict from the cache, or None when the entry is missing or not one (another version's shape)."""
    if not isinstance(entry, dict):
        return None
    try:
        return AccelVerdict(**{**entry, "cached": True})
    except TypeError:
        return None
