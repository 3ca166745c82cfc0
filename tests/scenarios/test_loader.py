"""The one scenario loader: every folder is a package, its siblings import each other, names are stable."""

from __future__ import annotations

import importlib
import sys

import pytest

from harness.errors import ConfigError
from harness.scenario.loader import available_scenarios, load_scenario_module, package_name

FOLDERS = ["isolation", "payments-service", "proxy-chaos", "ram-pressure", "retry-403"]


def test_every_folder_is_a_scenario() -> None:
    assert available_scenarios() == FOLDERS


@pytest.mark.parametrize("name", FOLDERS)
def test_folder_imports_as_a_registered_package(name: str) -> None:
    module = load_scenario_module(name)
    assert module.__name__ == f"scenarios.{name.replace('-', '_')}.scenario" == f"{package_name(name)}.scenario"
    assert sys.modules[module.__name__] is module
    # Once loaded, a plain import finds the same module objects (no second copy).
    assert importlib.import_module(module.__name__) is module
    assert load_scenario_module(name) is module


def test_siblings_are_shared_between_the_scenario_and_tests() -> None:
    payments = load_scenario_module("payments-service")
    assert payments.manifests is load_scenario_module("payments-service", "manifests")
    isolation = load_scenario_module("isolation")
    assert isolation.probes is sys.modules["scenarios.isolation.probes"]


def test_unknown_scenario_names_the_closest() -> None:
    with pytest.raises(ConfigError, match="unknown scenario 'retry-404'; did you mean 'retry-403'"):
        load_scenario_module("retry-404")
