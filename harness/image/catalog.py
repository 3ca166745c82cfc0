"""The guest images a run can ask for (--image), and what each one implies for the sandbox's TLS."""

from __future__ import annotations

from dataclasses import dataclass

from harness.errors import ConfigError


@dataclass(frozen=True)
class ImageKind:
    """One named guest userland."""

    name: str
    """What --image takes."""
    tls_profile: str
    """The gateway's guest-facing TLS profile for sandboxes of this image (harness.gateway.tls)."""
    summary: str
    """What is in it, for help texts and the report."""
    default_mem_mib: int
    """Guest RAM when --mem-mib is not given: what its clients need without thrashing."""


BUSYBOX = ImageKind(
    name="busybox",
    tls_profile="sha1-compat",
    summary="busybox-static in an initramfs (~1 MB): sh, nc, nslookup; its ssl_client sends no "
    "signature_algorithms, so its gateway listener keeps SHA-1 handshake signatures",
    default_mem_mib=128,
)
DEBIAN = ImageKind(
    name="debian",
    tls_profile="strict",
    summary="a minimal Debian 12 userland: bash, coreutils, curl, GNU wget, dig, git, python3 with pip and "
    "requests, and the anthropic and openai SDKs; strict TLS (no SHA-1, TLS 1.2+ AEAD)",
    default_mem_mib=512,
)

IMAGES: dict[str, ImageKind] = {kind.name: kind for kind in (BUSYBOX, DEBIAN)}
"""Every image by name; busybox is the small default."""

DEFAULT_IMAGE = BUSYBOX.name


def image_kind(name: str) -> ImageKind:
    """The image called name, or one line naming the valid ones."""
    try:
        return IMAGES[name]
    except KeyError:
        raise ConfigError(f"--image {name!r}: no such guest image; use one of {', '.join(IMAGES)}") from None
