"""Guest image: module order from modinfo metadata, initramfs contents, content-hash caching."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest

from harness.errors import EnvironmentMissing
from harness.image import GuestImage, build_image
from harness.image.modules import load_order, modinfo_field
from harness.paths import cache_dir


def fake_module(directory: Path, name: str, depends: str) -> None:
    """A file shaped like a .ko's .modinfo section: NUL-separated key=value strings."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.ko").write_bytes(
        b"\x7fELF junk\0license=GPL\0depends=" + depends.encode() + b"\0name=" + name.encode() + b"\0vermagic=6.1\0"
    )


def test_order_follows_depends_fields(tmp_path: Path) -> None:
    fake_module(tmp_path / "a", "top", "mid-one,leaf")
    fake_module(tmp_path / "b", "mid_one", "leaf")
    fake_module(tmp_path / "c", "leaf", "")
    order = [m.name for m in load_order(["top"], tmp_path)]
    assert order == ["leaf", "mid_one", "top"]


def test_missing_module_and_cycle_are_clear_errors(tmp_path: Path) -> None:
    fake_module(tmp_path, "x", "y")
    fake_module(tmp_path, "y", "x")
    with pytest.raises(EnvironmentMissing, match="cycle"):
        load_order(["x"], tmp_path)
    with pytest.raises(EnvironmentMissing, match="not found"):
        load_order(["absent"], tmp_path)


def test_real_kernel_virtio_order(image: GuestImage) -> None:
    order = list(image.modules)
    for before, after in [
        ("virtio_ring", "virtio"),
        ("virtio", "virtio_mmio"),
        ("failover", "net_failover"),
        ("net_failover", "virtio_net"),
        ("virtio_ring", "virtio_net"),
    ]:
        assert order.index(before) < order.index(after), order


def test_real_module_metadata_is_read_not_hardcoded(image: GuestImage) -> None:
    modules_dir = next(image.kernel.parent.parent.glob("lib/modules/*"))
    virtio_net = next(modules_dir.rglob("virtio_net.ko*"))
    depends = modinfo_field(virtio_net.read_bytes(), "depends")
    assert depends is not None and "net_failover" in depends.split(",")


def test_initramfs_holds_agent_init_and_modules(image: GuestImage, tmp_path: Path) -> None:
    archive = gzip.decompress(image.initrd.read_bytes())
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=archive, capture_output=True, check=True).stdout.decode()
    names = set(listing.split())
    assert {"init", "sbin/br-agent", "etc/inittab", "etc/rcS", "bin/busybox", "etc/modules.order"} <= names
    assert {f"lib/modules/{m}.ko" for m in image.modules} <= names
    assert len(image.initrd.read_bytes()) < 4 * 1024 * 1024, "initramfs grew past 4 MiB"


def test_image_is_cached_by_content(image: GuestImage) -> None:
    mtime = image.initrd.stat().st_mtime_ns
    again = build_image(cache_dir())
    assert again.initrd == image.initrd and again.digest == image.digest
    assert again.initrd.stat().st_mtime_ns == mtime


def test_image_holds_no_host_secret(image: GuestImage) -> None:
    from tests.conftest import HOST_SECRET

    assert HOST_SECRET.encode() not in gzip.decompress(image.initrd.read_bytes())
