"""Starting the gateway: a configuration to fix is one line and exit 2, the gateway process gets only
the environment it needs, and the foreground gateway leaves nothing behind.

Real policy files, a real `invoke gateway` subprocess, and the gateway process's real /proc/<pid>/environ."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.gateway.credentials import CredentialError
from harness.gateway.policy import PolicyError, load_policy
from harness.gateway.process import CredentialSpec, GatewayConfig, GatewayProcess, GatewaySetupError, SetupError
from harness.standins.upstream import UpstreamServer

from .conftest import ANTHROPIC_KEY, http_get, tls_request

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
INVOKE_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 15.0


def write_policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


# ---- unknown keys and bad values in a real policy file -----------------------------------------
@pytest.mark.parametrize(
    ("text", "key", "closest"),
    [
        ("deny_mod: reset\nrules: []\n", "deny_mod", "deny_mode"),
        ("rule:\n  - allow: x.test\n", "rule", "rules"),
        ("defaults_ports: [80]\nrules: []\n", "defaults_ports", "default_ports"),
        ("rules:\n  - allow: x.test\n    port: [8080]\n", "port", "ports"),
        ("rules:\n  - allow: x.test\n    method: [GET]\n", "method", "methods"),
        ("rules:\n  - allow: x.test\n    path: [/a]\n", "path", "paths"),
        ("loop_breaker: {treshold: 3}\nrules: []\n", "treshold", "threshold"),
        ("loop_breaker: {window: 3}\nrules: []\n", "window", "window_s"),
        ("dns: {enable: true}\nrules: []\n", "enable", "enabled"),
        ("rules: []\ncredentials:\n  - {name: a, host: a.test, heder: x-key, env: A_KEY}\n", "heder", "header"),
    ],
)
def test_unknown_policy_keys_name_the_closest_valid_one(tmp_path: Path, text: str, key: str, closest: str) -> None:
    path = write_policy(tmp_path, text)
    with pytest.raises(SetupError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert f"unknown key {key!r}" in message and f"did you mean {closest!r}" in message, message
    assert str(path) in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("loop_breaker: {threshold: abc}\nrules: []\n", "loop_breaker.threshold must be a whole number"),
        ("loop_breaker: {threshold: -1}\nrules: []\n", "loop_breaker.threshold must be a whole number"),
        ("loop_breaker: {window_s: soon}\nrules: []\n", "loop_breaker.window_s must be a number"),
        ("dns: {enabled: maybe}\nrules: []\n", "dns.enabled must be true or false"),
        ("default_ports: [http]\nrules: []\n", "default_ports: bad port"),
        ("rules:\n  - allow: x.test\n    ports: 80\n", "ports must be a list"),
        ("rules:\n  - allow: x.test\n    paths: [packages]\n", "must start with '/'"),
        ("rules:\n  - allow: [x.test]\n", "allow must name a host"),
        ("rules: allow-all\n", "rules must be a list"),
        ("", "is empty"),
        ("rules: []\ncredentials:\n  - {name: a, host: a.test, header: k}\n", "exactly one of env, file or command"),
        ("rules: []\ncredentials:\n  - {name: a, host: a.test, header: k, env: K, port: x}\n", "port must be"),
    ],
)
def test_bad_policy_values_are_one_clear_error(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(PolicyError if "credentials" not in text else CredentialError) as caught:
        load_policy(write_policy(tmp_path, text))
    assert fragment in str(caught.value), caught.value


def test_misspelt_ports_no_longer_mean_443(tmp_path: Path) -> None:
    """The issue's example: `port: [8080]` used to load as an allow of x.test:443."""
    with pytest.raises(PolicyError, match="'port'; did you mean 'ports'"):
        load_policy(write_policy(tmp_path, "rules:\n  - allow: x.test\n    port: [8080]\n"))
    assert (
        load_policy(write_policy(tmp_path, "rules:\n  - allow: x.test\n    ports: [8080]\n"))
        .check_destination("x.test", 8080)
        .allowed
    )


# ---- `invoke gateway`: one line and exit 2 ---------------------------------------------------
def gateway_env(tmp_path: Path) -> dict[str, str]:
    """No key of the host's, temp dirs under tmp_path, and the per-install CA away from the real one."""
    return {
        **{k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")},
        "PYTHONPATH": str(REPO),
        "TMPDIR": str(tmp_path),
        "XDG_STATE_HOME": str(tmp_path / "xdg"),
    }


def run_invoke(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "--search-root", str(REPO), "gateway", "--port", "0", *args],
        cwd=REPO,
        env={**gateway_env(tmp_path), **(env or {})},
        capture_output=True,
        text=True,
        timeout=INVOKE_TIMEOUT_S,
    )
    assert list(tmp_path.glob("blastradius-gateway-*")) == []  # a refused start leaves no state dir
    return result


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_invoke_gateway_bad_threshold(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "loop_breaker: {threshold: abc}\nrules:\n  - allow: x.test\n")
    assert_one_error_line(run_invoke(tmp_path, "--policy", str(policy)), "loop_breaker.threshold", "'abc'")


def test_invoke_gateway_unknown_key(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "rules:\n  - allow: x.test\n    port: [8080]\n")
    assert_one_error_line(run_invoke(tmp_path, "--policy", str(policy)), "unknown key 'port'", "did you mean 'ports'")


def test_invoke_gateway_short_key(tmp_path: Path) -> None:
    result = run_invoke(tmp_path, env={"ANTHROPIC_API_KEY": "abc"})
    assert_one_error_line(result, "$ANTHROPIC_API_KEY", "shorter than 8", "set it to the full key")
    assert "abc" not in result.stderr.replace("$ANTHROPIC_API_KEY", "")  # the secret itself is never printed


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--override", "api.anthropic.com"), "--override 'api.anthropic.com'"),
        (("--override", "api.anthropic.com=localhost:1"), "must be an IP literal"),
        (("--upstream-ca", "/nonexistent/ca.pem"), "upstream CA /nonexistent/ca.pem"),
    ],
)
def test_invoke_gateway_bad_flags(tmp_path: Path, flags: tuple[str, ...], fragment: str) -> None:
    assert_one_error_line(run_invoke(tmp_path, *flags), fragment)


def test_managed_gateway_with_a_short_key_is_a_setup_error(tmp_path: Path, ca_dir: Path) -> None:
    """What `invoke bench` starts: the gateway process exits 2 and its one line is the error."""
    policy = write_policy(tmp_path, "rules:\n  - allow: api.anthropic.com\n")
    gw = GatewayProcess(
        GatewayConfig(
            policy=policy,
            state_dir=tmp_path / "state",
            ca_dir=ca_dir,
            credentials=[CredentialSpec("anthropic", "api.anthropic.com", "x-api-key", env="BR_SHORT_KEY")],
            extra_env={"BR_SHORT_KEY": "short"},
        )
    )
    with pytest.raises(GatewaySetupError) as caught:
        gw.start()
    gw.stop()
    assert str(caught.value) == (
        "credential anthropic: the secret in $BR_SHORT_KEY is 5 characters, shorter than 8: "
        "set it to the full key, or unset it to run without this credential"
    )


# ---- the gateway's environment ---------------------------------------------------------------
def test_gateway_process_gets_only_what_it_needs(
    tmp_path: Path, ca_dir: Path, monkeypatch: pytest.MonkeyPatch, test_policy_file: Path
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-proj-not-a-credential-of-this-gateway")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-planted-for-this-test")
    monkeypatch.setenv("BR_TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)
    monkeypatch.setenv("LC_TIME", "C")
    spec = CredentialSpec("anthropic", "api.anthropic.com", "x-api-key", env="BR_TEST_ANTHROPIC_KEY")
    cfg = GatewayConfig(
        policy=test_policy_file,
        state_dir=tmp_path / "state",
        ca_dir=ca_dir,
        credentials=[spec],
        extra_env={"BR_EXTRA": "given-by-the-caller"},
    )
    with GatewayProcess(cfg) as gw:
        raw = Path(f"/proc/{gw.pid}/environ").read_bytes()
        environ = dict(item.split(b"=", 1) for item in raw.split(b"\0") if item)
        port = gw.add_sandbox("env")
        assert http_get(port, "http://example.com/").status == 403  # it runs with what it was given
    names = {k.decode() for k in environ}
    assert environ[b"BR_TEST_ANTHROPIC_KEY"] == ANTHROPIC_KEY.encode()  # its credential's variable
    assert environ[b"BR_EXTRA"] == b"given-by-the-caller" and environ[b"LC_TIME"] == b"C"
    assert "PATH" in names
    assert b"sk-proj-not-a-credential" not in raw and b"aws-secret-planted" not in raw
    assert "OPENAI_API_KEY" not in names and "AWS_SECRET_ACCESS_KEY" not in names


def test_policy_credentials_name_the_variables_the_gateway_gets(
    tmp_path: Path, ca_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BR_POLICY_KEY", "policy-named-secret-123")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-default-credential-not-used-here")
    policy = write_policy(
        tmp_path,
        "rules:\n  - allow: api.example.test\ncredentials:\n"
        "  - {name: ex, host: api.example.test, header: x-key, env: BR_POLICY_KEY}\n",
    )
    with GatewayProcess(GatewayConfig(policy=policy, state_dir=tmp_path / "s", ca_dir=ca_dir)) as gw:
        raw = Path(f"/proc/{gw.pid}/environ").read_bytes()
    assert b"BR_POLICY_KEY=policy-named-secret-123" in raw
    assert b"sk-ant-default" not in raw


# ---- the foreground gateway leaves nothing behind --------------------------------------------
@pytest.fixture
def foreground(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Foreground gateways a test starts; any still running when it ends (a failed assertion) is killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


INVOKE_GATEWAY = ("-m", "invoke", "--search-root", str(REPO), "gateway", "--port", "0")
MODULE_GATEWAY = ("-m", "harness.gateway", "--listen", "127.0.0.1:0")


def start_foreground(
    tmp_path: Path,
    started: list[subprocess.Popen[str]],
    *args: str,
    entry: tuple[str, ...] = INVOKE_GATEWAY,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, *entry, *args],
        cwd=REPO,
        env={**gateway_env(tmp_path), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    started.append(proc)
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "-> http://" in line:
            return proc, int(line.rsplit(":", 1)[1])
        if not line and proc.poll() is not None:
            break
    raise AssertionError("foreground gateway did not start")


def stop_foreground(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    return out


@pytest.mark.parametrize("requests", [0, 1])
def test_foreground_gateway_removes_its_state_dir(
    tmp_path: Path, foreground: list[subprocess.Popen[str]], requests: int
) -> None:
    proc, port = start_foreground(tmp_path, foreground, "--policy", "balanced")
    [state] = list(tmp_path.glob("blastradius-gateway-*"))
    assert (state / "ready.json").exists()
    for _ in range(requests):
        assert http_get(port, "http://example.com/").status == 403
    out = stop_foreground(proc)
    if requests:
        # The audit log it wrote is all that stays, and the user is told where.
        assert [p.name for p in state.iterdir()] == ["gateway-audit.jsonl"]
        assert f"audit log kept at {state / 'gateway-audit.jsonl'}" in out
    else:
        assert not state.exists()
    assert list(tmp_path.glob("brgw-*")) == []


def test_foreground_gateway_keeps_a_state_dir_it_was_given(
    tmp_path: Path, ca_dir: Path, foreground: list[subprocess.Popen[str]]
) -> None:
    given = tmp_path / "mine"
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "harness.gateway", "--listen", "127.0.0.1:0"),
            *("--state-dir", str(given), "--ca-dir", str(ca_dir)),
        ],
        cwd=REPO,
        env=gateway_env(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    foreground.append(server)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not (given / "ready.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (given / "ready.json").exists()
    stop_foreground(server)
    assert given.exists() and not (given / "ready.json").exists()  # the stale ready file is gone


# ---- --override and --upstream-ca: a local stand-in, and the key still only inside verified TLS ----
@pytest.mark.parametrize("entry", [INVOKE_GATEWAY, MODULE_GATEWAY], ids=["invoke", "module"])
def test_foreground_gateway_against_a_local_stand_in(
    tmp_path: Path, foreground: list[subprocess.Popen[str]], upstream: UpstreamServer, entry: tuple[str, ...]
) -> None:
    upstream.clear()
    override = f"api.anthropic.com:443=127.0.0.1:{upstream.https_port}"
    key = {"ANTHROPIC_API_KEY": ANTHROPIC_KEY}
    proc, port = start_foreground(
        tmp_path, foreground, "--override", override, "--upstream-ca", str(upstream.ca_file), entry=entry, env=key
    )
    ca = (tmp_path / "xdg" / "blastradius" / "gateway-ca" / "ca.pem").read_bytes()
    call = (
        b"GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\nx-api-key: proxy-managed\r\nConnection: close\r\n\r\n"
    )
    assert tls_request(port, "api.anthropic.com:443", ca, call).status == 200
    [got] = upstream.received()
    assert (got.sni, got.credential) == ("api.anthropic.com", "ok")  # injected, inside TLS it verified
    stop_foreground(proc)
    # Without the stand-in's CA the gateway cannot verify it: nothing is sent, key or not.
    upstream.clear()
    proc, port = start_foreground(tmp_path, foreground, "--override", override, entry=entry, env=key)
    assert tls_request(port, "api.anthropic.com:443", ca, call).status == 502
    assert upstream.received() == []
    stop_foreground(proc)
    audits = list(tmp_path.glob("blastradius-gateway-*/gateway-audit.jsonl"))
    dialled = [json.loads(line).get("upstream_addr") for path in audits for line in path.read_text().splitlines()]
    assert audits and f"127.0.0.1:{upstream.https_port}" in dialled
    assert all(addr is None or addr.startswith("127.0.0.1:") for addr in dialled)
