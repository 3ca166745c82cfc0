"""Sandbox backends: one module (or package) per backend, each exposing `create_backend(options) -> Backend`
and `FEATURES`, what it can do, readable before anything is built."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import asdict

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
    "create_backend",
    "describe_backend",
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


def backend_features(name: str) -> Features:
    """What backend `name` can do, without building anything (flags are checked against it first)."""
    if name not in available_backends():
        raise ConfigError(f"unknown backend {name!r}; choose one of: {', '.join(available_backends())}")
    features: Features = importlib.import_module(f"{__name__}.{name}").FEATURES
    return features


def describe_backend(backend: Backend) -> dict[str, object]:
    """results.json's `backend`: its name, its boot phases with their meanings, its features, and what it
    says of itself (versions, accelerator, image). The report reads phases from here."""
    return {
        "name": backend.name,
        **backend.describe(),
        "phases": dict(backend.phases),
        "features": asdict(backend.features),
    }
