"""The one configuration parser: typed fields from strings or YAML values, unknown names and bad values refused
with the fix, and scenario options (and what a scenario needs) settled before a run writes anything."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from harness.bench import BenchConfig
from harness.cli import bench_config
from harness.config import (
    BENCH_FLAGS,
    PROXY_FLAGS,
    RunConfig,
    build,
    field_docs,
    parse_sets,
    parse_value,
    settings,
)
from harness.errors import ConfigError
from harness.image.catalog import IMAGES
from harness.load.bench import ProxyBenchConfig
from harness.scenario.runner import prepare_scenario


@dataclass(frozen=True)
class Sample:
    """A config with one field of every kind the parser knows."""

    count: int = 3
    """How many."""
    ratio: float = 0.5
    """How much."""
    on: bool = False
    """Whether."""
    name: str = "x"
    """What."""
    path: Path | None = None
    """Where; none when not given."""
    mode: Literal["a", "b"] = "a"
    """Which."""
    items: list[str] | None = None
    """A comma list."""


def test_strings_and_typed_values_become_the_field_type() -> None:
    got = build(
        Sample,
        {"count": "7", "ratio": "1.5", "on": "yes", "name": 5, "path": "~/x", "mode": "b", "items": "p, q,"},
    )
    assert got == Sample(7, 1.5, True, "5", Path("~/x").expanduser(), "b", ["p", "q"])
    assert build(Sample, {"count": 7, "ratio": 2, "on": False, "path": "none", "items": ["r"]}) == Sample(
        7, 2.0, False, items=["r"]
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"count": "many"}, "count: expected a whole number, got 'many'"),
        ({"count": True}, "count: expected a whole number, got True"),
        ({"ratio": "half"}, "ratio: expected a number, got 'half'"),
        ({"on": "maybe"}, "on: expected true or false, got 'maybe'"),
        ({"mode": "c"}, "mode must be one of a, b, not 'c'"),
        ({"cont": "1"}, "this command has no option 'cont'; did you mean 'count'? its options: count, ratio"),
    ],
)
def test_bad_values_and_names_say_what_to_do(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build(Sample, values)
    assert message in str(caught.value)


def test_field_docstrings_are_the_help() -> None:
    assert field_docs(Sample)["path"] == "Where; none when not given."
    kinds = {s.name: (s.kind, s.default) for s in settings(Sample)}
    assert (
        kinds["mode"] == ("a|b", "a")
        and kinds["path"] == ("path or none", None)
        and kinds["items"][0] == "list or none"
    )
    assert all(s.help for s in settings(RunConfig))


def test_set_items() -> None:
    assert parse_sets(["burst-mib=64", "agent=a=b", "x="]) == {"burst_mib": "64", "agent": "a=b", "x": ""}
    with pytest.raises(ConfigError, match="--set takes KEY=VALUE"):
        parse_sets(["=1"])
    assert parse_value("none", int | None, "k") is None


def test_run_config_validates_every_flag() -> None:
    assert build(RunConfig, {}) == RunConfig()
    for values, message in [
        ({"accel": "hvf"}, "--accel must be one of auto, kvm, tcg"),
        ({"boot_mode": "warm"}, "--boot-mode must be one of snapshot, cold"),
        ({"backend": "nope"}, "unknown backend 'nope'"),
        ({"boot_timeout_s": "0"}, "--boot-timeout must be positive"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build(RunConfig, values)


def test_scenarios_declare_what_their_sandboxes_need() -> None:
    """The runner applies a scenario's needs to the run settings before it creates the backend."""
    payments = prepare_scenario("payments-service", {})
    assert payments.config.mem_mib == 384 and payments.config.boot_mode == "snapshot"
    assert prepare_scenario("payments-service", {"mem_mib": 512}).config.mem_mib == 512
    assert prepare_scenario("payments-service", {"kube_context": "ctx"}).config.boot_mode == "cold"
    assert prepare_scenario("ram-pressure", {"mem_mib": "128"}).config.mem_mib == 256
    assert prepare_scenario("ram-pressure", {"reclaim": "off"}).config.mem_mib == 128
    retry = prepare_scenario("retry-403", {"scale": "4", "accel": "tcg"})
    assert (retry.options.scale, retry.config.accel, retry.config.mem_mib) == (4, "tcg", 128)
    assert retry.config_record()["scale"] == 4


def test_bench_settings_layer_flags_over_invoke_config_over_defaults() -> None:
    assert bench_config({}, {"proxy": True}) == BenchConfig()
    configured = {"sandboxes": 8, "duration": "7.5", "targets": "gateway,squid", "proxy": None}
    got = bench_config(configured, {"sandboxes": "2", "proxy": True})
    assert got.sandboxes == 2 and got.proxy == ProxyBenchConfig(duration_s=7.5, targets=["gateway", "squid"])
    assert bench_config({"proxy": "false"}, {"proxy": True}).proxy is None
    assert bench_config({}, {"proxy": False, "users": None}).proxy is None


def readme_flag_defaults() -> dict[str, str]:
    """`--flag` -> the default README's `invoke bench` tables state for it."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## `invoke bench`") : text.index("### Flags from invoke.yaml")]
    stated: dict[str, str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| `--") and len(cells) >= 2:
            flags = re.findall(r"`(--[a-z-]+)", cells[0])
            defaults = cells[1].split(", ") if len(flags) > 1 else [cells[1]]
            stated.update(zip(flags, defaults, strict=True))
    return stated


def test_readme_states_the_codes_defaults() -> None:
    """README's tables mirror the dataclasses, which state each default once; this keeps the mirror true."""
    code = {s.name: s.default for s in settings(BenchConfig)}
    proxy = {s.name: s.default for s in settings(ProxyBenchConfig)}
    images = "the image's: " + ", ".join(f"{k.default_mem_mib} ({k.name})" for k in IMAGES.values())
    words = {"cores": os.cpu_count(), "all": proxy["targets"], "results/&lt;run-id&gt;": None, "": None, images: None}
    stated = readme_flag_defaults()
    checked = 0
    for flag, text in stated.items():
        name = flag[2:].replace("-", "_")
        if name in BENCH_FLAGS and name not in ("proxy", "force"):
            default = code[BENCH_FLAGS[name]]
        elif name in PROXY_FLAGS:
            default = proxy[PROXY_FLAGS[name]]
        else:
            continue  # --no-proxy, --force: switches, not values
        expected = words[text] if text in words else text.split(",") if isinstance(default, list) else text
        if isinstance(default, (int, float)) and not isinstance(expected, list) and expected is not None:
            assert float(expected) == default, (flag, text, default)
        else:
            assert expected == default, (flag, text, default)
        checked += 1
    assert checked >= 18, stated
