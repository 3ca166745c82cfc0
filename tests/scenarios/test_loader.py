"""The one scenario loader: every folder is a package, its siblings import each other, names are stable."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from harness.errors import ConfigError
from harness.scenario.loader import available_scenarios, load_scenario_module, package_name
from tests.conftest import REPO

FOLDERS = [
    "density",
    "egress-conformance",
    "isolation",
    "payments-service",
    "proxy-chaos",
    "ram-pressure",
    "retry-403",
    "toolchains",
]


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


def test_the_loader_imports_nothing_heavy() -> None:
    """The report loads scenario sections through it; it must not pull in the gateway or QEMU code."""
    code = (
        "import sys; from harness.scenario.loader import load_scenario_module as load; "
        "[load(n, 'report') for n in ('isolation', 'retry-403')]; "
        "print(sorted(m for m in sys.modules if m.startswith(('harness.gateway', 'harness.sandbox.qemu'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_report_discovers_each_folders_section() -> None:
    from harness.report import _section_modules

    modules, failed = _section_modules()
    assert failed == []
    by_anchor = dict(modules)
    for name in FOLDERS:
        assert by_anchor[name].__name__ == f"{package_name(name)}.report"
    assert {"boot", "memory", "conditions", "gateway", "guest_latency", "proxy", "journal"} <= set(by_anchor)
