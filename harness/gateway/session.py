"""One sandbox connection from accept to close: its protocol layers in order, and what ends it.

    client stream -- layers/http1.py -- each request --> layers/request.py --> forward.py
                          | CONNECT
                          v
                     layers/connect.py -- blind --> tunnel.relay
                          | credential or method/path rules
                          v
                     layers/intercept.py -- TLS or plain HTTP inside --> layers/http1.py (bound to the target)

The HTTP/1 layer hands a CONNECT back here rather than calling the CONNECT layer itself, so the
interception layer can serve HTTP/1 again inside the tunnel without an import cycle.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

import h11

from harness.gateway.context import Context
from harness.gateway.forward import ClientGone
from harness.gateway.layers.connect import serve_connect
from harness.gateway.layers.http1 import serve_http
from harness.gateway.state import GatewayState
from harness.gateway.streams import PlainStream

log = logging.getLogger(__name__)


async def run_session(
    state: GatewayState,
    sandbox: str,
    conn_id: int,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    tls_profile: str,
) -> None:
    """Serve one connection accepted on `sandbox`'s listener (whose guest-facing TLS profile is tls_profile)
    until it ends, then close both sides."""
    ctx = Context(state, sandbox, conn_id, PlainStream(reader, writer), tls_profile)
    try:
        connect = await serve_http(ctx, ctx.client, None)
        if connect is not None:
            await serve_connect(ctx, connect)
    except (ConnectionError, OSError, TimeoutError, ssl.SSLError, ClientGone, h11.ProtocolError):
        pass  # a peer went away, stalled or spoke badly: the connection just ends
    except Exception:
        ctx.count("errors", 1)
        log.exception("sandbox %s conn %d: unexpected error", sandbox, conn_id)
    finally:
        ctx.close()
