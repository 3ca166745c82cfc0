"""The files shipped in harness/image/guest/: inits, the guest agent, profiles."""

from importlib import resources


def guest_file(name: str) -> bytes:
    return resources.files("harness.image").joinpath("guest", name).read_bytes()
