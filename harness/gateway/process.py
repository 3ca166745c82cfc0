"""The harness-facing handle: run the gateway as its own process and drive it.

    cfg = GatewayConfig(policy="balanced", audit_path=run_dir / "gateway-audit.jsonl")
    with GatewayProcess(cfg) as gw:
        port = gw.add_sandbox("r0-sb1")  # the sandbox's egress relay connects to 127.0.0.1:port
        ...

The child runs in a new session (its own process group), so stop() can kill the group and
never leave a process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from harness.gateway.cli import READY_FILE
from harness.gateway.config import GatewayConfig, Limits
from harness.gateway.control import control_call
from harness.gateway.credentials import DEFAULT_CREDENTIALS, SENTINEL, CredentialSpec
from harness.gateway.errors import EXIT_SETUP, SetupError
from harness.gateway.policy import load_policy
from harness.gateway.tls import STRICT, TLS_PROFILES, TlsProfileError, check_profile

__all__ = [
    "SENTINEL",
    "TLS_PROFILES",
    "CredentialSpec",
    "GatewayConfig",
    "GatewayError",
    "GatewayProcess",
    "GatewaySetupError",
    "Limits",
    "SetupError",
]

READY_POLL_S = 0.02
STOP_GRACE_S = 3.0
KILL_WAIT_S = 5.0
LOG_TAIL_BYTES = 4000
GATEWAY_ENV_ALLOWED = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "XDG_STATE_HOME",
    "XDG_RUNTIME_DIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)
"""What the gateway inherits of the harness's environment besides the credentials' own variables:
enough to run Python, find the per-install CA (XDG_STATE_HOME, HOME) and verify upstreams
(SSL_CERT_*). A secret command that needs more gets it through GatewayConfig.extra_env."""
GATEWAY_ENV_PREFIXES = ("LC_",)
"""Variable-name prefixes the gateway inherits too (the locale)."""


class GatewayError(RuntimeError):
    """The gateway process could not be started or driven."""


class GatewaySetupError(GatewayError, SetupError):
    """The gateway refused its configuration (policy, credential, override, CA file): str() is its one line."""


def credential_env_names(config: GatewayConfig) -> set[str]:
    """The variables the gateway's credentials read their secrets from: the config's, else the policy's, else
    the defaults, as GatewayState.from_config chooses them."""
    specs = config.credentials
    if specs is None:
        specs = load_policy(config.policy).credentials
    if specs is None:
        specs = list(DEFAULT_CREDENTIALS)
    return {spec.env for spec in specs if spec.env}


def gateway_environment(config: GatewayConfig) -> dict[str, str]:
    """The gateway's environment: the allowlist, the credentials' variables, then extra_env; never the rest
    of the harness's (another key, a cloud token) that the gateway has no use for."""
    wanted = credential_env_names(config)
    env = {
        name: value
        for name, value in os.environ.items()
        if name in GATEWAY_ENV_ALLOWED or name in wanted or name.startswith(GATEWAY_ENV_PREFIXES)
    }
    return {**env, **config.extra_env, "PYTHONUNBUFFERED": "1"}


class GatewayProcess:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._own_state_dir = False
        self._control: Path | None = None
        self._ready: dict[str, Any] = {}
        self._ports: dict[str, int] = {}
        self._dns_ports: dict[str, int | None] = {}

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> GatewayProcess:
        if self._proc is not None:
            raise GatewayError("gateway already started")
        cfg = self.config
        if cfg.state_dir is None:
            cfg.state_dir = Path(tempfile.mkdtemp(prefix="blastradius-gw-"))
            self._own_state_dir = True
        state = cfg.state_dir
        state.mkdir(parents=True, exist_ok=True)
        if cfg.audit_path is None:
            cfg.audit_path = state / "gateway-audit.jsonl"
        (state / READY_FILE).unlink(missing_ok=True)
        try:
            env = gateway_environment(cfg)
        except SetupError as exc:
            raise GatewaySetupError(str(exc)) from None
        cfg.parent_pid = os.getpid()
        config_path = state / "config.json"
        config_path.write_text(cfg.to_json())
        log_path = state / "gateway.log"
        with open(log_path, "ab") as log_fh:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "harness.gateway", "--config", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd=str(Path(__file__).resolve().parents[2]),
            )
        deadline = time.monotonic() + cfg.startup_timeout_s
        ready_path = state / READY_FILE
        try:
            while not ready_path.exists():
                if self._proc.poll() is not None:
                    if self._proc.returncode == EXIT_SETUP:
                        raise GatewaySetupError(self._setup_error())
                    raise GatewayError(f"gateway exited with {self._proc.returncode}: {self.log_tail()}")
                if time.monotonic() > deadline:
                    raise GatewayError(f"gateway not ready after {cfg.startup_timeout_s}s: {self.log_tail()}")
                time.sleep(READY_POLL_S)
            self._ready = json.loads(ready_path.read_text())
            self._control = Path(self._ready["control"])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Idempotent: SIGTERM the process group, then SIGKILL it if it lingers."""
        proc, self._proc = self._proc, None
        if proc is not None:
            for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, KILL_WAIT_S)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            # Reap any child left in the group (the gateway spawns none, but a secret command may).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait(timeout=KILL_WAIT_S)
        if self._control is not None and self._control.parent.name.startswith("brgw-"):
            shutil.rmtree(self._control.parent, ignore_errors=True)
        self._control = None
        if self._own_state_dir and self.config.state_dir is not None:
            # Keep the audit log if it lives elsewhere; a temp state dir is ours to remove.
            shutil.rmtree(self.config.state_dir, ignore_errors=True)
            self._own_state_dir = False

    def __enter__(self) -> GatewayProcess:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- queries and control -------------------------------------------------------------
    @property
    def pid(self) -> int:
        if self._proc is None:
            raise GatewayError("gateway not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _call(self, op: str, **args: Any) -> dict[str, Any]:
        if self._control is None or not self.running:
            raise GatewayError(f"gateway not running: {self.log_tail()}")
        return control_call(self._control, op, **args)

    def add_sandbox(self, sandbox_id: str, port: int = 0, tls_profile: str = STRICT) -> int:
        """Open a listener for sandbox_id on listen_host (ephemeral port unless given). tls_profile: the TLS
        it offers the guest where it intercepts (tls.TLS_PROFILES): sha1-compat only for busybox's ssl_client."""
        try:
            check_profile(tls_profile)
        except TlsProfileError as exc:
            raise GatewaySetupError(str(exc)) from None
        reply = self._call("add_sandbox", sandbox=sandbox_id, port=port, tls_profile=tls_profile)
        self._ports[sandbox_id] = int(reply["port"])
        self._dns_ports[sandbox_id] = reply.get("dns_port")
        return self._ports[sandbox_id]

    def remove_sandbox(self, sandbox_id: str) -> None:
        self._call("remove_sandbox", sandbox=sandbox_id)
        self._ports.pop(sandbox_id, None)
        self._dns_ports.pop(sandbox_id, None)

    def dns_port(self, sandbox_id: str) -> int | None:
        """The sandbox's policy-gated DNS port (TCP and UDP), or None when DNS is off."""
        return self._dns_ports.get(sandbox_id)

    def health(self) -> dict[str, Any]:
        return self._call("health")

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self._call("stats")["stats"]
        return stats

    # ---- toxics (toxics.py) and deny switching -------------------------------------------
    def add_toxic(self, toxic: dict[str, Any]) -> dict[str, Any]:
        """Switch a toxic on: {"type": "latency", "attributes": {"latency": 300}, "upstream": "api.x.com"}."""
        reply: dict[str, Any] = self._call("toxic_add", toxic=toxic)["toxic"]
        return reply

    def remove_toxic(self, name: str) -> bool:
        return bool(self._call("toxic_remove", name=name)["removed"])

    def clear_toxics(self) -> list[str]:
        """Remove every toxic (the rollback of any chaos run). A stopped gateway has none."""
        if not self.running:
            return []
        return list(self._call("toxic_clear")["removed"])

    def toxics(self) -> dict[str, Any]:
        """{"active": [toxic...], "applied": {name: connections or requests affected}}."""
        return self._call("toxic_list")

    def set_deny(self, **settings: Any) -> dict[str, Any]:
        """deny_mode / loop_breaker / loop_threshold / loop_window_s / loop_answer ("429" or
        "200-terminal") at run time; resets the breaker's memory. Unset settings stay as they were."""
        return self._call("set_deny", **{k: v for k, v in settings.items() if v is not None})

    def ca_cert_pem(self) -> bytes:
        """The CA certificate (public) that guests must trust. Never the key."""
        return str(self._call("ca_cert")["pem"]).encode()

    @property
    def audit_path(self) -> Path:
        assert self.config.audit_path is not None
        return self.config.audit_path

    def audit_records(self) -> list[dict[str, Any]]:
        path = self.config.audit_path
        if path is None or not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _setup_error(self) -> str:
        """The one line a gateway that refused its configuration printed last (cli.main)."""
        lines = [line for line in self.log_tail().splitlines() if line.strip()]
        return lines[-1].removeprefix("gateway: ") if lines else "the gateway refused its configuration"

    def log_tail(self) -> str:
        if self.config.state_dir is None:
            return ""
        path = self.config.state_dir / "gateway.log"
        try:
            data = path.read_bytes()[-LOG_TAIL_BYTES:]
        except OSError:
            return ""
        return data.decode("utf-8", "replace")
