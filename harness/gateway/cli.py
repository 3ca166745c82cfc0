"""Entry points: the gateway daemon (`python -m harness.gateway --config FILE`, used by
process.GatewayProcess) and a foreground runner for `invoke gateway --policy FILE`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import uvloop

from harness.gateway.audit import ScrubFilter
from harness.gateway.config import GatewayConfig
from harness.gateway.control import ControlServer, toxic_op
from harness.gateway.dial import OverrideError
from harness.gateway.errors import EXIT_SETUP, SetupError
from harness.gateway.names import MAX_PORT
from harness.gateway.server import Gateway
from harness.gateway.tls import STRICT, TLS_PROFILES, check_profile

log = logging.getLogger("harness.gateway")

READY_FILE = "ready.json"
CONTROL_SOCKET = "control.sock"
# AF_UNIX paths are limited to 108 bytes; longer state dirs get a short private dir instead.
MAX_UNIX_PATH = 100
PARENT_POLL_S = 1.0


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the gateway's coroutine on uvloop: a C event loop and transports, cheaper per read, write
    and timer than asyncio's own (the gateway does all three for every request and tunnel chunk)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def control_socket_path(state_dir: Path) -> Path:
    path = state_dir / CONTROL_SOCKET
    if len(str(path)) <= MAX_UNIX_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix="brgw-")) / CONTROL_SOCKET


async def serve(
    config: GatewayConfig,
    sandboxes: dict[str, int] | None = None,
    announce: bool = True,
    tls_profile: str = STRICT,
) -> None:
    """Run the gateway until SIGTERM/SIGINT or a control `shutdown`; `sandboxes` (id: port) listen from the
    start, with guest-facing TLS profile tls_profile."""
    assert config.state_dir is not None
    config.state_dir.mkdir(parents=True, exist_ok=True)
    gw = Gateway(config)
    for handler in logging.getLogger().handlers:
        handler.addFilter(ScrubFilter(gw.state.audit))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGUSR1 removes every toxic: the way out of a chaos run when the control socket is unusable.
    loop.add_signal_handler(signal.SIGUSR1, lambda: asyncio.ensure_future(toxic_op(gw, "toxic_clear", {})))
    control = ControlServer(gw, control_socket_path(config.state_dir), stop.set)
    await control.start()
    ports = {}
    for sandbox, port in (sandboxes or {}).items():
        listener = await gw.add_sandbox(sandbox, port, tls_profile)
        ports[sandbox] = listener.port
    ready = {
        "pid": os.getpid(),
        "control": str(control.path),
        "ca_cert": str(gw.state.ca.ca_dir / "ca.pem"),
        "sandboxes": ports,
    }
    tmp = config.state_dir / (READY_FILE + ".tmp")
    tmp.write_text(json.dumps(ready))
    tmp.rename(config.state_dir / READY_FILE)
    if announce:
        for sandbox, port in ports.items():
            print(f"gateway: sandbox {sandbox} (TLS {tls_profile}) -> http://{config.listen_host}:{port}", flush=True)
        print(f"gateway: CA certificate {gw.state.ca.ca_dir / 'ca.pem'}; control {control.path}", flush=True)
    watchdog = asyncio.ensure_future(_exit_with_parent(config, stop))
    try:
        await stop.wait()
    finally:
        watchdog.cancel()
        control.close()
        if control.path.parent != config.state_dir:  # the short private dir of a long state dir's socket
            shutil.rmtree(control.path.parent, ignore_errors=True)
        await gw.close()
        # A ready file that outlives its gateway points at a control socket nobody answers.
        (config.state_dir / READY_FILE).unlink(missing_ok=True)


async def _exit_with_parent(config: GatewayConfig, stop: asyncio.Event) -> None:
    """A managed gateway stops when the harness that started it dies, even by SIGKILL, and even when that
    happened before this gateway could look (its parent is then already not the one the config names)."""
    if not config.exit_with_parent:
        return
    parent = config.parent_pid or os.getppid()
    if parent == 1:
        return
    while os.getppid() == parent:
        await asyncio.sleep(PARENT_POLL_S)
    log.warning("parent %d is gone: shutting down", parent)
    stop.set()


def setup_logging(config: GatewayConfig) -> None:
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`HOST[:PORT]=ADDR[:PORT]` flags as GatewayConfig.upstream_overrides; each is checked when the gateway starts."""
    table: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise OverrideError(
                f"--override {item!r}: write HOST[:PORT]=ADDR[:PORT], e.g. api.anthropic.com:443=127.0.0.1:8443"
            )
        table[key.strip()] = value.strip()
    return table


def parse_listen(listen: str) -> tuple[str, int]:
    """`--listen HOST:PORT` (or just PORT) as (host, port)."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) > MAX_PORT:
        raise SetupError(f"--listen {listen!r}: write HOST:PORT, e.g. 127.0.0.1:3128")
    return host.strip("[]") or "127.0.0.1", int(port)


def run_gateway(
    policy: str | Path,
    *,
    listen_host: str = "127.0.0.1",
    port: int = 3128,
    sandbox: str = "default",
    deny_mode: str | None = None,
    audit_path: Path | None = None,
    state_dir: Path | None = None,
    ca_dir: Path | None = None,
    upstream_overrides: dict[str, str] | None = None,
    upstream_ca: Path | None = None,
    tls_profile: str = STRICT,
) -> None:
    """Run in the foreground with one listener (sandbox id `sandbox`) on listen_host:port, whose intercepted
    TLS has profile tls_profile.

    Without state_dir a temporary one is made and removed on exit, except an audit log with
    records in it, which is kept and named. Raises SetupError for a configuration to fix."""
    own_state = state_dir is None
    state = state_dir or Path(tempfile.mkdtemp(prefix="blastradius-gateway-"))
    config = GatewayConfig(
        policy=policy,
        deny_mode=deny_mode,
        audit_path=audit_path or state / "gateway-audit.jsonl",
        state_dir=state,
        ca_dir=ca_dir,
        listen_host=listen_host,
        upstream_overrides=upstream_overrides or {},
        upstream_ca_file=upstream_ca,
    )
    setup_logging(config)
    try:
        run_loop(serve(config, {sandbox: port}, tls_profile=check_profile(tls_profile)))
    finally:
        if own_state:
            _remove_state_dir(state, config.audit_path)


def _remove_state_dir(state: Path, audit_path: Path | None) -> None:
    """Remove a state dir this run made; an audit log in it that holds records stays, and is named."""
    audit = audit_path if audit_path is not None and audit_path.parent == state else None
    if audit is not None and audit.exists() and audit.stat().st_size > 0:
        for path in state.iterdir():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path != audit:
                path.unlink(missing_ok=True)
        print(f"gateway: audit log kept at {audit}", flush=True)
        return
    shutil.rmtree(state, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.gateway", description=__doc__)
    parser.add_argument("--config", type=Path, help="GatewayConfig JSON (used by GatewayProcess)")
    parser.add_argument("--policy", default="balanced", help="preset name or policy YAML path")
    parser.add_argument("--listen", default="127.0.0.1:3128", help="host:port of the single listener")
    parser.add_argument("--sandbox", default="default", help="sandbox id for the single listener")
    parser.add_argument("--deny-mode", choices=["403", "403-explained", "reset"])
    parser.add_argument("--audit", type=Path, help="audit JSONL path")
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--ca-dir", type=Path)
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="HOST[:PORT]=ADDR[:PORT]",
        help="send the TCP connection for HOST[:PORT] to ADDR[:PORT]; policy, keys and TLS checks keep the name",
    )
    parser.add_argument(
        "--upstream-ca", type=Path, metavar="FILE", help="also trust this CA (PEM) when verifying upstream TLS"
    )
    parser.add_argument(
        "--tls-profile",
        choices=TLS_PROFILES,
        default=STRICT,
        help="guest-facing TLS where the gateway intercepts; sha1-compat only for busybox's ssl_client",
    )
    args = parser.parse_args(argv)
    try:
        if args.config is not None:
            config = GatewayConfig.from_json(args.config.read_text())
            setup_logging(config)
            run_loop(serve(config, announce=False))
            return 0
        host, port = parse_listen(args.listen)
        run_gateway(
            args.policy,
            listen_host=host,
            port=port,
            sandbox=args.sandbox,
            deny_mode=args.deny_mode,
            audit_path=args.audit,
            state_dir=args.state_dir,
            ca_dir=args.ca_dir,
            upstream_overrides=parse_overrides(args.override),
            upstream_ca=args.upstream_ca,
            tls_profile=args.tls_profile,
        )
    except SetupError as exc:
        # One line the user can act on, which GatewayProcess also reads back from the log.
        print(f"gateway: {exc}", file=sys.stderr, flush=True)
        return EXIT_SETUP
    return 0
