"""The debian guest image: a minimal Debian 12 userland built with debootstrap, the model SDKs from PyPI,
and the guest agent, as a rootfs directory (for the jails) and a read-only squashfs of it (for QEMU).

Everything is installed at build time, nothing at run time. The result is cached by a digest of its recipe
(suite, packages, pinned SDKs, the guest files); the mirror's own content is recorded, not hashed, in
build.json beside it (every package's version), so two builds of one recipe can be told apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.errors import EnvironmentMissing
from harness.image.files import guest_file
from harness.image.kernel import network_proxies
from harness.paths import cached_dir
from harness.supervisor import pid_alive, run_tool

DEBIAN_FORMAT = 1
"""Bumped when the layout changes in a way the recipe digest would not see."""

SUITE = "bookworm"
"""Debian 12, the release the hosts run."""

FALLBACK_MIRROR = "http://deb.debian.org/debian"
"""Used when the host's apt sources name no plain Debian mirror."""

PACKAGES = (
    "bash",
    "coreutils",
    "util-linux",
    "procps",
    "iproute2",
    "kmod",
    "socat",
    "ca-certificates",
    "curl",
    "wget",
    "dnsutils",
    "git",
    "python3",
    "python3-pip",
    "python3-requests",
    "busybox",
)
"""On top of debootstrap's minbase: what an agent runs, socat for the agent's listener and a jail's relay, and
busybox for its `nc`, which the isolation scenario's busybox probes speak on every image."""

BUSYBOX_LINKS = ("nc",)
"""Applets linked into /usr/local/bin: Debian's busybox package installs none, and minbase has no nc."""

PYPI_PACKAGES = ("anthropic==2.16.0", "openai==3.57.0")
"""The model SDKs, pinned; installed as wheels for the image's own Python."""

SITE_PACKAGES = "usr/local/lib/python3/dist-packages"
"""Where Debian's python3 looks for locally installed packages (the 3 is replaced by the image's X.Y)."""

STRIPPED = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/cache/apt",
    "var/lib/apt/lists",
)
"""Left out of the image: documentation, translations and apt's caches (nothing is installed at run time)."""

IMAGE_CA_BUNDLE = "usr/share/br/image-ca-certificates.crt"
"""A copy of the image's own CA bundle: a jail mounts a private tmpfs over /etc/ssl/certs and seeds it from here."""

GUEST_FILES = {
    "br-agent": ("sbin/br-agent", 0o755),
    "br-jail-init": ("sbin/br-jail-init", 0o755),
    "br-init": ("sbin/br-init", 0o755),
    "profile-debian": ("etc/profile", 0o644),
    "hosts": ("etc/hosts", 0o644),
}
"""Files shipped in harness/image/guest/ and where they go in the Debian root."""

MOUNT_POINTS = ("proc", "dev", "sys", "tmp", "run/br", "work", "root", "etc/ssl/certs")
"""Directories QEMU's init and the jails mount over."""

SQUASHFS_OPTIONS = ("-comp", "zstd", "-noappend", "-no-progress", "-quiet", "-all-root")
"""zstd: about a third of the rootfs on disk; the guest reads only the blocks it uses."""

JAIL_EGRESS = "127.0.0.1:3128"
"""The proxy address a jail's relay listens on (harness.sandbox.jail.JAIL_EGRESS); QEMU's init rewrites it."""

DEBOOTSTRAP_TIMEOUT_S = 1200
PIP_TIMEOUT_S = 600
SQUASHFS_TIMEOUT_S = 600


@dataclass(frozen=True)
class DebianImage:
    """A built debian image in the cache."""

    rootfs: Path
    """The unpacked root (read-only for every jail that uses it)."""
    disk: Path
    """The same root as a squashfs, QEMU's virtio-blk disk."""
    digest: str
    """sha256 of the recipe; names the cache entry."""
    build: dict[str, object]
    """build.json: build seconds, sizes, package versions."""


def host_mirror(sources: tuple[Path, ...] = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))) -> str:
    """The Debian mirror the host's apt uses (so a local mirror or proxy is honoured), else Debian's own."""
    texts: list[str] = []
    for source in sources:
        files = sorted(source.glob("*")) if source.is_dir() else [source]
        for path in files:
            try:
                texts.append(path.read_text())
            except OSError:
                continue
    for text in texts:
        for uri in re.findall(r"(?:^deb\s+(?:\[[^]]*\]\s+)?|^URIs:\s*)(https?://\S+)", text, re.M):
            if "security" not in uri and "debian" in uri:
                return uri.rstrip("/")
    return FALLBACK_MIRROR


def recipe_digest() -> str:
    digest = hashlib.sha256(f"format={DEBIAN_FORMAT};suite={SUITE};egress={JAIL_EGRESS}".encode())
    digest.update(";".join(PACKAGES).encode() + b"|" + ";".join(PYPI_PACKAGES).encode())
    digest.update(";".join(BUSYBOX_LINKS).encode())
    for name in sorted(GUEST_FILES):
        digest.update(name.encode() + guest_file(name))
    return digest.hexdigest()


SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""Where debootstrap, chroot and mksquashfs live, whatever PATH the harness was started with."""


def _require(binary: str, package: str) -> str:
    path = shutil.which(binary, path=f"{os.environ.get('PATH', '')}:{SYSTEM_PATH}")
    if path is None:
        raise EnvironmentMissing(f"{binary} not found; run `apt-get install {package}` (the debian image needs it)")
    return path


def _fail(step: str, output: str, hint: str) -> EnvironmentMissing:
    """One line: the step, the tool's own last error line, and the fix."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("E:", "ERROR", "W: Failure", "Couldn't"))]
    detail = (errors or lines or ["no output"])[-1]
    return EnvironmentMissing(f"building the debian image failed at {step}: {detail}; {hint}")


def _debootstrap(root: Path) -> None:
    debootstrap = _require("debootstrap", "debootstrap")
    if os.geteuid() != 0:
        raise EnvironmentMissing("building the debian image needs root (debootstrap installs into a chroot)")
    mirror = host_mirror()
    argv = [debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root), mirror]
    proc = run_tool(
        argv,
        env={"PATH": SYSTEM_PATH, **network_proxies()},
        capture_output=True,
        text=True,
        timeout=DEBOOTSTRAP_TIMEOUT_S,
    )
    if proc.returncode != 0:
        log = root / "debootstrap" / "debootstrap.log"
        output = proc.stdout + proc.stderr + (log.read_text(errors="replace") if log.exists() else "")
        raise _fail(f"debootstrap from {mirror}", output, "check the apt sources and the package names")


def image_python(root: Path) -> str:
    """X.Y of the image's python3 (its site-packages and its wheels' tags depend on it)."""
    for path in sorted((root / "usr" / "bin").glob("python3.*")):
        match = re.fullmatch(r"python(3\.\d+)", path.name)
        if match:
            return match.group(1)
    raise EnvironmentMissing("the debian image has no usr/bin/python3.X; is python3 in PACKAGES?")


def _install_sdks(root: Path) -> None:
    """The SDK wheels for the image's own Python, installed by the host's pip; compiled by the image's Python,
    because a read-only root cannot cache bytecode at import time."""
    version = image_python(root)
    target = root / SITE_PACKAGES.replace("python3", f"python{version}")
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]
    argv += ["--only-binary=:all:", "--python-version", version, "--implementation", "cp"]
    argv += ["--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64"]
    argv += ["--platform", "manylinux_2_34_x86_64", "--platform", "linux_x86_64"]
    argv += ["--target", str(target), *PYPI_PACKAGES]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    env.update(network_proxies())
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})
    proc = run_tool(argv, env=env, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if proc.returncode != 0:
        raise _fail(f"pip install {' '.join(PYPI_PACKAGES)}", proc.stderr + proc.stdout, "check PyPI access")
    # Console scripts carry the host interpreter's path; nothing in the guest needs them.
    shutil.rmtree(target / "bin", ignore_errors=True)
    compiled = run_tool(
        [
            _require("chroot", "coreutils"),
            str(root),
            "/usr/bin/python3",
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "/" + str(target.relative_to(root)),
        ],
        env={"PATH": SYSTEM_PATH},
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT_S,
    )
    if compiled.returncode != 0:
        raise _fail("compiling the SDKs", compiled.stdout + compiled.stderr, "see the output above")


def _add_guest_files(root: Path) -> None:
    for directory in MOUNT_POINTS:
        (root / directory).mkdir(parents=True, exist_ok=True)
    bundle = root / "etc" / "ssl" / "certs" / "ca-certificates.crt"
    (root / IMAGE_CA_BUNDLE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle, root / IMAGE_CA_BUNDLE)
    for name, (target, mode) in GUEST_FILES.items():
        path = root / target
        path.unlink(missing_ok=True)
        path.write_bytes(guest_file(name))
        path.chmod(mode)
    for applet in BUSYBOX_LINKS:
        os.symlink("/bin/busybox", root / "usr" / "local" / "bin" / applet)
    (root / "etc" / "br-egress").write_text(f"{JAIL_EGRESS}\n")
    (root / "etc" / "resolv.conf").unlink(missing_ok=True)
    (root / "etc" / "resolv.conf").write_text("# no resolver: the sandbox's only way out is its proxy\n")
    (root / "etc" / "hostname").write_text("sandbox\n")


def _strip(root: Path) -> None:
    for relative in STRIPPED:
        path = root / relative
        if path.is_dir():
            shutil.rmtree(path)
            path.mkdir()
    shutil.rmtree(root / "debootstrap", ignore_errors=True)


def _package_versions(root: Path) -> dict[str, str]:
    status = (root / "var" / "lib" / "dpkg" / "status").read_text(errors="replace")
    versions: dict[str, str] = {}
    for stanza in status.split("\n\n"):
        name = re.search(r"^Package: (\S+)", stanza, re.M)
        version = re.search(r"^Version: (\S+)", stanza, re.M)
        if name and version and "install ok installed" in stanza:
            versions[name.group(1)] = version.group(1)
    return versions


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                total += os.lstat(path).st_size
    return total


def unmount_within(root: Path) -> None:
    """Detach whatever an interrupted debootstrap left mounted in its chroot (proc, sys, a /dev bind), deepest
    first, so that removing the half-built tree can never reach into the host's /proc or /dev."""
    prefix = str(root.resolve()) + "/"
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    points = [line.split()[1].replace("\\040", " ") for line in mounts if len(line.split()) > 1]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        run_tool([_require("umount", "mount"), "-l", point], capture_output=True, timeout=30)


def _fill(entry: Path) -> None:
    try:
        _build(entry)
    except BaseException:
        unmount_within(entry)
        raise


def _build(entry: Path) -> None:
    started = time.monotonic()
    root = entry / "rootfs"
    _debootstrap(root)
    bootstrapped = time.monotonic()
    _install_sdks(root)
    _add_guest_files(root)
    _strip(root)
    mksquashfs = _require("mksquashfs", "squashfs-tools")
    disk = entry / "rootfs.squashfs"
    proc = run_tool(
        [mksquashfs, str(root), str(disk), *SQUASHFS_OPTIONS],
        capture_output=True,
        text=True,
        timeout=SQUASHFS_TIMEOUT_S,
    )
    if proc.returncode != 0:
        raise _fail("mksquashfs", proc.stderr + proc.stdout, "check free space in the cache")
    finished = time.monotonic()
    build = {
        "suite": SUITE,
        "mirror": host_mirror(),
        "packages": list(PACKAGES),
        "pypi": list(PYPI_PACKAGES),
        "python": image_python(root),
        "build_s": round(finished - started, 1),
        "debootstrap_s": round(bootstrapped - started, 1),
        "rootfs_bytes": tree_bytes(root),
        "disk_bytes": disk.stat().st_size,
        "package_versions": _package_versions(root),
    }
    (entry / "build.json").write_text(json.dumps(build, indent=1) + "\n")


def sweep_partial_builds(cache: Path) -> list[str]:
    """For `invoke clean`: the staging directories of builds whose process was killed outright (an error or an
    interrupt removes its own), unmounted first; a line per directory removed."""
    removed = []
    for staging in sorted((cache / "images").glob("*.partial")):
        pid = staging.name.rsplit(".", 2)[-2]
        if pid.isdigit() and pid_alive(int(pid)):
            continue  # a build in progress
        unmount_within(staging)
        shutil.rmtree(staging, ignore_errors=True)
        removed.append(f"removed the half-built image {staging}")
    return removed


def build_debian(cache: Path) -> DebianImage:
    """Build the debian image once per recipe (debootstrap, SDKs, guest files, squashfs) and return it.

    A build that fails leaves no cache entry behind; the error names the step and the tool's own message."""
    digest = recipe_digest()
    entry = cached_dir(cache / "images" / f"debian-{digest[:16]}", _fill)
    return DebianImage(
        rootfs=entry / "rootfs",
        disk=entry / "rootfs.squashfs",
        digest=digest,
        build=json.loads((entry / "build.json").read_text()),
    )
