"""The gateway as a real guest's only way out (issue #3's acceptance, from inside a booted guest)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.fleet import Fleet, open_fleet
from harness.gateway.process import GatewayConfig
from harness.paths import cache_dir
from harness.sandbox import BackendOptions, Sandbox, SandboxSpec, create_backend
from harness.standins.upstream import UpstreamServer
from harness.supervisor import Supervisor
from tests.gateway.conftest import ANTHROPIC_KEY, SECRET_ENV, credentials, guest_gateway_config
from tests.gateway.test_tls_profile import SHA1_ONLY, s_client_via_sandbox

pytestmark = pytest.mark.qemu

HTTPS_VIA_PROXY = r"""#!/bin/sh
# nc -e hands us the proxy connection as stdin/stdout: CONNECT, read the proxy's answer, then TLS.
exec 3<&0
printf 'CONNECT %s:%s HTTP/1.1\r\nHost: %s:%s\r\n\r\n' "$HOST" "$PORT" "$HOST" "$PORT"
read -r version status rest <&3
echo "$status" > /tmp/connect-status
while read -r line <&3; do [ "${#line}" -le 1 ] && break; done
[ "$status" = 200 ] || exit 0
ssl_client -s 3 -n "$HOST" </tmp/request >/tmp/response 2>/tmp/ssl-error
"""

MODEL_REQUEST = (
    "POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nx-api-key: proxy-managed\r\n"
    "content-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer(expected={"api.anthropic.com": ("x-api-key", ANTHROPIC_KEY)}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fleet(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    run_dir = tmp_path_factory.mktemp("gw-guest")
    backend = create_backend("qemu", BackendOptions(cache=cache_dir(), accel="tcg"))
    config = guest_gateway_config(run_dir, upstream)
    with (
        Supervisor("test-gw-guest") as supervisor,
        open_fleet(backend, supervisor, run_dir, SandboxSpec(id="", workdir=run_dir), config) as opened,
    ):
        yield opened


@pytest.fixture(scope="module")
def guest(fleet: Fleet) -> Sandbox:
    return fleet.boot("gw-guest-0")


def https_request(guest: Sandbox, host: str, port: int, request: str) -> tuple[str, bytes]:
    guest.exec("cat > /tmp/https && chmod +x /tmp/https", stdin=HTTPS_VIA_PROXY.encode())
    guest.exec("cat > /tmp/request", stdin=request.encode())
    guest.exec(
        f"rm -f /tmp/response /tmp/connect-status; HOST={host} PORT={port} nc 10.0.2.100 3128 -e /tmp/https", timeout=30
    )
    status = guest.exec("cat /tmp/connect-status").text.strip()
    return status, guest.exec("cat /tmp/response 2>/dev/null").stdout


def http_request(guest: Sandbox, request: str) -> bytes:
    return guest.exec("nc 10.0.2.100 3128", stdin=request.encode(), timeout=20).stdout


def test_allowed_request_gets_the_key_injected_while_the_guest_has_none(
    guest: Sandbox, fleet: Fleet, upstream: UpstreamServer
) -> None:
    upstream.clear()
    status, response = https_request(guest, "api.anthropic.com", 443, MODEL_REQUEST)
    assert status == "200", "CONNECT to the model API was refused"
    assert response.startswith(b"HTTP/1.1 200"), response[:200]
    received = [r for r in upstream.received() if r.sni == "api.anthropic.com"]
    assert received and received[-1].credential == "ok", received  # the upstream saw the real key
    assert ANTHROPIC_KEY not in guest.exec("env; cat /etc/profile").text
    assert ANTHROPIC_KEY.encode() not in response
    audit = [json.loads(line) for line in fleet.gateway.audit_path.read_text().splitlines()]
    injected = [r for r in audit if r.get("credential") == "anthropic" and r["sandbox"] == "gw-guest-0"]
    assert injected and injected[-1]["decision"] == "allow"


@pytest.mark.parametrize("mode", ["403", "403-explained", "reset"])
def test_blocked_host_gets_each_deny_mode(fleet: Fleet, mode: str, tmp_path: Path) -> None:
    config = fleet.gateway.config
    policy = Path(str(config.policy))
    text = policy.read_text()
    mode_policy = tmp_path / f"policy-{mode}.yaml"
    mode_policy.write_text(text.replace("deny_mode: 403-explained", f"deny_mode: {mode}"))
    with (
        Supervisor(f"test-deny-{mode}") as supervisor,
        open_fleet(
            fleet.backend,
            supervisor,
            tmp_path,
            fleet.template,
            GatewayConfig(
                policy=mode_policy,
                state_dir=tmp_path / "gw",
                audit_path=tmp_path / "audit.jsonl",
                ca_dir=Path(str(config.ca_dir)),
                credentials=credentials(),
                extra_env=dict(SECRET_ENV),
            ),
        ) as deny_fleet,
    ):
        guest = deny_fleet.boot(f"deny-{mode.replace('-', '')}")
        reply = http_request(
            guest, "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
        )
        audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    if mode == "reset":
        assert reply == b""  # a TCP-level refusal, not an HTTP answer
    else:
        assert reply.startswith(b"HTTP/1.1 403"), reply[:200]
        assert b"example.com" in reply
        if mode == "403-explained":
            assert b"X-Blastradius-Decision" in reply or b"x-blastradius-decision" in reply.lower()
    denied = [r for r in audit if r["host"] == "example.com"]
    assert denied and denied[-1]["decision"] == "deny" and denied[-1]["deny_mode"] == mode


def test_connect_to_a_port_the_policy_does_not_name_is_denied(guest: Sandbox) -> None:
    for port in (22, 9999):
        reply = http_request(guest, f"CONNECT github.com:{port} HTTP/1.1\r\nHost: github.com:{port}\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 403"), (port, reply[:200])


def test_blocked_name_does_not_resolve_in_the_guest(guest: Sandbox) -> None:
    result = guest.exec("nslookup example.com 2>&1; echo rc=$?", timeout=20)
    assert "rc=0" not in result.text or "Address" not in result.text.split("Name:")[-1]


def test_every_decision_is_audited_without_the_secret(fleet: Fleet, guest: Sandbox) -> None:
    http_request(
        guest, "GET http://blocked.evil.test/ HTTP/1.1\r\nHost: blocked.evil.test\r\nConnection: close\r\n\r\n"
    )
    text = fleet.gateway.audit_path.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert any(r["host"] == "blocked.evil.test" and r["decision"] == "deny" for r in records)
    assert ANTHROPIC_KEY not in text
    assert all(r["sandbox"] for r in records)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command-line client")
def test_a_busybox_sandbox_listener_still_serves_sha1_signatures(guest: Sandbox, fleet: Fleet, tmp_path: Path) -> None:
    """busybox's ssl_client sends no signature_algorithms, so its sandboxes' listeners keep SHA-1 (a debian
    sandbox's refuses it: tests/test_image_debian.py)."""
    assert fleet.gateway is not None
    assert fleet.gateway.stats()["sandboxes"][guest.id]["tls_profile"] == "sha1-compat"
    served = s_client_via_sandbox(fleet, guest.id, tmp_path, *SHA1_ONLY)
    assert b"HTTP/1.1 200" in served.stdout, served
