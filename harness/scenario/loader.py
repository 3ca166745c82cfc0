"""The one way a scenario folder is imported.

`scenarios/payments-service/` becomes the package `scenarios.payments_service` (the folder name with `-`
as `_`, under the top-level package `scenarios`), registered in sys.modules like any import. Modules in
a folder import each other relatively (`from . import manifests`), tests reach them with
`load_scenario_module("payments-service", "manifests")`, and once the folder is loaded
`import scenarios.payments_service.manifests` works too. This module imports nothing heavy: the report
loads scenario report sections through it.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from harness.errors import ConfigError

SCENARIOS_DIR = Path(__file__).resolve().parents[2] / "scenarios"
"""Where scenario folders live (the repository's scenarios/)."""

PACKAGE = "scenarios"
"""Import name of the scenarios/ directory; each folder is a subpackage of it."""


def available_scenarios() -> list[str]:
    """Folder names of every scenario: a package with a scenario.py."""
    return sorted(p.parent.name for p in SCENARIOS_DIR.glob("*/scenario.py") if (p.parent / "__init__.py").exists())


def package_name(name: str) -> str:
    """`retry-403` -> `scenarios.retry_403`."""
    return f"{PACKAGE}.{name.replace('-', '_')}"


def _import_package(qualified: str, folder: Path) -> ModuleType:
    if qualified in sys.modules:
        return sys.modules[qualified]
    spec = importlib.util.spec_from_file_location(
        qualified, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as a normal import would be: relative imports, dataclasses and
    # typing.get_type_hints look the package up by name.
    sys.modules[qualified] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[qualified]
        raise
    return module


def scenario_package(name: str) -> ModuleType:
    """The package of folder scenarios/NAME; an unknown name is a one-line error naming the closest."""
    known = available_scenarios()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown scenario {name!r}; {hint}choose one of: {', '.join(known)}")
    parent = _import_package(PACKAGE, SCENARIOS_DIR)
    package = _import_package(package_name(name), SCENARIOS_DIR / name)
    setattr(parent, package.__name__.rpartition(".")[2], package)
    return package


def load_scenario_module(name: str, module: str = "scenario") -> ModuleType:
    """scenarios/NAME/MODULE.py, imported as a submodule of its folder's package."""
    return importlib.import_module(f"{scenario_package(name).__name__}.{module}")


def scenario_modules(module: str) -> dict[str, ModuleType]:
    """MODULE.py of every scenario folder that has one (e.g. "report"), by folder name."""
    return {
        name: load_scenario_module(name, module)
        for name in available_scenarios()
        if (SCENARIOS_DIR / name / f"{module}.py").exists()
    }
