"""The run's conditions: what every figure in the report was measured under."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.report import Section
from harness.report.format import mib

ORDER = 0

TLS_WORDS = {
    "strict": "strict: TLS 1.2+, forward-secret AEAD suites, no SHA-1 handshake signatures",
    "sha1-compat": "sha1-compat: TLS 1.2+, forward-secret AEAD suites, but SHA-1 handshake signatures allowed, "
    "because busybox's ssl_client sends no signature_algorithms (a concession for busybox sandboxes only)",
}
"""The gateway's guest-facing TLS profile of this run's sandbox listeners, in words."""


def section(data: dict[str, Any], run_dir: Path) -> Section:
    host, config, backend = data["host"], data["config"], data["backend"]
    if not (data.get("scenario") or {}).get("boots_sandboxes", True):
        return _host_side(data)
    features = backend.get("features", {})
    # Guest RAM and a boot mode are settings only of backends that have them (a jail has neither).
    has_guest_ram = features.get("min_mem_mib") is not None or not features
    rows = [
        ["backend", backend.get("name")],
        ["isolation", backend.get("isolation")],
        ["version", backend.get("version")],
        ["accelerator", f"{data['accel']} — {backend.get('accel_reason', '')}" if data["accel"] != "none" else None],
        ["VMM", backend.get("vmm")],
        ["host CPU", f"{host['cpu_model']}, {host['cores']} cores"],
        ["host memory", mib(host["memory_bytes"])],
        ["host kernel / python", f"{host['kernel']} / {host['python']}"],
        ["sandboxes per round (N)", config.get("sandboxes")],
        ["boot concurrency", config.get("concurrency")],
        ["warm-up rounds (discarded)", config.get("warmup")],
        ["measured rounds", config.get("repeat")],
        ["guest RAM", f"{config.get('mem_mib')} MiB" if has_guest_ram else None],
        ["boot mode", _boot_mode(backend) if features.get("snapshot", True) else None],
        ["memory sharing", _sharing(data) if "memory_sharing" in config else None],
        ["guest image", _image(config, backend)],
        ["guest-facing TLS", TLS_WORDS.get(str(backend.get("tls_profile")), backend.get("tls_profile"))],
        ["guest kernel", backend.get("kernel_release")],
        ["kernel command line", backend.get("kernel_cmdline")],
        ["egress", backend.get("egress")],
    ]
    notes = []
    if data["partial"]:
        notes.append(
            f"PARTIAL RUN: interrupted by {data.get('interrupted_by')}; figures cover only what "
            "was measured before the interruption."
        )
    if data.get("leftover_vmm_pids"):
        notes.append(f"VMM processes survived stop: {data['leftover_vmm_pids']}")
    if data["accel"] == "tcg":
        notes.append(
            "All guests ran under TCG (software emulation): boot times and VMM memory are far "
            "above what the same guest costs under KVM."
        )
    # Leave out what does not apply (a scenario's rounds, a jail's VMM) rather than print None.
    rows = [row for row in rows if row[1] is not None]
    return Section(title="Conditions", tables=[("", ["", ""], rows)], notes=notes)


def _host_side(data: dict[str, Any]) -> Section:
    """A scenario that boots no sandbox ran on the host alone: no backend, guest or rounds apply."""
    host = data["host"]
    rows = [
        ["sandboxes", f"none: {data['scenario']['name']} is a host-side client and boots no sandbox"],
        ["host CPU", f"{host['cpu_model']}, {host['cores']} cores"],
        ["host memory", mib(host["memory_bytes"])],
        ["host kernel / python", f"{host['kernel']} / {host['python']}"],
    ]
    notes = [] if not data["partial"] else [f"PARTIAL RUN: interrupted by {data.get('interrupted_by')}."]
    return Section(title="Conditions", tables=[("", ["", ""], rows)], notes=notes)


def _image(config: dict[str, Any], backend: dict[str, Any]) -> str | None:
    """The guest image, with the debian image's size and cold build time where the backend recorded them."""
    shown = backend.get("image") or config.get("image")
    build = backend.get("image_build") or {}
    if shown and build:
        shown = (
            f"{shown}: Debian {build.get('suite')}, Python {build.get('python')}, {', '.join(build.get('pypi', []))}; "
            f"root disk {mib(backend.get('root_disk_bytes'))} squashfs of {mib(build.get('rootfs_bytes'))}, "
            f"built cold in {build.get('build_s')} s"
        )
    return shown


def _boot_mode(backend: dict[str, Any]) -> str:
    if backend.get("boot_mode") != "snapshot":
        return str(backend.get("boot_mode", "—"))
    snapshots = backend.get("snapshot_bytes") or {}
    if isinstance(snapshots, int):  # results written before templates were kept per shape
        snapshots = {"default": snapshots}
    sizes = ", ".join(f"{shape}: {_size(size)}" for shape, size in snapshots.items())
    return f"snapshot: each sandbox restored from a booted template of its shape (vmstate {sizes or '—'})"


def _size(size: int) -> str:
    """A vmstate's size: MiB with the RAM in it, KiB when it holds device state only."""
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"


def _sharing(data: dict[str, Any]) -> str:
    """The --memory-sharing mode and what it meant in this run."""
    mode = str(data["config"]["memory_sharing"])
    said = {
        "off": "off: each clone holds its own copy of the template's RAM",
        "file": "file: the template's RAM is a file every clone maps privately (copy-on-write); "
        "free page reporting off",
        "ksm": "ksm: Linux KSM merged identical pages while the run lasted",
        "file+ksm": "file+ksm: a shared template RAM file, and KSM on while the run lasted",
    }.get(mode, mode)
    ram = data["backend"].get("template_ram") or {}
    if ram:
        said += "; template RAM " + ", ".join(
            f"{shape}: {_size(info['allocated_bytes'])} allocated of {_size(info['bytes'])} "
            f"on {'tmpfs (counted as used)' if info['on_tmpfs'] else 'disk (page cache, counted as available)'}"
            for shape, info in ram.items()
        )
    return said
