"""The CONNECT layer: check the target, ask the policy, then relay blindly or hand over to interception.

An allowed destination with no credential and no method/path rule gets a byte-for-byte tunnel
(tunnel.relay, never decrypted); one the gateway must see into is answered 200 and its inside
goes to intercept.py. The target and any Host header must name the same host:port.
"""

from __future__ import annotations

import time

import h11

from harness.gateway.context import Context
from harness.gateway.deny import error_answer, raw_response
from harness.gateway.dial import DialError, open_upstream
from harness.gateway.exfil import EXFIL_EVENT, EXFIL_RULE, KeyLeak
from harness.gateway.forward import NoDescriptors, next_event, peer_address
from harness.gateway.layers.answers import deny, toxic_answer
from harness.gateway.layers.http1 import ConnectRequest
from harness.gateway.layers.intercept import intercept
from harness.gateway.layers.request import host_header
from harness.gateway.names import HostError, parse_authority
from harness.gateway.tunnel import relay

CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


async def serve_connect(ctx: Context, connect: ConnectRequest) -> None:
    """Take over the sandbox's connection from the CONNECT that ended its HTTP/1 layer."""
    t0 = time.perf_counter()
    stream = ctx.client
    conn = connect.conn
    target = connect.request.target.decode("ascii", "replace")
    try:
        host, port = parse_authority(target, None)
        host_value = host_header(connect.request)
        if host_value is not None:
            h_host, h_port = parse_authority(host_value.decode("ascii", "replace"), port)
            if (h_host, h_port) != (host, port):
                await ctx.refuse(
                    stream,
                    400,
                    "CONNECT target and Host header disagree",
                    method="CONNECT",
                    host=host,
                    port=port,
                    rule="target-mismatch",
                )
                return
    except HostError as exc:
        await ctx.refuse(stream, 400, f"bad CONNECT target: {exc}", method="CONNECT")
        return
    event = await next_event(conn, stream, ctx.limits.idle_timeout_s)
    if not isinstance(event, h11.EndOfMessage):
        await ctx.refuse(stream, 400, "CONNECT with a body", method="CONNECT", host=host, port=port)
        return
    state = ctx.state
    if state.keys and (form := state.keys.find_in_name(host)) is not None:
        # A key in the name leaves through the host's resolver before any byte is relayed.
        ctx.count("credential_exfiltration", 1)
        await deny(
            ctx,
            None,
            stream,
            event=EXFIL_EVENT,
            method="CONNECT",
            scheme=None,
            host=host,
            port=port,
            path=None,
            rule=EXFIL_RULE,
            reason=f"the target carries {KeyLeak(form, 'host name')}: a key goes only to its own host",
            credential=form.credential,
        )
        return
    decision = state.policy.check_destination(host, port)
    if not decision.allowed:
        await deny(
            ctx,
            None,
            stream,
            event="connect",
            method="CONNECT",
            scheme=None,
            host=host,
            port=port,
            path=None,
            rule=decision.rule,
        )
        return
    cred = state.credentials.for_dest(host, port)
    leftover = conn.trailing_data[0]
    if decision.needs_requests or cred is not None:
        stream.write(CONNECT_ESTABLISHED)
        await stream.drain()
        if leftover:
            stream.push_back(leftover)
        await intercept(ctx, host, port, decision.rule, t0)
        return
    await _blind_tunnel(ctx, host, port, decision.rule, leftover, t0)


async def _blind_tunnel(ctx: Context, host: str, port: int, rule: str, leftover: bytes, t0: float) -> None:
    """Dial the upstream, answer 200, and relay bytes both ways until both directions end."""
    stream = ctx.client
    state = ctx.state
    if state.toxics.active and (toxic := state.toxics.http_status(ctx.sandbox, host, port)) is not None:
        # The gateway cannot speak inside a blind tunnel: the toxic answers the CONNECT itself.
        await toxic_answer(ctx, None, stream, toxic, "CONNECT", None, host, port, None, rule, False, t0)
        return
    if not ctx.take_fd():
        await _dial_failed(ctx, NoDescriptors(), host, port, rule)
        return
    try:
        upstream = await open_upstream(host, port, state.overrides, ctx.limits.connect_timeout_s)
    except DialError as exc:
        ctx.give_fd()
        await _dial_failed(ctx, exc, host, port, rule)
        return
    except BaseException:
        ctx.give_fd()
        raise
    upstream_ms = (time.perf_counter() - t0) * 1000.0
    addr = peer_address(upstream)
    ctx.count("allowed", 1)
    ctx.count("tunnels", 1)
    counter = [0, 0]
    try:
        stream.write(CONNECT_ESTABLISHED)
        if leftover:
            upstream.write(leftover)
            counter[0] += len(leftover)
        await relay(
            stream,
            upstream,
            ctx.limits.tunnel_idle_timeout_s,
            counter,
            state.toxics.links(ctx.sandbox, host, port, [stream, upstream]),
        )
    except (ConnectionError, OSError, TimeoutError):
        pass
    finally:
        upstream.close()
        ctx.give_fd()
        ctx.count("bytes_up", counter[0])
        ctx.count("bytes_down", counter[1])
        ctx.audit(
            event="connect",
            decision="allow",
            method="CONNECT",
            host=host,
            port=port,
            rule=rule,
            status=200,
            bytes_up=counter[0],
            bytes_down=counter[1],
            upstream_ms=round(upstream_ms, 3),
            duration_ms=round((time.perf_counter() - t0) * 1000.0, 3),
            upstream_addr=addr,
        )


async def _dial_failed(ctx: Context, exc: DialError, host: str, port: int, rule: str) -> None:
    """The upstream of a tunnel could not be reached: 502 (504 on timeout) instead of the 200."""
    ctx.count("upstream_errors", 1)
    ctx.audit(
        event="connect",
        decision="error",
        method="CONNECT",
        scheme=None,
        host=host,
        port=port,
        rule=rule,
        status=exc.status,
        reason=str(exc),
    )
    try:
        ctx.client.write(raw_response(error_answer(exc.status, f"blastradius gateway: {exc}")))
        await ctx.client.drain()
    except (ConnectionError, OSError):
        pass
