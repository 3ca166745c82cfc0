"""Client for the guest agent (harness/image/guest/br-agent): one command per TCP connection."""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path

from harness.sandbox.base import ExecResult

PROTOCOL = b"BR1"
"""Version tag the agent answers with."""

GUEST_AGENT_PORT = 7000
"""Port the agent listens on inside every sandbox (harness/image/guest/inittab), whatever the backend."""

TRANSPORT_SLACK_S = 5.0
"""Extra host-side wait beyond the command's own timeout, for the trip through slirp."""


def free_port() -> int:
    """An ephemeral loopback port for an agent forward; its user binds it a moment later (a clash is
    retried by the backend)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AgentUnavailable(ConnectionError):
    """Nothing answered the agent protocol (guest still booting, or gone)."""


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _connect(address: int | Path, timeout: float) -> socket.socket:
    """A host loopback port (a VMM's forward, a host listener) or a unix socket (a jail's channel)."""
    if isinstance(address, int):
        return socket.create_connection(("127.0.0.1", address), timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(address))
    except BaseException:
        sock.close()
        raise
    return sock


def agent_exec(
    address: int | Path,
    command: str,
    timeout: float = 30.0,
    stdin: bytes = b"",
    transport_timeout: float | None = None,
) -> ExecResult:
    """Run `command` through the agent behind `address`: a host loopback port or a unix socket path.

    transport_timeout bounds the socket wait; by default the command's timeout plus slack.
    """
    whole_seconds = max(1, int(timeout + 0.999))
    if transport_timeout is None:
        transport_timeout = whole_seconds + TRANSPORT_SLACK_S
    request = b"%s %d %s\n" % (PROTOCOL, whole_seconds, base64.b64encode(command.encode()))
    started = time.monotonic()
    try:
        with _connect(address, transport_timeout) as sock:
            sock.sendall(request + stdin)
            sock.shutdown(socket.SHUT_WR)
            reply = _recv_all(sock)
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise AgentUnavailable(f"agent at {address}: {exc}") from exc
    duration = time.monotonic() - started
    header, sep, body = reply.partition(b"\n")
    fields = header.split()
    if not sep or len(fields) != 5 or fields[0] != PROTOCOL:
        # slirp accepts the host connection before the guest listens, then closes it: no header.
        raise AgentUnavailable(f"agent at {address} gave no valid header: {header[:80]!r}")
    rc, out_len, err_len, timed_out = (int(f) for f in fields[1:])
    if len(body) != out_len + err_len:
        raise AgentUnavailable(f"agent reply truncated: {len(body)} of {out_len + err_len} bytes")
    return ExecResult(
        rc=rc,
        stdout=body[:out_len],
        stderr=body[out_len:],
        duration_s=duration,
        timed_out=bool(timed_out),
    )
