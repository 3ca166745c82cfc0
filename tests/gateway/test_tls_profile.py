"""Guest-facing TLS profiles per sandbox listener, against a real TLS client (openssl s_client) through the proxy.

The client offers only SHA-1 signature algorithms, as busybox's ssl_client does in effect (it sends no
signature_algorithms extension, so TLS 1.2 falls back to SHA-1), and runs at SECLEVEL 0 itself, so only
the gateway's policy decides: the strict listener must refuse it, the sha1-compat one must serve it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.fleet import Fleet
from harness.gateway.cli import READY_FILE
from harness.gateway.control import control_call
from harness.gateway.credentials import SENTINEL
from harness.gateway.process import TLS_PROFILES, GatewayProcess, GatewaySetupError

from .conftest import CLIENT_TIMEOUT_S, GatewayFactory, tls_request

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command-line client"),
]

HOST = "api.anthropic.com"
"""An intercepted host (it has a credential), served by the loopback stand-in."""
SHA1_ONLY = ("-tls1_2", "-sigalgs", "ECDSA+SHA1:RSA+SHA1")
"""A TLS 1.2 ClientHello whose only signature algorithms are SHA-1 ones."""
CLIENT_SECLEVEL_0 = ("-cipher", "DEFAULT:@SECLEVEL=0")
"""openssl's own default level would refuse SHA-1 (and TLS 1.1) on the client side, hiding the server's policy."""
REQUEST = (
    f"POST /v1/messages HTTP/1.1\r\nHost: {HOST}\r\nx-api-key: {SENTINEL}\r\ncontent-length: 2\r\n"
    "Connection: close\r\n\r\n{}"
).encode()


@pytest.fixture(scope="module")
def gw(make_gateway: GatewayFactory) -> GatewayProcess:
    return make_gateway()


@pytest.fixture(scope="module")
def ca_file(gw: GatewayProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tls-profile") / "gateway-ca.pem"
    path.write_bytes(gw.ca_cert_pem())
    return path


def listeners(gw: GatewayProcess, name: str) -> dict[str, int]:
    """One listener per profile, for one test: {profile: port}."""
    return {profile: gw.add_sandbox(f"{name}-{profile}", tls_profile=profile) for profile in TLS_PROFILES}


def s_client(port: int, ca_file: Path, *flags: str) -> subprocess.CompletedProcess[bytes]:
    """CONNECT through the listener on port, handshake with openssl's flags, send REQUEST, read to close
    (-ign_eof: the end of stdin does not end the connection)."""
    proxy = ("-connect", f"{HOST}:443", "-proxy", f"127.0.0.1:{port}", "-servername", HOST)
    verify = ("-CAfile", str(ca_file), "-verify_return_error")
    return subprocess.run(
        ["openssl", "s_client", *proxy, *verify, "-brief", "-ign_eof", *CLIENT_SECLEVEL_0, *flags],
        input=REQUEST,
        capture_output=True,
        timeout=CLIENT_TIMEOUT_S * 2,
        check=False,
    )


def s_client_via_sandbox(
    fleet: Fleet, sandbox_id: str, tmp_path: Path, *flags: str
) -> subprocess.CompletedProcess[bytes]:
    """s_client through the gateway listener of a fleet's sandbox, trusting the fleet gateway's CA."""
    port = fleet.listener_ports[sandbox_id]
    assert port is not None and fleet.gateway is not None
    ca_file = tmp_path / "gateway-ca.pem"
    ca_file.write_bytes(fleet.gateway.ca_cert_pem())
    return s_client(port, ca_file, *flags)


def connect_records(gw: GatewayProcess, sandbox: str) -> list[dict[str, object]]:
    return [r for r in gw.audit_records() if r["sandbox"] == sandbox and r["event"] == "connect"]


def test_sha1_only_client_is_refused_by_strict_and_served_by_sha1_compat(gw: GatewayProcess, ca_file: Path) -> None:
    ports = listeners(gw, "sha1")
    refused = s_client(ports["strict"], ca_file, *SHA1_ONLY)
    assert refused.returncode != 0 and b"HTTP/1.1" not in refused.stdout, refused
    served = s_client(ports["sha1-compat"], ca_file, *SHA1_ONLY)
    assert served.returncode == 0, served.stderr
    assert b"Hash used: SHA1" in served.stderr  # the handshake really was signed with SHA-1
    assert served.stdout.startswith(b"HTTP/1.1 200"), served.stdout
    assert json.loads(served.stdout.partition(b"\r\n\r\n")[2])["credential"] == "ok"
    [deny] = connect_records(gw, "sha1-strict")
    assert deny["decision"] == "deny" and deny["tls_profile"] == "strict"
    assert str(deny["reason"]).startswith("tls-handshake-failed"), deny
    [allow] = connect_records(gw, "sha1-sha1-compat")
    assert allow["decision"] == "allow" and allow["tls_profile"] == "sha1-compat"


@pytest.mark.parametrize("flags", [(), ("-tls1_2",)], ids=["tls1.3", "tls1.2"])
def test_a_modern_client_is_served_by_strict(gw: GatewayProcess, ca_file: Path, flags: tuple[str, ...]) -> None:
    port = listeners(gw, f"modern-{'-'.join(flags) or 'default'}")["strict"]
    reply = s_client(port, ca_file, *flags)
    assert reply.returncode == 0, reply.stderr
    assert b"Hash used: SHA1" not in reply.stderr
    assert reply.stdout.startswith(b"HTTP/1.1 200"), reply.stdout


def test_python_default_client_is_served_by_strict(gw: GatewayProcess) -> None:
    port = listeners(gw, "python")["strict"]
    reply = tls_request(port, f"{HOST}:443", gw.ca_cert_pem(), REQUEST)
    assert reply.status == 200 and reply.json()["credential"] == "ok", reply


@pytest.mark.parametrize("profile", TLS_PROFILES)
def test_tls_1_1_is_refused_by_every_profile(gw: GatewayProcess, ca_file: Path, profile: str) -> None:
    port = listeners(gw, "tls11")[profile]
    reply = s_client(port, ca_file, "-tls1_1")
    assert reply.returncode != 0 and b"HTTP/1.1" not in reply.stdout, reply
    [deny] = connect_records(gw, f"tls11-{profile}")
    assert deny["reason"] == "tls-handshake-failed: UNSUPPORTED_PROTOCOL", deny  # not reported as a missing SNI


def test_profiles_are_reported_and_an_unknown_one_is_a_clean_error(gw: GatewayProcess) -> None:
    ports = listeners(gw, "stats")
    default = gw.add_sandbox("stats-default")
    sandboxes = gw.stats()["sandboxes"]
    assert {sandboxes[f"stats-{p}"]["tls_profile"] for p in TLS_PROFILES} == set(TLS_PROFILES)
    assert sandboxes["stats-default"]["tls_profile"] == "strict"
    assert gw.add_sandbox("stats-strict") == ports["strict"]  # adding it again, alike, is the same listener
    with pytest.raises(GatewaySetupError, match="unknown TLS profile"):
        gw.add_sandbox("stats-bad", tls_profile="sha1")
    control = Path(json.loads((gw.config.state_dir / READY_FILE).read_text())["control"])  # type: ignore[operator]
    with pytest.raises(RuntimeError, match=r"unknown TLS profile 'tls1\.0'"):
        control_call(control, "add_sandbox", sandbox="stats-raw", tls_profile="tls1.0")
    with pytest.raises(RuntimeError, match="already listens with TLS profile strict"):
        control_call(control, "add_sandbox", sandbox="stats-strict", tls_profile="sha1-compat")
    assert gw.running and default
    assert "stats-bad" not in gw.stats()["sandboxes"] and "stats-raw" not in gw.stats()["sandboxes"]
