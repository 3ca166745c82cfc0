"""The guest kernel: Debian's cloud kernel, fetched with apt and unpacked into the cache."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from harness.errors import EnvironmentMissing
from harness.supervisor import run_tool

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
"""Debian's meta package; it depends on exactly one versioned kernel image package."""

APT_TIMEOUT_S = 300
"""How long one `apt-get download` may take."""


@dataclass(frozen=True)
class Kernel:
    """An unpacked Debian kernel package."""

    release: str
    """Kernel release, e.g. 6.1.0-56-cloud-amd64."""
    bzimage: Path
    """The compressed kernel QEMU boots with -kernel."""
    modules_dir: Path
    """lib/modules/<release> of the package."""


def _run(cmd: list[str], cwd: Path) -> str:
    if shutil.which(cmd[0]) is None:
        raise EnvironmentMissing(f"`{cmd[0]}` not found; this needs a Debian host with apt and dpkg")
    proc = run_tool(cmd, env=network_proxies(), cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EnvironmentMissing(f"`{' '.join(cmd)}` failed ({detail}); run `apt-get update` and check the apt sources")
    return proc.stdout


def _download(package: str, dest: Path) -> Path:
    """apt-get download PACKAGE into dest, reusing a .deb already there."""
    existing = sorted(dest.glob(f"{package}_*.deb"))
    if existing:
        return existing[-1]
    _run(["apt-get", "download", package], cwd=dest)
    found = sorted(dest.glob(f"{package}_*.deb"))
    if not found:
        raise EnvironmentMissing(f"apt-get download {package} produced no .deb in {dest}")
    return found[-1]


def versioned_image_package(meta_deb: Path) -> str:
    """The linux-image-<release> package named in the meta package's Depends field."""
    depends = _run(["dpkg-deb", "-f", str(meta_deb), "Depends"], cwd=meta_deb.parent)
    for alternative in depends.replace("|", ",").split(","):
        name = alternative.strip().split(" ")[0]
        if name.startswith("linux-image-") and name != KERNEL_META_PACKAGE:
            return name
    raise EnvironmentMissing(f"{meta_deb.name} names no linux-image-* dependency: {depends.strip()!r}")


PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
"""apt-get download may need the user's network proxy; nothing else of the environment goes to it."""


def network_proxies() -> dict[str, str]:
    return {name: os.environ[name] for name in PROXY_VARIABLES if name in os.environ}


def fetch_kernel(cache: Path) -> Kernel:
    """Download (once) and unpack the Debian cloud kernel; return its bzImage and module tree."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    meta = _download(KERNEL_META_PACKAGE, debs)
    package = versioned_image_package(meta)
    release = package.removeprefix("linux-image-")
    tree = cache / "kernel" / release
    if not (tree / ".complete").exists():
        deb = _download(package, debs)
        # Unpacked beside the tree under a name of this run's own, then renamed into place: two runs
        # that fetch at once never delete or half-write each other's tree.
        staging = tree.with_name(f"{release}.{os.getpid()}.{secrets.token_hex(4)}.partial")
        staging.mkdir(parents=True)
        try:
            _run(["dpkg-deb", "-x", str(deb), str(staging)], cwd=staging)
            (staging / ".complete").touch()
            if not (tree / ".complete").exists():
                shutil.rmtree(tree, ignore_errors=True)  # a tree a killed run left half unpacked
                with contextlib.suppress(OSError):  # another run renamed its own first: use that one
                    staging.rename(tree)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    bzimage = tree / "boot" / f"vmlinuz-{release}"
    modules_dir = tree / "lib" / "modules" / release
    if not bzimage.exists() or not modules_dir.is_dir():
        raise EnvironmentMissing(f"{package} unpacked without {bzimage.name} or its modules; remove {tree}")
    return Kernel(release=release, bzimage=bzimage, modules_dir=modules_dir)
