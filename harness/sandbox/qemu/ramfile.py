"""A template's guest RAM as a file that every clone maps privately (copy-on-write).

Where it lives: on tmpfs (/dev/shm) when there is one, so its pages count as used in MemAvailable, as
they are; in the page cache of a disk file they would count as available and flatter sharing.
How it is published: the template writes its RAM into a staging file; that file is copied into a new
sparse one (all-zero pages become holes, which a clone reads as the shared zero page), named by the
SHA-256 of its content and renamed into place. A published file is never rewritten: QEMU 7.2 maps it
read-write even under a private mapping, so a live clone would see any change, or die of SIGBUS.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import secrets
from pathlib import Path

TMPFS_DIR = Path("/dev/shm")
"""Where the RAM files go when it is a writable directory (tmpfs: pages count as used)."""

RAM_DIR_NAME = "blastradius-ram"
"""Our directory under TMPFS_DIR (or under the cache where there is no /dev/shm)."""

PAGE = mmap.PAGESIZE
COPY_CHUNK = 1 << 20
"""Bytes read at a time while publishing."""


def ram_dir(cache: Path) -> Path:
    """The directory for template RAM files: tmpfs when this host has one we can write, else the cache."""
    base = TMPFS_DIR if TMPFS_DIR.is_dir() and os.access(TMPFS_DIR, os.W_OK) else cache
    path = base / RAM_DIR_NAME
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def on_tmpfs(path: Path) -> bool:
    """True when `path` lies on tmpfs (its pages are memory, not reclaimable page cache)."""
    resolved = path.resolve()
    with open("/proc/self/mounts") as mounts:
        points = [(Path(fields[1]), fields[2]) for fields in (line.split() for line in mounts) if len(fields) > 2]
    inside = [(point, kind) for point, kind in points if resolved == point or point in resolved.parents]
    return max(inside, key=lambda found: len(found[0].parts))[1] == "tmpfs"


def staging_path(directory: Path) -> Path:
    """A fresh name for a template to write its RAM into before it is published."""
    return directory / f"staging.{os.getpid()}.{secrets.token_hex(4)}.ram"


def publish(staging: Path) -> tuple[Path, str]:
    """Copy `staging` into a new sparse file beside it, name it by its content's SHA-256 and rename it into
    place; returns (path, digest). An identical file already published is kept as it is, never rewritten."""
    digest = hashlib.sha256()
    partial = staging.with_name(f"{staging.name}.{secrets.token_hex(4)}.partial")
    zero = bytes(PAGE)
    size = staging.stat().st_size
    with staging.open("rb") as source, partial.open("wb") as target:
        offset = 0
        while chunk := source.read(COPY_CHUNK):
            digest.update(chunk)
            for page in range(0, len(chunk), PAGE):
                piece = chunk[page : page + PAGE]
                if piece != zero[: len(piece)]:
                    os.pwrite(target.fileno(), piece, offset + page)
            offset += len(chunk)
        target.truncate(size)
    name = digest.hexdigest()
    final = staging.with_name(f"{name[:32]}.ram")
    if final.exists() and final.stat().st_size == size:
        partial.unlink()
    else:
        partial.replace(final)
    return final, name


def file_sha256(path: Path) -> str:
    with path.open("rb") as ram:
        return hashlib.file_digest(ram, "sha256").hexdigest()


def sweep_staging(directory: Path) -> list[str]:
    """Remove the staging and partial files of template builds whose process is gone (a SIGKILLed run):
    tmpfs holds them in memory until someone does. A live builder's files are kept."""
    removed = []
    for leftover in [*directory.glob("staging.*.ram"), *directory.glob("*.partial")]:
        pid = leftover.name.split(".")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            leftover.unlink(missing_ok=True)
            removed.append(f"removed a killed template build's RAM file {leftover}")
    return removed
