"""Entry points: the gateway daemon (`python -m harness.gateway --config FILE`, used by
process.GatewayProcess) and a foreground runner for `invoke gateway --policy FILE`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from harness.gateway.audit import ScrubFilter
from harness.gateway.config import GatewayConfig
from harness.gateway.control import ControlServer, toxic_op
from harness.gateway.server import Gateway

log = logging.getLogger("harness.gateway")

READY_FILE = "ready.json"
CONTROL_SOCKET = "control.sock"
# AF_UNIX paths are limited to 108 bytes; longer state dirs get a short private dir instead.
MAX_UNIX_PATH = 100
PARENT_POLL_S = 1.0


def control_socket_path(state_dir: Path) -> Path:
    path = state_dir / CONTROL_SOCKET
    if len(str(path)) <= MAX_UNIX_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix="brgw-")) / CONTROL_SOCKET


async def serve(config: GatewayConfig, sandboxes: dict[str, int] | None = None, announce: bool = True) -> None:
    """Run the gateway until SIGTERM/SIGINT or a control `shutdown`."""
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
        listener = await gw.add_sandbox(sandbox, port)
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
            print(f"gateway: sandbox {sandbox} -> http://{config.listen_host}:{port}", flush=True)
        print(f"gateway: CA certificate {gw.state.ca.ca_dir / 'ca.pem'}; control {control.path}", flush=True)
    watchdog = asyncio.ensure_future(_exit_with_parent(config, stop))
    try:
        await stop.wait()
    finally:
        watchdog.cancel()
        control.close()
        await gw.close()


async def _exit_with_parent(config: GatewayConfig, stop: asyncio.Event) -> None:
    """A managed gateway stops when the harness that started it dies, even by SIGKILL."""
    parent = os.getppid()
    if not config.exit_with_parent or parent == 1:
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
) -> None:
    """Run in the foreground with one listener (sandbox id `sandbox`) on listen_host:port."""
    state = state_dir or Path(tempfile.mkdtemp(prefix="blastradius-gateway-"))
    config = GatewayConfig(
        policy=policy,
        deny_mode=deny_mode,
        audit_path=audit_path or state / "gateway-audit.jsonl",
        state_dir=state,
        ca_dir=ca_dir,
        listen_host=listen_host,
        upstream_overrides=upstream_overrides or {},
    )
    setup_logging(config)
    asyncio.run(serve(config, {sandbox: port}))


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
        metavar="HOST[:PORT]=IP[:PORT]",
        help="host-side resolution override (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.config is not None:
        config = GatewayConfig.from_json(args.config.read_text())
        setup_logging(config)
        asyncio.run(serve(config, announce=False))
        return 0
    host, _, port = args.listen.rpartition(":")
    overrides = dict(item.split("=", 1) for item in args.override)
    run_gateway(
        args.policy,
        listen_host=host or "127.0.0.1",
        port=int(port),
        sandbox=args.sandbox,
        deny_mode=args.deny_mode,
        audit_path=args.audit,
        state_dir=args.state_dir,
        ca_dir=args.ca_dir,
        upstream_overrides=overrides,
    )
    return 0
