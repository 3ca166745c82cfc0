"""Kernel modules: read each module's modinfo `depends=` and order the loads."""

from __future__ import annotations

import lzma
from dataclasses import dataclass
from pathlib import Path

from harness.errors import EnvironmentMissing

MODULE_SUFFIXES = (".ko", ".ko.xz")
"""Module file names Debian ships (xz-compressed in newer kernels)."""


@dataclass(frozen=True)
class Module:
    """One loadable kernel module."""

    name: str
    """Canonical name, dashes turned into underscores as the kernel does."""
    path: Path
    """The .ko file in the kernel package."""
    depends: tuple[str, ...]
    """Modules that must be loaded first, from the module's own modinfo."""


def canonical(name: str) -> str:
    """The kernel treats '-' and '_' in module names as the same character."""
    return name.replace("-", "_")


def read_module_bytes(path: Path) -> bytes:
    """The uncompressed ELF of a module file."""
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def modinfo_field(elf: bytes, field: str) -> str | None:
    """A field of the .modinfo section: NUL-separated `key=value` strings inside the ELF."""
    marker = b"\0" + field.encode() + b"="
    start = elf.find(marker)
    if start < 0:
        return None
    start += len(marker)
    return elf[start : elf.index(b"\0", start)].decode()


def index_modules(modules_dir: Path) -> dict[str, Path]:
    """Map every module name under lib/modules/<release> to its file."""
    index: dict[str, Path] = {}
    for path in modules_dir.rglob("*.ko*"):
        for suffix in MODULE_SUFFIXES:
            if path.name.endswith(suffix):
                index[canonical(path.name.removesuffix(suffix))] = path
    return index


def load_order(wanted: list[str], modules_dir: Path) -> list[Module]:
    """The modules to insmod, dependencies first, resolved from each module's `depends=`."""
    index = index_modules(modules_dir)
    ordered: list[Module] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = canonical(name)
        if name in done:
            return
        if name in visiting:
            raise EnvironmentMissing(f"module dependency cycle through {name}")
        if name not in index:
            raise EnvironmentMissing(f"kernel module {name} not found under {modules_dir}")
        visiting.add(name)
        depends_field = modinfo_field(read_module_bytes(index[name]), "depends") or ""
        depends = tuple(canonical(d) for d in depends_field.split(",") if d)
        for dep in depends:
            visit(dep)
        visiting.discard(name)
        done.add(name)
        ordered.append(Module(name=name, path=index[name], depends=depends))

    for name in wanted:
        visit(name)
    return ordered
