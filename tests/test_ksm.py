"""KSM is switched on for a run that asks for it and put back however the run ends."""

from __future__ import annotations

import os

import pytest

from harness.ksm import KSM_DIR, PAGES_TO_SCAN, ksm_switched_on

pytestmark = pytest.mark.skipif(
    not os.access(KSM_DIR / "run", os.W_OK), reason="needs a writable /sys/kernel/mm/ksm (root, CONFIG_KSM)"
)


def state() -> tuple[str, str]:
    return (KSM_DIR / "run").read_text().strip(), (KSM_DIR / "pages_to_scan").read_text().strip()


def test_ksm_is_on_inside_and_put_back_after_an_error() -> None:
    before = state()
    with pytest.raises(RuntimeError, match="mid-run"), ksm_switched_on(True) as info:
        assert state() == ("1", str(PAGES_TO_SCAN)) and info is not None and info["run_before"] == before[0]
        raise RuntimeError("mid-run")
    assert state() == before


def test_ksm_is_left_alone_when_not_asked_for() -> None:
    before = state()
    with ksm_switched_on(False) as info:
        assert info is None and state() == before
