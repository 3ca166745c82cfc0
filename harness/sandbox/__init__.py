"""Sandbox backends: one module (or package) per backend, each exposing `create_backend(options) -> Backend`
and `FEATURES`, what it can do, readable before anything is built."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import asdict, replace
from pathlib import Path

from harness.errors import ConfigError
from harness.sandbox.base import Backend, BackendOptions, BootFailed, ExecResult, Features, Sandbox, SandboxSpec

__all__ = [
    "Backend",
    "BackendOptions",
    "BootFailed",
    "ExecResult",
    "Features",
    "Sandbox",
    "SandboxSpec",
    "available_backends",
    "backend_features",
    "backend_label",
    "check_backend_argument",
    "create_backend",
    "describe_backend",
    "split_backend",
    "sweep_backend_leftovers",
]


def available_backends() -> list[str]:
    """Modules of this package that define create_backend."""
    names = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if callable(getattr(module, "create_backend", None)):
            names.append(info.name)
    return sorted(names)


def split_backend(name: str) -> tuple[str, str | None]:
    """`--backend` names a module, with an argument after a colon where it takes one
    (`command:stack.yaml`); an unknown module is a one-line error listing the known ones."""
    module, colon, argument = name.partition(":")
    if module not in available_backends():
        raise ConfigError(f"unknown backend {module!r}; choose one of: {', '.join(available_backends())}")
    if colon and not argument:
        raise ConfigError(f"--backend {name}: nothing after the colon; name what the {module} backend takes")
    return module, (argument if colon else None)


def backend_label(name: str) -> str:
    """A name for a backend's sub-run directory and report column: the module, and the argument's file
    stem where there is one (command:examples/bwrap.yaml → command-bwrap)."""
    module, argument = split_backend(name)
    if argument is None:
        return module
    stem = Path(argument).stem or argument
    return f"{module}-{''.join(c if c.isalnum() or c in '-_' else '-' for c in stem)}"


def create_backend(name: str, options: BackendOptions) -> Backend:
    """Instantiate backend `name` (MODULE or MODULE:ARGUMENT)."""
    module_name, argument = split_backend(name)
    module = importlib.import_module(f"{__name__}.{module_name}")
    return module.create_backend(replace(options, argument=argument))


def backend_features(name: str) -> Features:
    """What backend `name` can do, without building anything (flags are checked against it first)."""
    module_name, _ = split_backend(name)
    features: Features = importlib.import_module(f"{__name__}.{module_name}").FEATURES
    return features


def check_backend_argument(name: str) -> None:
    """Cheap checks of what follows the colon, before anything of the run is written: a backend module may
    define `check_argument(argument)` (the command backend parses its stack file there) raising ConfigError."""
    module_name, argument = split_backend(name)
    check = getattr(importlib.import_module(f"{__name__}.{module_name}"), "check_argument", None)
    if callable(check):
        check(argument)
    elif argument is not None:
        raise ConfigError(f"--backend {name}: the {module_name} backend takes nothing after a colon; drop it")


def sweep_backend_leftovers() -> list[str]:
    """Ask every backend that leaves state outside its processes (a module-level `sweep_leftovers()`,
    e.g. gVisor's container records) to remove what runs that are gone left behind; for `invoke clean`."""
    removed: list[str] = []
    for name in available_backends():
        sweep = getattr(importlib.import_module(f"{__name__}.{name}"), "sweep_leftovers", None)
        if callable(sweep):
            removed += sweep()
    return removed


def describe_backend(backend: Backend) -> dict[str, object]:
    """results.json's `backend`: its name, its boot phases with their meanings, its features, and what it
    says of itself (versions, accelerator, image). The report reads phases from here."""
    return {
        "name": backend.name,
        **backend.describe(),
        "phases": dict(backend.phases),
        "features": asdict(backend.features),
    }
