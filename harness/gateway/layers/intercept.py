"""TLS interception: terminate a CONNECT tunnel the gateway must see into.

The tunnel's first bytes decide the next layer. A TLS ClientHello is answered with a leaf from
the per-install CA for the CONNECT host, under the guest-facing TLS profile of the listener the
connection came in on (tls.TLS_PROFILES), and its SNI must name that host; anything else is plain
HTTP inside the tunnel. Either way the inner requests go to the HTTP/1 layer, bound to the CONNECT
target, so each can be checked by method and path and given its credential.
"""

from __future__ import annotations

import asyncio
import ssl
import time

from harness.gateway.context import Context
from harness.gateway.layers.http1 import serve_http
from harness.gateway.layers.request import TunnelDest
from harness.gateway.streams import TlsServerStream

TLS_HANDSHAKE_RECORD = 0x16
"""The first byte of a TLS record carrying a handshake (the ClientHello)."""


async def intercept(ctx: Context, host: str, port: int, rule: str, t0: float) -> None:
    """Serve an open tunnel (already answered 200): TLS with our leaf, or plain HTTP inside it."""
    stream = ctx.client
    try:
        async with asyncio.timeout(ctx.limits.tls_handshake_timeout_s):
            first = await stream.read()
    except TimeoutError:
        return
    if not first:
        return
    stream.push_back(first)
    if first[0] != TLS_HANDSHAKE_RECORD:
        ctx.audit(
            event="connect",
            decision="allow",
            method="CONNECT",
            scheme="http",
            host=host,
            port=port,
            rule=rule,
            status=200,
            intercepted=True,
        )
        await serve_http(ctx, stream, TunnelDest(host, port, "http"))
        return
    tls = TlsServerStream(stream, ctx.state.ca.server_context(host, ctx.tls_profile))
    try:
        async with asyncio.timeout(ctx.limits.tls_handshake_timeout_s):
            await tls.handshake()
    except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as exc:
        # No SniResult: the handshake failed before the SNI check ran (OpenSSL picks the version first),
        # so an old protocol is not reported as a missing SNI.
        sni = tls.sni
        sni_refused = False
        if sni is None or sni.ok:
            detail = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else type(exc).__name__
            reason = f"tls-handshake-failed: {detail}"
        else:
            sni_refused = True
            reason = "tls-no-sni" if sni.server_name is None else "tls-sni-mismatch"
        ctx.count("denied" if sni_refused else "errors", 1)
        ctx.audit(
            event="connect",
            decision="deny",
            method="CONNECT",
            scheme="https",
            host=host,
            port=port,
            rule="sni-check" if sni_refused else rule,
            intercepted=True,
            reason=reason,
            tls_profile=ctx.tls_profile,
            status=None,
            duration_ms=round((time.perf_counter() - t0) * 1000.0, 3),
        )
        return
    ctx.count("intercepted", 1)
    ctx.audit(
        event="connect",
        decision="allow",
        method="CONNECT",
        scheme="https",
        host=host,
        port=port,
        rule=rule,
        status=200,
        intercepted=True,
        duration_ms=round((time.perf_counter() - t0) * 1000.0, 3),
        tls_profile=ctx.tls_profile,
    )
    try:
        await serve_http(ctx, tls, TunnelDest(host, port, "https"))
    finally:
        tls.close()
