"""Answers the gateway gives in the upstream's place: a policy deny and an http_status toxic.

Both go out on the kept-alive h11 connection when the request's body is small enough to read
and drop, else raw with the connection closed. A CONNECT (no h11 connection to keep) always
gets the raw, closing answer.
"""

from __future__ import annotations

import time

import h11

from harness.gateway.context import Context
from harness.gateway.deny import MODE_RESET, REASONS, DenyAnswer, deny_answer, loop_answer, raw_response
from harness.gateway.forward import next_event
from harness.gateway.loopbreaker import ANSWER_200_TERMINAL, LoopVerdict
from harness.gateway.streams import Stream
from harness.gateway.toxics import Toxic

DENY_DRAIN_LIMIT = 64 * 1024
"""A denied request's body is read and dropped up to this size so the connection can be kept."""


async def deny(
    ctx: Context,
    conn: h11.Connection | None,
    stream: Stream,
    *,
    event: str,
    method: str,
    scheme: str | None,
    host: str,
    port: int,
    path: str | None,
    rule: str,
    intercepted: bool = False,
    reason: str | None = None,
) -> bool:
    """Answer a denied request per deny mode / loop breaker. Returns keep-alive."""
    state = ctx.state
    ctx.count("denied", 1)
    key = (ctx.sandbox, method, scheme or "", host, str(port), path or "")
    verdict = state.breaker.observe_denied(key)
    mode = state.deny_mode
    fields = dict(
        method=method,
        scheme=scheme,
        host=host,
        port=port,
        path=path,
        rule=rule,
        intercepted=intercepted,
        reason=reason,
    )
    answer: DenyAnswer
    if verdict is not LoopVerdict.UNDER:
        ctx.count("loop_blocks", 1)
        # A 200 to CONNECT would open a tunnel, not explain anything: CONNECT always gets 429.
        terminal = conn is not None and state.effective_loop_answer() == ANSWER_200_TERMINAL
        answer = loop_answer(
            host, port, rule, ctx.sandbox, state.breaker.threshold, state.breaker.window_s, terminal=terminal
        )
        if verdict is LoopVerdict.TRIPPED:
            ctx.audit(event="retry_loop_detected", decision="deny", deny_mode=mode, status=answer.status, **fields)
    elif mode == MODE_RESET:
        ctx.audit(event=event, decision="deny", deny_mode=mode, **fields)
        stream.abort_with_reset()
        return False
    else:
        answer = deny_answer(mode, host, port, rule, ctx.sandbox, reason or "")
    ctx.audit(event=event, decision="deny", deny_mode=mode, status=answer.status, **fields)
    return await _send(ctx, conn, stream, answer)


async def toxic_answer(
    ctx: Context,
    conn: h11.Connection | None,
    stream: Stream,
    toxic: Toxic,
    method: str,
    scheme: str | None,
    host: str,
    port: int,
    path: str | None,
    rule: str,
    intercepted: bool,
    t0: float,
) -> bool:
    """An http_status toxic answers in the upstream's place (429 + Retry-After, 5xx). Audited
    as an error with the toxic's name, so chaos traffic is never mistaken for a real answer."""
    status = int(toxic.attributes["status"])
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"x-blastradius-toxic", toxic.name.encode())]
    if toxic.attributes.get("retry_after") is not None:
        headers.append((b"retry-after", str(int(toxic.attributes["retry_after"])).encode()))
    answer = DenyAnswer(status, headers, f"blastradius toxic {toxic.name}: upstream answered {status}\n".encode())
    ctx.count("toxic_answers", 1)
    ctx.audit(
        event="connect" if conn is None else "request",
        decision="error",
        method=method,
        scheme=scheme,
        host=host,
        port=port,
        path=path,
        rule=rule,
        status=status,
        intercepted=intercepted,
        reason=f"toxic:{toxic.name}",
        duration_ms=round((time.perf_counter() - t0) * 1000.0, 3),
    )
    return await _send(ctx, conn, stream, answer)


async def _send(ctx: Context, conn: h11.Connection | None, stream: Stream, answer: DenyAnswer) -> bool:
    """Write the answer, keeping the connection when h11 can frame it. Returns keep-alive."""
    if conn is None or not await _drain_request(ctx, conn, stream):
        stream.write(raw_response(answer, close=True))
        await stream.drain()
        return False
    headers = [*answer.headers, (b"content-length", str(len(answer.body)).encode())]
    phrase = REASONS.get(answer.status, b"")
    stream.write(conn.send(h11.Response(status_code=answer.status, headers=headers, reason=phrase)))
    stream.write(conn.send(h11.Data(data=answer.body)))
    stream.write(conn.send(h11.EndOfMessage()))
    await stream.drain()
    return True


async def _drain_request(ctx: Context, conn: h11.Connection, stream: Stream) -> bool:
    """Read and drop a small request body; False if it is too big to bother."""
    dropped = 0
    while True:
        event = await next_event(conn, stream, ctx.limits.idle_timeout_s)
        if isinstance(event, h11.EndOfMessage):
            return True
        if isinstance(event, h11.Data):
            dropped += len(event.data)
            if dropped > DENY_DRAIN_LIMIT:
                return False
        else:
            return False
