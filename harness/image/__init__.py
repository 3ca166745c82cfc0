"""Guest image: Debian kernel, module resolution, busybox initramfs with the guest agent."""

from harness.image.initramfs import GuestImage, build_image

__all__ = ["GuestImage", "build_image"]
