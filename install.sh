#!/usr/bin/env bash
# Installs blastradius on Debian 12: system packages, a venv with the pinned Python deps, and the
# guest image (Debian cloud kernel + busybox initramfs). Safe to run again; each step is idempotent.
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

SYSTEM_PACKAGES=(
    qemu-system-x86   # the VMM of the embedded default (microvm machine type)
    busybox-static    # guest userland
    cpio              # packs the initramfs
    socat             # relays each guest connection to its gateway listener (and a jail's, inside and out)
    bubblewrap        # the bwrap backend (and the command backend's bubblewrap example)
    runsc             # the gvisor backend: gVisor's runtime
    python3 python3-venv python3-pip
    ca-certificates
    squid             # peer proxy the gateway is benchmarked against (our own instance per run)
    tinyproxy         # peer proxy, likewise
    nginx-light       # the proxy bench's upstream (our own instance per run, loopback only)
    hey               # the proxy bench's capacity generator (Go; -x proxies, CONNECT for https)
    debootstrap       # builds the debian guest image (--image debian), only when asked
    squashfs-tools    # packs the debian image's read-only root disk
)

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${SYSTEM_PACKAGES[@]}"

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

# Fetch the guest kernel with apt and build the initramfs now, so the first bench measures boots, not downloads.
.venv/bin/invoke image

# mitmproxy, the third peer proxy, in a venv of its own: its pins (h11, cryptography) clash with ours, and
# 11.0.2 is the last release for Python 3.11 (harness/load/peers.py looks for /opt/mitmproxy-venv/bin/mitmdump).
MITMPROXY_VERSION=11.0.2
MITMPROXY_VENV=/opt/mitmproxy-venv
if ! "$MITMPROXY_VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('mitmproxy') != '$MITMPROXY_VERSION')" 2>/dev/null; then
    $SUDO python3 -m venv "$MITMPROXY_VENV"
    $SUDO "$MITMPROXY_VENV/bin/pip" install -q --disable-pip-version-check "mitmproxy==$MITMPROXY_VERSION"
fi
