"""The control API: JSON lines over a unix socket that only the host user can open.

Ops: health, add_sandbox {sandbox, port?, tls_profile?} (tls.TLS_PROFILES; default strict),
remove_sandbox {sandbox}, stats, ca_cert, shutdown;
toxics (toxics.py): toxic_add {toxic}, toxic_remove {name}, toxic_clear, toxic_list; and
set_deny {deny_mode?, loop_breaker?, loop_threshold?, loop_window_s?, loop_answer?} to switch the
deny answer and the loop breaker (and its answer, "429" or "200-terminal") between runs without
restarting (the breaker's memory starts afresh; GatewayState.set_deny).
Guests can never reach it: it is not a TCP port, and their only path is their own listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.gateway.server import Gateway
from harness.gateway.tls import STRICT, TlsProfileError
from harness.gateway.toxics import DOWN, Toxic

log = logging.getLogger(__name__)

MAX_CONTROL_LINE = 64 * 1024
CONTROL_TIMEOUT_S = 10.0
TOXIC_OPS = ("toxic_add", "toxic_remove", "toxic_clear", "toxic_list")


class ControlServer:
    def __init__(self, gw: Gateway, path: Path, on_shutdown: Callable[[], None]) -> None:
        self.gw = gw
        self.path = path
        self._on_shutdown = on_shutdown
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self.path.exists():
            self.path.unlink()
        old = os.umask(0o077)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.path), limit=MAX_CONTROL_LINE)
        finally:
            os.umask(old)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                try:
                    request = json.loads(line)
                    reply = await self.dispatch(request)
                except Exception as exc:  # a bad control call must never take the gateway down
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        gw = self.gw
        if op == "health":
            return {"ok": True, "pid": os.getpid(), "sandboxes": sorted(gw.listeners)}
        if op == "add_sandbox":
            try:
                listener = await gw.add_sandbox(
                    str(request["sandbox"]), int(request.get("port", 0)), str(request.get("tls_profile", STRICT))
                )
            except TlsProfileError as exc:
                return {"ok": False, "error": str(exc)}
            return {
                "ok": True,
                "port": listener.port,
                "dns_port": listener.dns.port if listener.dns else None,
                "tls_profile": listener.tls_profile,
            }
        if op == "remove_sandbox":
            return {"ok": True, "removed": await gw.remove_sandbox(str(request["sandbox"]))}
        if op == "stats":
            return {"ok": True, "stats": gw.snapshot_stats()}
        if op == "ca_cert":
            return {"ok": True, "pem": gw.state.ca.cert_pem.decode()}
        if op in TOXIC_OPS:
            return await toxic_op(gw, op, request)
        if op == "set_deny":
            return set_deny(gw, request)
        if op == "shutdown":
            self._on_shutdown()
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}


async def toxic_op(gw: Gateway, op: str, request: dict[str, Any]) -> dict[str, Any]:
    """toxic_add / toxic_remove / toxic_clear / toxic_list; a `down` toxic opens or closes listeners."""
    registry = gw.state.toxics
    if op == "toxic_add":
        toxic = registry.add(Toxic.from_dict(dict(request["toxic"])))
        log.warning("toxic on: %s", toxic.to_dict())
        if toxic.type == DOWN:
            await gw.sync_down()
        return {"ok": True, "toxic": toxic.to_dict()}
    if op == "toxic_remove":
        gone = registry.remove(str(request["name"]))
        if gone is not None:
            log.warning("toxic off: %s", gone.name)
        await gw.sync_down()
        return {"ok": True, "removed": gone is not None}
    if op == "toxic_clear":
        cleared = registry.clear()
        await gw.sync_down()
        return {"ok": True, "removed": [t.name for t in cleared]}
    return {"ok": True, **registry.snapshot()}


def set_deny(gw: Gateway, request: dict[str, Any]) -> dict[str, Any]:
    """Switch the deny settings that the request names; the reply is all of them as they now are."""
    state = gw.state
    mode = request.get("deny_mode")
    enabled = request.get("loop_breaker")
    threshold = request.get("loop_threshold")
    window = request.get("loop_window_s")
    answer = request.get("loop_answer")
    state.set_deny(
        deny_mode=None if mode is None else str(mode),
        loop_breaker=None if enabled is None else bool(enabled),
        loop_threshold=None if threshold is None else int(threshold),
        loop_window_s=None if window is None else float(window),
        loop_answer=None if answer is None else str(answer),
    )
    return {
        "ok": True,
        "deny_mode": state.deny_mode,
        "loop_breaker": state.breaker.enabled,
        "loop_threshold": state.breaker.threshold,
        "loop_window_s": state.breaker.window_s,
        "loop_answer": state.effective_loop_answer(),
    }


def control_call(path: Path, op: str, timeout_s: float = CONTROL_TIMEOUT_S, **args: Any) -> dict[str, Any]:
    """Blocking client for the harness side (no event loop needed)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("gateway control socket closed")
            buf += chunk
    reply: dict[str, Any] = json.loads(buf)
    if not reply.get("ok"):
        raise RuntimeError(f"gateway control {op} failed: {reply.get('error')}")
    return reply
