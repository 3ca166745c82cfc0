"""A request the gateway can see: where it goes, what the policy says, and its forwarding.

On the proxy side a request is plain http in absolute form; inside an intercepted tunnel it is
origin-form or absolute, bound to the CONNECT target either way. The request URI, the Host
header and the tunnel must all name the same host:port, or the request gets 400. Then the
policy decides per method and path, an http_status toxic may answer instead of the upstream,
and forward.py relays the rest with the credential bound to that exact host:port.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import h11

from harness.gateway.context import Context
from harness.gateway.deny import error_answer, raw_response
from harness.gateway.dial import DialError
from harness.gateway.forward import forward
from harness.gateway.layers.answers import deny, toxic_answer
from harness.gateway.names import DEFAULT_PORTS, HostError, parse_authority
from harness.gateway.policy import normalise_path
from harness.gateway.streams import Stream


@dataclass(frozen=True)
class TunnelDest:
    """The CONNECT destination a terminated (intercepted) connection is bound to."""

    host: str
    port: int
    scheme: str


class BadTarget(Exception):
    """The request URI, Host header and tunnel disagree: a 400 with this reason and these audit fields."""

    def __init__(self, reason: str, **fields: object) -> None:
        super().__init__(reason)
        self.fields = fields


def host_header(request: h11.Request) -> bytes | None:
    """The request's Host header; two of them is an error, since they could name two hosts."""
    found = None
    for key, value in request.headers:
        if key == b"host":
            if found is not None:
                raise HostError("duplicate host header")
            found = value
    return found


def split_absolute(target: str, scheme: str) -> tuple[str, int, str]:
    """(host, port, path) of an absolute-form target of this scheme."""
    prefix = scheme + "://"
    if not target.lower().startswith(prefix):
        raise HostError(f"expected a {scheme}:// URL")
    rest = target[len(prefix) :]
    cut = len(rest)
    for sep in "/?#":
        idx = rest.find(sep)
        if idx >= 0:
            cut = min(cut, idx)
    authority, path = rest[:cut], rest[cut:]
    if not path.startswith("/"):
        path = "/" + path
    host, port = parse_authority(authority, DEFAULT_PORTS[scheme])
    return host, port, path


def destination(request: h11.Request, target: str, tunnel: TunnelDest | None) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) the request names. Raises BadTarget, or HostError for a bad name."""
    host_value = host_header(request)
    if tunnel is None:
        lowered = target[:8].lower()
        if not lowered.startswith("http://"):
            if lowered.startswith("https://"):
                raise BadTarget("https URLs must use CONNECT")
            raise BadTarget("not a proxy request (use an absolute http:// URL or CONNECT)")
        scheme = "http"
        host, port, path = split_absolute(target, scheme)
    else:
        scheme = tunnel.scheme
        if target.startswith("/"):
            host, port, path = tunnel.host, tunnel.port, target
        else:
            host, port, path = split_absolute(target, scheme)
            if (host, port) != (tunnel.host, tunnel.port):
                raise BadTarget(
                    "request URI and CONNECT target disagree",
                    host=tunnel.host,
                    port=tunnel.port,
                    rule="target-mismatch",
                    intercepted=True,
                )
    if host_value is not None:
        h_host, h_port = parse_authority(host_value.decode("ascii", "replace"), DEFAULT_PORTS[scheme])
        if (h_host, h_port) != (host, port):
            raise BadTarget(
                "Host header disagrees with the request target",
                host=host,
                port=port,
                rule="target-mismatch",
                intercepted=tunnel is not None,
            )
    elif tunnel is not None:
        raise BadTarget("missing Host header", host=host, port=port)
    return scheme, host, port, path


async def handle_request(
    ctx: Context, conn: h11.Connection, stream: Stream, request: h11.Request, tunnel: TunnelDest | None
) -> bool:
    """Check and forward one request, or answer it in the upstream's place. Returns keep-alive."""
    t0 = time.perf_counter()
    state = ctx.state
    method = request.method.decode("ascii", "replace")
    target = request.target.decode("ascii", "replace")
    try:
        scheme, host, port, path = destination(request, target, tunnel)
        norm_path = normalise_path(path)
    except BadTarget as exc:
        await ctx.refuse(stream, 400, str(exc), method=method, **exc.fields)
        return False
    except HostError as exc:
        await ctx.refuse(stream, 400, str(exc), method=method)
        return False
    intercepted = tunnel is not None
    decision = state.policy.check_request(host, port, method, norm_path)
    if not decision.allowed:
        return await deny(
            ctx,
            conn,
            stream,
            event="request",
            method=method,
            scheme=scheme,
            host=host,
            port=port,
            path=norm_path,
            rule=decision.rule,
            intercepted=intercepted,
        )
    if state.toxics.active and (toxic := state.toxics.http_status(ctx.sandbox, host, port)) is not None:
        return await toxic_answer(
            ctx, conn, stream, toxic, method, scheme, host, port, norm_path, decision.rule, intercepted, t0
        )
    cred = state.credentials.for_dest(host, port)
    ctx.count("allowed", 1)
    fields = dict(
        event="request",
        method=method,
        scheme=scheme,
        host=host,
        port=port,
        path=norm_path,
        rule=decision.rule,
        intercepted=intercepted,
        credential=cred.name if cred is not None and cred.value is not None else None,
        reason="credential-missing-on-host" if cred is not None and cred.value is None else None,
    )
    try:
        ex = await forward(
            conn,
            stream,
            request,
            scheme,
            host,
            port,
            path.encode("ascii"),
            cred,
            ctx.pool,
            ctx.limits.idle_timeout_s,
            ctx.limits.upstream_response_timeout_s,
        )
    except DialError as exc:
        ctx.audit(
            decision="error",
            status=exc.status,
            duration_ms=round((time.perf_counter() - t0) * 1000.0, 3),
            **{**fields, "reason": str(exc)},
        )
        ctx.count("upstream_errors", 1)
        try:
            stream.write(raw_response(error_answer(exc.status, f"blastradius gateway: {exc}")))
            await stream.drain()
        except (ConnectionError, OSError):
            pass
        return False
    except (ConnectionError, OSError, TimeoutError, h11.ProtocolError) as exc:
        # The response had started when one side failed: record it, then drop the connection.
        ctx.audit(
            decision="error",
            duration_ms=round((time.perf_counter() - t0) * 1000.0, 3),
            **{**fields, "reason": f"broken mid-response: {type(exc).__name__}"},
        )
        raise
    ctx.count("bytes_up", ex.bytes_up)
    ctx.count("bytes_down", ex.bytes_down)
    ctx.audit(
        decision="allow",
        status=ex.status,
        bytes_up=ex.bytes_up,
        bytes_down=ex.bytes_down,
        upstream_ms=None if ex.upstream_ms is None else round(ex.upstream_ms, 3),
        duration_ms=round((time.perf_counter() - t0) * 1000.0, 3),
        **fields,
    )
    return True
