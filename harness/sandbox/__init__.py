"""Sandbox backends: one module per backend, each exposing `create_backend(options) -> Backend`."""

from __future__ import annotations

import importlib
import pkgutil

from harness.errors import ConfigError
from harness.sandbox.base import Backend, BackendOptions, BootFailed, ExecResult, Sandbox, SandboxSpec

__all__ = [
    "Backend",
    "BackendOptions",
    "BootFailed",
    "ExecResult",
    "Sandbox",
    "SandboxSpec",
    "available_backends",
    "create_backend",
]


def available_backends() -> list[str]:
    """Modules of this package that define create_backend."""
    names = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if callable(getattr(module, "create_backend", None)):
            names.append(info.name)
    return sorted(names)


def create_backend(name: str, options: BackendOptions) -> Backend:
    """Instantiate backend `name`; an unknown name is a one-line error listing the known ones."""
    if name not in available_backends():
        raise ConfigError(f"unknown backend {name!r}; choose one of: {', '.join(available_backends())}")
    module = importlib.import_module(f"{__name__}.{name}")
    return module.create_backend(options)
