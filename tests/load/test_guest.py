"""sample_in_guest: the busybox-only script, run by real busybox through the real gateway.

Here the "guest" is the host backend (the same busybox-static the guest image ships, first on its
PATH), talking to a real gateway listener on loopback; QEMU-booted guests use the same code through
Sandbox.exec (see tests marked qemu)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness.image import GuestImage
from harness.load.guest import parse, request_bytes, sample_in_guest
from harness.load.targets import GATEWAY, Upstream, start_target
from harness.paths import cache_dir
from harness.sandbox import BackendOptions, SandboxSpec, create_backend
from harness.sandbox.qemu.vm import Microvm
from harness.supervisor import Supervisor

BUSYBOX = shutil.which("busybox")


@pytest.mark.skipif(BUSYBOX is None, reason="busybox-static is installed by install.sh")
def test_sample_in_guest_through_gateway(
    upstream: Upstream, load_supervisor: Supervisor, tmp_path: Path, gateway_ca_dir: Path
) -> None:
    endpoint = start_target(
        GATEWAY,
        tmp_path / "gw",
        load_supervisor,
        upstream,
        ("download", "blocked"),
        download_bytes=2048,
        stream_bytes=0,
        gateway_ca_dir=gateway_ca_dir,
    )
    try:
        proxy = f"127.0.0.1:{endpoint.proxy[1]}"
        # The host backend: busybox applets first on PATH, as in a guest; its egress is the gateway's port.
        backend = create_backend("host", BackendOptions(cache=cache_dir()))
        shell = backend.boot(
            SandboxSpec(id="busybox", workdir=tmp_path / "sb", gateway_port=endpoint.proxy[1]), load_supervisor
        )
        ok = sample_in_guest(shell, endpoint.urls["download"], n=4)
        denied = sample_in_guest(shell, endpoint.urls["blocked"], n=3, proxy=proxy)
        refused = sample_in_guest(shell, endpoint.urls["blocked"], n=2, proxy=proxy)
        shell.stop()
    finally:
        endpoint.stop()
    assert (ok["n"], ok["ok"], ok["failures"], ok["statuses"]) == (4, 4, {}, {"200": 4})
    assert 0 < ok["latency_ms"]["p50"] <= ok["raw_latency_ms"]["p50"]
    assert ok["clock_overhead_ms"] > 0 and ok["proxy"] == proxy and "busybox nc" in ok["note"]
    assert denied["failures"] == {"http_403": 3} and denied["ok"] == 0  # a 403 is not what a download expects
    assert refused["statuses"] == {"403": 2}


def test_parse_and_request_shape() -> None:
    assert request_bytes("http://h:8080/x?y=1").startswith(b"GET http://h:8080/x?y=1 HTTP/1.1\r\nHost: h:8080\r\n")
    with pytest.raises(ValueError):
        request_bytes("https://h/")
    out = "C 10 0 10 500\nC 10 0 10 700\nR 10 0 10 5000 0 200 99\nR 11 0 11 1 1 none 0\nR 12 0 12 2000 0 502 10\n"
    figures = parse(out, (200,))
    assert figures["clock_overhead_ms"] == 0.6
    assert figures["n"] == 3 and figures["ok"] == 1
    assert figures["failures"] == {"nc_rc_1": 1, "http_502": 1}
    assert figures["latency_ms"]["p50"] == pytest.approx(4.4)
    assert figures["clock"] is None and parse("K file-mtime\n" + out, (200,))["clock"] == "file-mtime"


@pytest.mark.qemu
@pytest.mark.slow
def test_sample_in_real_guest(
    image: GuestImage, upstream: Upstream, load_supervisor: Supervisor, tmp_path: Path, gateway_ca_dir: Path
) -> None:
    endpoint = start_target(
        GATEWAY,
        tmp_path / "gw",
        load_supervisor,
        upstream,
        ("download",),
        download_bytes=2048,
        stream_bytes=0,
        gateway_ca_dir=gateway_ca_dir,
    )
    vm = Microvm(
        SandboxSpec(id="load-guest", workdir=tmp_path / "vm", gateway_port=endpoint.proxy[1]),
        image,
        load_supervisor,
        "tcg",
    )
    try:
        vm.spawn()
        vm.wait_ready()
        figures = sample_in_guest(vm, endpoint.urls["download"], n=3)
    finally:
        vm.stop()
        endpoint.stop()
    assert (figures["ok"], figures["failures"]) == (3, {}), figures
    assert figures["proxy"] == "10.0.2.100:3128" and figures["latency_ms"]["p50"] > 0
