"""`--leaky`: deliberately weakened set-ups, so every probe is seen to turn red when it should.

Each weakening is a real misconfiguration a sandbox operator could make, applied for real:

- network: the backend's own weakening (`Backend.weaken`; QEMU: user networking with `restrict=off`,
  so host loopback is reachable at the host alias, direct egress, other sandboxes' forwarded ports);
- policy: allow every host and IP on every port, loopback and link-local included, DNS on;
- home: the planted HOME copied into the guest's /root (what mounting ~ by mistake gives);
- env: the host's model-API key exported into the guest's environment;
- resolver: the guest's resolv.conf, and dig's ~/.digrc, point at the gateway's DNS (which now answers
  every name);
- engine: the host's (fake) docker socket forwarded into the guest as DOCKER_HOST.

A microVM cannot share the host's kernel or process table, so `processes` and `kernel` stay
green here; tests show them red against a plain host shell instead.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from harness.sandbox.base import GuestNetwork

WEAKENINGS = (
    "network: unrestricted (the backend's weaken(); QEMU: slirp restrict=off)",
    "policy: allow everything on every port, DNS on",
    "home: planted HOME copied into the guest's /root",
    "env: host ANTHROPIC_API_KEY exported in the guest",
    "resolver: guest resolv.conf and ~/.digrc -> gateway DNS",
    "engine: host docker socket forwarded into the guest",
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


def home_tarball(home: Path) -> bytes:
    """The planted home as an uncompressed tar stream (busybox tar extracts it in the guest)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(home.iterdir()):
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


def guest_weakening_script(api_key_env: str, network: GuestNetwork, dns_port: int | None) -> str:
    """Shell run once in a leaky guest (reads the key from stdin so it is not in the command)."""
    lines = ["read -r key", f'echo "export {api_key_env}=$key" >>/etc/profile']
    if network.engine is not None:
        lines.append(f"echo 'export DOCKER_HOST=tcp://{network.engine}' >>/etc/profile")
    if dns_port and network.host_alias is not None:
        # busybox nslookup accepts host:port in resolv.conf; an unrestricted network relays the UDP
        # to host loopback, where the gateway's per-sandbox resolver listens.
        # dig (a glibc userland's) cannot parse host:port in resolv.conf and refuses to run at all, so where
        # it is found the port goes into dig's own defaults file instead.
        lines.append(
            "if command -v dig >/dev/null; then "
            f"echo 'nameserver {network.host_alias}' >/etc/resolv.conf; "
            f"echo '@{network.host_alias} -p {dns_port}' >\"$HOME/.digrc\"; "
            f"else echo 'nameserver {network.host_alias}:{dns_port}' >/etc/resolv.conf; fi"
        )
    return "\n".join(lines)
