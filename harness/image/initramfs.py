"""The guest image: Debian kernel + a busybox initramfs with the virtio modules and the guest agent.

The debian image boots the same way, with three more modules (virtio_blk, squashfs, overlay) and an init
that, after the same set-up, switches to the Debian root on the virtio disk (harness.image.debian)."""

from __future__ import annotations

import gzip
import hashlib
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import EnvironmentMissing
from harness.image.catalog import DEBIAN, image_kind
from harness.image.debian import build_debian
from harness.image.files import guest_file
from harness.image.kernel import Kernel, fetch_kernel
from harness.image.modules import Module, load_order, read_module_bytes
from harness.scratch import scratch_dir
from harness.supervisor import run_tool

BUSYBOX_PATH = Path("/bin/busybox")
"""Debian's busybox-static; a dynamically linked busybox would need its libraries in the guest."""

GUEST_MODULES = ["virtio_mmio", "virtio_net", "virtio_balloon"]
"""Roots of the module set; their dependencies are resolved from modinfo."""

ROOT_DISK_MODULES = ["virtio_blk", "squashfs", "overlay"]
"""What the debian image's initramfs adds to mount its root: the disk, its filesystem, the writable overlay."""

GUEST_FILES = {
    "init": ("init", 0o755),
    "inittab": ("etc/inittab", 0o644),
    "rcS": ("etc/rcS", 0o755),
    "br-agent": ("sbin/br-agent", 0o755),
    "profile": ("etc/profile", 0o644),
    "hosts": ("etc/hosts", 0o644),
}
"""Files shipped in harness/image/guest/ and where they go in the guest."""

DEBIAN_INIT = "init-debian"
"""The debian image's /init in place of busybox's."""

IMAGE_FORMAT = 2
"""Bumped when the layout changes in a way the content hash would not see."""


@dataclass(frozen=True)
class GuestImage:
    """Everything QEMU needs to boot a guest, content-addressed."""

    kernel: Path
    """bzImage passed with -kernel."""
    initrd: Path
    """gzip'd newc cpio passed with -initrd."""
    kernel_release: str
    """Release string of the guest kernel."""
    modules: tuple[str, ...]
    """Module load order baked into the initramfs."""
    digest: str
    """sha256 over every input; names the cached initramfs."""
    name: str = "busybox"
    """The guest image (harness.image.catalog)."""
    disk: Path | None = None
    """The read-only root disk (virtio-blk), for an image whose userland is not in the initramfs."""
    build: Mapping[str, object] = field(default_factory=dict)
    """How the image's root was built (the debian image's build.json), for the record."""


def busybox_binary() -> Path:
    if not BUSYBOX_PATH.exists():
        raise EnvironmentMissing(f"{BUSYBOX_PATH} not found; run `apt-get install busybox-static`")
    # A dynamic executable names its loader (PT_INTERP) near the start of the file.
    if b"/ld-linux" in BUSYBOX_PATH.read_bytes()[:4096]:
        raise EnvironmentMissing(f"{BUSYBOX_PATH} is dynamically linked; run `apt-get install busybox-static`")
    return BUSYBOX_PATH


def image_digest(kernel: Kernel, modules: list[Module], busybox: Path, root: str = "") -> str:
    digest = hashlib.sha256(f"format={IMAGE_FORMAT};release={kernel.release};root={root}".encode())
    digest.update(hashlib.sha256(kernel.bzimage.read_bytes()).digest())
    digest.update(hashlib.sha256(busybox.read_bytes()).digest())
    for module in modules:
        digest.update(module.name.encode() + hashlib.sha256(module.path.read_bytes()).digest())
    for name in sorted(GUEST_FILES):
        digest.update(name.encode() + guest_file(name))
    if root:
        digest.update(guest_file(DEBIAN_INIT))
    return digest.hexdigest()


def _stage(root: Path, modules: list[Module], busybox: Path, init: str) -> None:
    for directory in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "run", "root", "work", "lib/modules"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    applets = run_tool([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", root / "bin" / applet)
    for name, (target, mode) in GUEST_FILES.items():
        path = root / target
        path.write_bytes(guest_file(init if name == "init" else name))
        path.chmod(mode)
    for module in modules:
        # Stored uncompressed: busybox insmod cannot read .ko.xz.
        (root / "lib" / "modules" / f"{module.name}.ko").write_bytes(read_module_bytes(module.path))
    (root / "etc" / "modules.order").write_text("\n".join(m.name for m in modules) + "\n")


def _pack(root: Path, dest: Path) -> None:
    if shutil.which("cpio") is None:
        raise EnvironmentMissing("cpio not found; run `apt-get install cpio`")
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = run_tool(
        ["cpio", "--create", "--format=newc", "--owner=0:0", "--quiet", "--reproducible"],
        cwd=root,
        input="\n".join(names).encode(),
        capture_output=True,
        check=True,
    ).stdout
    # A name of this writer's own: two runs that build the same image at once each rename a whole file.
    partial = dest.with_name(f"{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    with gzip.GzipFile(partial, "wb", compresslevel=6, mtime=0) as out:
        out.write(archive)
    partial.replace(dest)


def build_image(cache: Path, image: str = "busybox") -> GuestImage:
    """Fetch the kernel and build (or reuse from the cache) the initramfs, and for debian its root disk."""
    kernel = fetch_kernel(cache)
    busybox = busybox_binary()
    root = build_debian(cache) if image_kind(image) is DEBIAN else None
    wanted = GUEST_MODULES + (ROOT_DISK_MODULES if root else [])
    modules = load_order(wanted, kernel.modules_dir)
    digest = image_digest(kernel, modules, busybox, root.digest if root else "")
    initrd = cache / "initramfs" / f"{digest[:16]}.cpio.gz"
    if not initrd.exists():
        initrd.parent.mkdir(parents=True, exist_ok=True)
        with scratch_dir("br-initramfs-") as staging:
            _stage(Path(staging), modules, busybox, DEBIAN_INIT if root else "init")
            _pack(Path(staging), initrd)
    return GuestImage(
        kernel=kernel.bzimage,
        initrd=initrd,
        kernel_release=kernel.release,
        modules=tuple(m.name for m in modules),
        digest=digest,
        name=image,
        disk=root.disk if root else None,
        build=root.build if root else {},
    )
