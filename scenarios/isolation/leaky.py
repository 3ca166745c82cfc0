"""`--leaky`: deliberately weakened set-ups, so every probe is seen to turn red when it should.

Each weakening is a real misconfiguration a sandbox operator could make, applied for real:

- network: QEMU user networking with `restrict=off` (host loopback reachable at 10.0.2.2, direct
  egress, other sandboxes' forwarded ports);
- policy: allow every host and IP on every port, loopback and link-local included, DNS on;
- home: the planted HOME copied into the guest's /root (what mounting ~ by mistake gives);
- env: the host's model-API key exported into the guest's environment;
- resolver: the guest's resolv.conf points at the gateway's DNS (which now answers every name);
- engine: the host's (fake) docker socket forwarded into the guest as DOCKER_HOST.

A microVM cannot share the host's kernel or process table, so `processes` and `kernel` stay
green here; tests show them red against a plain host shell instead.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.sandbox.base import SandboxSpec
from harness.sandbox.qemu import Microvm, QemuBackend, socat_binary
from harness.supervisor import Supervisor

ENGINE_GUEST_ADDR = "10.0.2.50:2375"
"""Where the leaky guest finds the forwarded docker socket (a guestfwd must lie inside 10.0.2.0/24)."""

WEAKENINGS = (
    "network: slirp restrict=off",
    "policy: allow everything on every port, DNS on",
    "home: planted HOME copied into the guest's /root",
    "env: host ANTHROPIC_API_KEY exported in the guest",
    "resolver: guest resolv.conf -> gateway DNS",
    f"engine: host docker socket -> {ENGINE_GUEST_ADDR}",
)

LEAKY_POLICY = """\
# leaky: what not to do. Every host and every address on every port, DNS answering every name.
name: leaky
deny_mode: 403-explained
loop_breaker: {threshold: 1000, window_s: 60}
dns: {enabled: true}
rules:
  - allow: "**:*"
    name: allow every host on every port
  - allow: "0.0.0.0/0:*"
    name: allow every IPv4 address on every port
"""


class LeakyMicrovm(Microvm):
    """A Microvm whose user network is unrestricted and which sees the host's engine socket."""

    def __init__(self, spec: SandboxSpec, backend: QemuBackend, supervisor: Supervisor, engine_socket: Path) -> None:
        super().__init__(spec, backend.image, supervisor)
        self.engine_socket = engine_socket

    def argv(self) -> list[str]:
        argv = super().argv()
        index = argv.index("-netdev") + 1
        guest_ip, guest_port = ENGINE_GUEST_ADDR.split(":")
        engine = f"guestfwd=tcp:{guest_ip}:{guest_port}-cmd:{socat_binary()} - UNIX-CONNECT:{self.engine_socket}"
        argv[index] = argv[index].replace("restrict=on", "restrict=off") + "," + engine
        return argv


class LeakyQemuBackend:
    """Wraps the QEMU backend; boots LeakyMicrovms with the same image and accelerator."""

    def __init__(self, inner: QemuBackend, engine_socket: Path) -> None:
        self.inner = inner
        self.name = inner.name
        self.accel = inner.accel
        self.engine_socket = engine_socket

    def boot(self, spec: SandboxSpec, supervisor: Supervisor) -> Microvm:
        vm = LeakyMicrovm(spec, self.inner, supervisor, self.engine_socket)
        vm.spawn()
        try:
            vm.wait_ready()
        except BaseException:
            vm.stop()
            raise
        return vm

    def describe(self) -> dict[str, object]:
        return {**self.inner.describe(), "leaky": list(WEAKENINGS)}


def weaken_backend(backend: Any, engine_socket: Path) -> Any:
    """The leaky variant of a backend; only QEMU has one so far."""
    if isinstance(backend, QemuBackend):
        return LeakyQemuBackend(backend, engine_socket)
    raise ConfigError(f"--leaky can only weaken the qemu backend, not {backend.name!r}; run it with --backend qemu")


def home_tarball(home: Path) -> bytes:
    """The planted home as an uncompressed tar stream (busybox tar extracts it in the guest)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(home.iterdir()):
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


def guest_weakening_script(api_key_env: str, dns_port: int | None) -> str:
    """Shell run once in a leaky guest (reads the key from stdin so it is not in the command)."""
    guest_ip, guest_port = ENGINE_GUEST_ADDR.split(":")
    lines = [
        "read -r key",
        f'echo "export {api_key_env}=$key" >>/etc/profile',
        f"echo 'export DOCKER_HOST=tcp://{guest_ip}:{guest_port}' >>/etc/profile",
    ]
    if dns_port:
        # busybox nslookup accepts host:port in resolv.conf; slirp (restrict=off) relays the UDP
        # to host loopback, where the gateway's per-sandbox resolver listens.
        lines.append(f"echo 'nameserver 10.0.2.2:{dns_port}' >/etc/resolv.conf")
    return "\n".join(lines)
