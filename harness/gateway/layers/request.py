"""A request the gateway can see: where it goes, what the policy says, and its forwarding.

On the proxy side a request is plain http in absolute form; inside an intercepted tunnel it is
origin-form or absolute, bound to the CONNECT target either way. The request URI, the Host
header and the tunnel must all name the same host:port, or the request gets 400. The path is
normalised once, and that path is what the policy checks, what is sent and what is audited (a
fragment never goes upstream). A request carrying a key the gateway holds, toward anywhere but
that key's own host, is denied as credential_exfiltration. Then the policy decides per method and
path; a credential goes only into TLS the gateway verified itself (plain http to its host is sent on
as https) and never into a method that echoes; an http_status toxic may answer instead of the
upstream; and forward.py relays the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import h11

from harness.gateway.context import Context
from harness.gateway.deny import error_answer, raw_response
from harness.gateway.dial import DialError
from harness.gateway.exfil import EXFIL_EVENT, EXFIL_RULE, Forms, KeyLeak
from harness.gateway.forward import Route, forward
from harness.gateway.layers.answers import RequestFields, deny, toxic_answer
from harness.gateway.names import DEFAULT_PORTS, HostError, format_authority, parse_authority
from harness.gateway.policy import normalise_path
from harness.gateway.streams import Stream

INJECT_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})
"""The methods a key is injected into. TRACE (and IIS's TRACK) send the request, key and all, back
to the sender; an extension method's meaning is unknown to the gateway, so it might too."""
METHOD_RULE = "credential-method"
"""The rule named when a credential's host is sent a method outside INJECT_METHODS."""


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


def split_target(target: str) -> tuple[str, str]:
    """(path, "?query" or "") of an origin-form target. A fragment is dropped: it is the client's
    own business (RFC 9110 §7.1), and an upstream that kept `#` in the path would read a path
    the policy never checked."""
    path, sep, query = target.split("#", 1)[0].partition("?")
    return path, sep + query


def host_value(host: str, port: int, scheme: str) -> bytes:
    """The Host header sent upstream: the normalised destination, its port only when not the default."""
    if port == DEFAULT_PORTS[scheme]:
        return (f"[{host}]" if ":" in host else host).encode("ascii")
    return format_authority(host, port).encode("ascii")


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
    ctx: Context,
    conn: h11.Connection,
    stream: Stream,
    request: h11.Request,
    head: bytes,
    tunnel: TunnelDest | None,
) -> bool:
    """Check and forward one request (`head`: its raw bytes), or answer it in the upstream's place.
    Returns keep-alive."""
    t0 = time.perf_counter()
    state = ctx.state
    method = request.method.decode("ascii", "replace")
    target = request.target.decode("ascii", "replace")
    try:
        scheme, host, port, raw_path = destination(request, target, tunnel)
        path, query = split_target(raw_path)
        norm_path = normalise_path(path)
    except BadTarget as exc:
        await ctx.refuse(stream, 400, str(exc), method=method, **exc.fields)
        return False
    except HostError as exc:
        await ctx.refuse(stream, 400, str(exc), method=method)
        return False
    intercepted = tunnel is not None
    cred = state.credentials.for_dest(host, port)
    # A key travels only inside TLS the gateway verified itself (upstream_tls: certificate and name).
    # Plain http to a credential's host is therefore sent on as https, the way HSTS upgrades a URL
    # (RFC 6797 §8.3: port 80 becomes 443, another port stays): the sandbox's leg never holds the
    # key, and the network's leg never carries it in the clear.
    up_scheme, up_port = scheme, port
    if cred is not None and scheme != "https":
        up_scheme, up_port = "https", DEFAULT_PORTS["https"] if port == DEFAULT_PORTS["http"] else port
    fields = RequestFields(method=method, scheme=scheme, host=host, port=port, path=norm_path, intercepted=intercepted)
    leak_forms: Forms | None = None
    if state.keys:
        leak_forms = state.keys.foreign(host, port, up_scheme == "https")
        form = state.keys.find_in_name(host)
        where = "host name"
        if form is None and leak_forms is not None:
            form, where = leak_forms.find(head), "request head"
        if form is not None:
            return await _exfiltration(ctx, conn, stream, KeyLeak(form, where), fields)
    decision = state.policy.check_request(host, port, method, norm_path)
    if not decision.allowed:
        return await deny(ctx, conn, stream, event="request", rule=decision.rule, **fields)
    if cred is not None and request.method not in INJECT_METHODS:
        reason = f"{method} is not sent to a credential's host: it could echo the key back"
        return await deny(ctx, conn, stream, event="request", rule=METHOD_RULE, reason=reason, **fields)
    if state.toxics.active and (toxic := state.toxics.http_status(ctx.sandbox, host, port)) is not None:
        return await toxic_answer(
            ctx, conn, stream, toxic, method, scheme, host, port, norm_path, decision.rule, intercepted, t0
        )
    ctx.count("allowed", 1)
    injected = cred is not None and cred.value is not None
    reason = None
    if cred is not None and cred.value is None:
        reason = "credential-missing-on-host"
    elif up_scheme != scheme:
        reason = f"sent upstream as https to port {up_port}: a key travels only inside verified TLS"
    record = dict(
        event="request",
        rule=decision.rule,
        credential=cred.name if injected else None,
        reason=reason,
        **fields,
    )
    route = Route(
        scheme=up_scheme,
        host=host,
        port=up_port,
        target=(norm_path + query).encode("ascii"),
        authority=host_value(host, up_port, up_scheme),
        cred=cred,
        leak_forms=leak_forms,
        scrub_forms=state.keys.own(host, port) if injected else None,
    )
    try:
        ex = await forward(
            conn, stream, request, route, ctx.pool, ctx.limits.idle_timeout_s, ctx.limits.upstream_response_timeout_s
        )
    except KeyLeak as leak:
        return await _exfiltration(ctx, None, stream, leak, fields)
    except DialError as exc:
        ctx.audit(
            decision="error",
            status=exc.status,
            duration_ms=round((time.perf_counter() - t0) * 1000.0, 3),
            **{**record, "reason": str(exc)},
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
            **{**record, "reason": f"broken mid-response: {type(exc).__name__}"},
        )
        raise
    ctx.count("bytes_up", ex.bytes_up)
    ctx.count("bytes_down", ex.bytes_down)
    if ex.redactions:
        ctx.count("answer_redactions", ex.redactions)
    ctx.audit(
        decision="allow",
        status=ex.status,
        bytes_up=ex.bytes_up,
        bytes_down=ex.bytes_down,
        upstream_ms=None if ex.upstream_ms is None else round(ex.upstream_ms, 3),
        duration_ms=round((time.perf_counter() - t0) * 1000.0, 3),
        upstream_addr=ex.upstream_addr,
        **record,
    )
    return True


async def _exfiltration(
    ctx: Context, conn: h11.Connection | None, stream: Stream, leak: KeyLeak, fields: RequestFields
) -> bool:
    """Deny a request that carries a key away from its host; audited as credential_exfiltration with the
    credential's name (never its value). Found in the body, the request is half sent: the connection ends."""
    ctx.count("credential_exfiltration", 1)
    reason = f"request carries {leak}: a key goes only to its own host"
    return await deny(
        ctx,
        conn,
        stream,
        event=EXFIL_EVENT,
        rule=EXFIL_RULE,
        reason=reason,
        credential=leak.form.credential,
        **fields,
    )
