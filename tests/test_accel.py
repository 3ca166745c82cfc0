"""Accelerator decision: a canary that hangs is detected within its timeout; verdicts are cached."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from harness.errors import ConfigError, EnvironmentMissing
from harness.image import GuestImage
from harness.sandbox.qemu import accel
from harness.sandbox.qemu.accel import canary_boots, decide_accel, kvm_device_problem


def test_missing_device_is_named(tmp_path: Path) -> None:
    assert "does not exist" in (kvm_device_problem(tmp_path / "kvm") or "")


def test_bad_accel_value_is_a_config_error(image: GuestImage, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="auto, kvm, tcg"):
        decide_accel("hvf", image, tmp_path / "cache.json")


def test_tcg_request_needs_no_canary(image: GuestImage, tmp_path: Path) -> None:
    verdict = decide_accel("tcg", image, tmp_path / "cache.json")
    assert verdict.accel == "tcg" and not (tmp_path / "cache.json").exists()


def test_kvm_without_device_falls_back_or_errors(
    image: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accel, "kvm_device_problem", lambda: "/dev/kvm does not exist")
    assert decide_accel("auto", image, tmp_path / "c.json").accel == "tcg"
    with pytest.raises(EnvironmentMissing, match="--accel tcg"):
        decide_accel("kvm", image, tmp_path / "c.json")


@pytest.mark.qemu
def test_hanging_canary_is_unusable_within_its_timeout(image: GuestImage) -> None:
    started = time.monotonic()
    booted, reason, _ = canary_boots(image, "tcg", timeout_s=3, extra_args=("-S",))
    assert not booted and "within 3 s" in reason
    assert time.monotonic() - started < 8


@pytest.mark.qemu
def test_auto_decides_from_a_real_canary_and_caches(image: GuestImage, tmp_path: Path) -> None:
    cache = tmp_path / "verdicts.json"
    first = decide_accel("auto", image, cache, timeout_s=10)
    assert first.accel in ("kvm", "tcg") and not first.cached
    if first.accel == "tcg" and kvm_device_problem() is None:
        assert "canary" in first.reason  # /dev/kvm opens but a guest did not boot: this workplace's KVM
    if kvm_device_problem() is None:
        assert json.loads(cache.read_text())
        second = decide_accel("auto", image, cache)
        assert second.cached and second.accel == first.accel


@pytest.mark.qemu
@pytest.mark.skipif(kvm_device_problem() is not None, reason="the cache is only read where /dev/kvm opens")
def test_a_cache_that_does_not_parse_is_a_miss(image: GuestImage, tmp_path: Path) -> None:
    cache = tmp_path / "verdicts.json"
    for damaged in ("{not json", '["a list"]', json.dumps({accel._cache_key(image): {"accel": "kvm", "bogus": 1}})):
        cache.write_text(damaged)
        verdict = decide_accel("auto", image, cache, timeout_s=5)  # a real canary boot under KVM
        assert not verdict.cached and accel._cached_verdict(json.loads(cache.read_text())[accel._cache_key(image)])
    if verdict.accel == "tcg":  # KVM is broken here, as on our machines: the refusal names why, once
        with pytest.raises(EnvironmentMissing) as refused:
            decide_accel("kvm", image, cache)
        assert "using TCG" not in str(refused.value) and verdict.kvm_problem in str(refused.value)
