"""One sandbox connection: parse with h11, decide by policy, deny, tunnel, or intercept.

A connection arrives on the listener of one sandbox; that listener is the only identity the
gateway trusts. Requests are either absolute-form http (forwarded), or CONNECT: tunnelled
byte-for-byte, or -- for hosts with credentials or method/path rules -- terminated with a leaf
from the per-install CA so each inner request can be checked and given its credential.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass

import h11

from harness.gateway.audit import AuditRecord
from harness.gateway.deny import (
    MODE_RESET,
    REASONS,
    DenyAnswer,
    deny_answer,
    error_answer,
    loop_answer,
    raw_response,
)
from harness.gateway.dial import DialError, open_upstream
from harness.gateway.forward import ClientGone, UpstreamPool, forward, next_event
from harness.gateway.loopbreaker import ANSWER_200_TERMINAL, LoopVerdict
from harness.gateway.names import DEFAULT_PORTS, HostError, parse_authority
from harness.gateway.policy import normalise_path
from harness.gateway.state import GatewayState
from harness.gateway.streams import PlainStream, Stream, TlsServerStream
from harness.gateway.toxics import Toxic, ToxicStream
from harness.gateway.tunnel import relay

log = logging.getLogger(__name__)

CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
TLS_HANDSHAKE_RECORD = 0x16
# A denied request's body is read and dropped up to this size so the connection can be kept.
DENY_DRAIN_LIMIT = 64 * 1024


@dataclass(frozen=True)
class TunnelDest:
    """The CONNECT destination a terminated (intercepted) connection is bound to."""

    host: str
    port: int
    scheme: str


class HeadTimeout(Exception):
    """A request head started but did not finish in time (slowloris)."""


def add_connect_host(head: bytes) -> bytes:
    """Give a CONNECT without Host one naming its target, so h11 accepts it.

    Locust's FastHttpUser (and other tunnelling clients) send CONNECT with no Host header,
    which HTTP/1.1 requires. The target is the authority either way, so nothing is trusted that
    the request line does not already say.
    """
    line_end = head.find(b"\r\n")
    head_end = head.find(b"\r\n\r\n")
    if line_end < 0 or head_end < 0 or b"\r\nhost:" in head[line_end : head_end + 2].lower():
        return head
    parts = head[:line_end].split(b" ")
    if len(parts) != 3:
        return head
    return head[:line_end] + b"\r\nhost: " + parts[1] + head[line_end:]


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    found = None
    for key, value in headers:
        if key == name:
            if found is not None:
                raise HostError(f"duplicate {name.decode()} header")
            found = value
    return found


class Session:
    def __init__(
        self,
        state: GatewayState,
        sandbox: str,
        conn_id: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.state = state
        self.sandbox = sandbox
        self.conn_id = conn_id
        self.client = PlainStream(reader, writer)
        self.limits = state.limits
        self.counters = state.counters(sandbox)
        self.pool = UpstreamPool(state.overrides, state.upstream_tls, self.limits.connect_timeout_s, self._toxic_stream)

    def _toxic_stream(self, upstream: PlainStream, host: str, port: int) -> PlainStream:
        """Every forwarded upstream connection runs through the toxics (a no-op while there are none),
        so a toxic switched on mid-run reaches keep-alive connections too."""
        up, down = self.state.toxics.links(self.sandbox, host, port, [self.client, upstream])
        return ToxicStream(upstream, up, down)  # type: ignore[return-value]

    async def run(self) -> None:
        try:
            await self.serve_http(self.client, None)
        except (ConnectionError, OSError, TimeoutError, ssl.SSLError, ClientGone, HeadTimeout):
            pass
        except h11.ProtocolError:
            pass
        except Exception:
            self.count("errors", 1)
            log.exception("sandbox %s conn %d: unexpected error", self.sandbox, self.conn_id)
        finally:
            self.pool.close()
            self.client.close()

    # ---- audit helpers -------------------------------------------------------------------
    def count(self, name: str, n: int = 1) -> None:
        self.state.stats[name] += n
        self.counters[name] += n

    def audit(self, **fields: object) -> None:
        self.state.audit.write(AuditRecord(sandbox=self.sandbox, conn=self.conn_id, **fields))  # type: ignore[arg-type]

    async def refuse(self, stream: Stream, status: int, reason: str, **fields: object) -> None:
        """Malformed or mismatched input: an HTTP error, an audit record, and a closed connection."""
        self.count("refused", 1)
        self.audit(event="refused", decision="deny", status=status, reason=reason, **fields)
        try:
            stream.write(raw_response(error_answer(status, f"blastradius gateway: {reason}")))
            await stream.drain()
        except (ConnectionError, OSError, ssl.SSLError):
            pass

    # ---- the HTTP loop -------------------------------------------------------------------
    async def read_head(self, conn: h11.Connection, stream: Stream, proxy_side: bool) -> h11.Request | None:
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        held = b""  # a CONNECT head held back until complete, to give it a Host header
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                if isinstance(event, h11.Request):
                    return event
                return None  # ConnectionClosed
            if deadline is None:
                timeout = self.limits.idle_timeout_s
            else:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    raise HeadTimeout
            try:
                async with asyncio.timeout(timeout):
                    data = await stream.read()
            except TimeoutError:
                if deadline is None:
                    return None  # idle keep-alive connection: close quietly
                raise HeadTimeout from None
            if deadline is None:
                deadline = loop.time() + self.limits.header_timeout_s
            if proxy_side and conn.their_state is h11.IDLE and (held or data.startswith(b"CONNECT ")):
                held += data
                if b"\r\n\r\n" not in held and data and len(held) <= self.limits.max_header_bytes:
                    continue
                data, held = add_connect_host(held), b""
            conn.receive_data(data)

    async def serve_http(self, stream: Stream, tunnel: TunnelDest | None) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        while True:
            try:
                request = await self.read_head(conn, stream, proxy_side=tunnel is None)
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint in (400, 414, 431) else 400
                await self.refuse(stream, status, f"malformed request: {exc}")
                return
            except HeadTimeout:
                await self.refuse(stream, 408, "request head not received in time")
                return
            if request is None:
                return
            self.count("requests", 1)
            if request.http_version not in (b"1.0", b"1.1"):
                await self.refuse(stream, 505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
                return
            if len(request.target) > self.limits.max_request_line:
                await self.refuse(stream, 414, "request line too long")
                return
            # h11 bounds only a head that arrives in pieces; one that arrives whole is measured here.
            head_bytes = len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)
            if len(request.headers) > self.limits.max_header_count or head_bytes > self.limits.max_header_bytes:
                await self.refuse(stream, 431, "too many header fields")
                return
            if request.method == b"CONNECT":
                if tunnel is not None:
                    await self.refuse(stream, 400, "CONNECT inside a tunnel")
                    return
                await self.handle_connect(conn, stream, request)
                return
            keep = await self.handle_request(conn, stream, request, tunnel)
            if not keep or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    # ---- denies --------------------------------------------------------------------------
    async def deny(
        self,
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
        state = self.state
        self.count("denied", 1)
        key = (self.sandbox, method, scheme or "", host, str(port), path or "")
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
            self.count("loop_blocks", 1)
            # A 200 to CONNECT would open a tunnel, not explain anything: CONNECT always gets 429.
            terminal = conn is not None and state.effective_loop_answer() == ANSWER_200_TERMINAL
            answer = loop_answer(
                host, port, rule, self.sandbox, state.breaker.threshold, state.breaker.window_s, terminal=terminal
            )
            if verdict is LoopVerdict.TRIPPED:
                self.audit(event="retry_loop_detected", decision="deny", deny_mode=mode, status=answer.status, **fields)
        elif mode == MODE_RESET:
            self.audit(event=event, decision="deny", deny_mode=mode, **fields)
            stream.abort_with_reset()
            return False
        else:
            answer = deny_answer(mode, host, port, rule, self.sandbox, reason or "")
        self.audit(event=event, decision="deny", deny_mode=mode, status=answer.status, **fields)
        if conn is None or not await self._drain_request(conn, stream):
            stream.write(raw_response(answer, close=True))
            await stream.drain()
            return False
        headers = [*answer.headers, (b"content-length", str(len(answer.body)).encode())]
        reason = REASONS.get(answer.status, b"")
        stream.write(conn.send(h11.Response(status_code=answer.status, headers=headers, reason=reason)))
        stream.write(conn.send(h11.Data(data=answer.body)))
        stream.write(conn.send(h11.EndOfMessage()))
        await stream.drain()
        return True

    async def _drain_request(self, conn: h11.Connection, stream: Stream) -> bool:
        """Read and drop a small request body; False if it is too big to bother."""
        dropped = 0
        while True:
            event = await next_event(conn, stream, self.limits.idle_timeout_s)
            if isinstance(event, h11.EndOfMessage):
                return True
            if isinstance(event, h11.Data):
                dropped += len(event.data)
                if dropped > DENY_DRAIN_LIMIT:
                    return False
            else:
                return False

    # ---- CONNECT -------------------------------------------------------------------------
    async def handle_connect(self, conn: h11.Connection, stream: Stream, request: h11.Request) -> None:
        t0 = time.perf_counter()
        target = request.target.decode("ascii", "replace")
        try:
            host, port = parse_authority(target, None)
            host_header = _header(list(request.headers), b"host")
            if host_header is not None:
                h_host, h_port = parse_authority(host_header.decode("ascii", "replace"), port)
                if (h_host, h_port) != (host, port):
                    await self.refuse(
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
            await self.refuse(stream, 400, f"bad CONNECT target: {exc}", method="CONNECT")
            return
        event = await next_event(conn, stream, self.limits.idle_timeout_s)
        if not isinstance(event, h11.EndOfMessage):
            await self.refuse(stream, 400, "CONNECT with a body", method="CONNECT", host=host, port=port)
            return
        state = self.state
        decision = state.policy.check_destination(host, port)
        if not decision.allowed:
            await self.deny(
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
            await self.intercept(stream, host, port, decision.rule, leftover, t0)
            return
        await self.blind_tunnel(stream, host, port, decision.rule, leftover, t0)

    async def blind_tunnel(self, stream: Stream, host: str, port: int, rule: str, leftover: bytes, t0: float) -> None:
        assert isinstance(stream, PlainStream)
        state = self.state
        if state.toxics.active and (toxic := state.toxics.http_status(self.sandbox, host, port)) is not None:
            # The gateway cannot speak inside a blind tunnel: the toxic answers the CONNECT itself.
            await self.toxic_answer(None, stream, toxic, "CONNECT", None, host, port, None, rule, False, t0)
            return
        try:
            upstream = await open_upstream(host, port, state.overrides, self.limits.connect_timeout_s)
        except DialError as exc:
            await self._upstream_failed(stream, exc, "connect", "CONNECT", None, host, port, rule)
            return
        upstream_ms = (time.perf_counter() - t0) * 1000.0
        self.count("allowed", 1)
        self.count("tunnels", 1)
        counter = [0, 0]
        try:
            stream.write(CONNECT_ESTABLISHED)
            if leftover:
                upstream.write(leftover)
                counter[0] += len(leftover)
            await relay(
                stream.reader,
                stream.writer,
                upstream.reader,
                upstream.writer,
                self.limits.tunnel_idle_timeout_s,
                counter,
                state.toxics.links(self.sandbox, host, port, [stream, upstream]),
            )
        except (ConnectionError, OSError, TimeoutError):
            pass
        finally:
            upstream.close()
            self.count("bytes_up", counter[0])
            self.count("bytes_down", counter[1])
            self.audit(
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
            )

    async def intercept(self, stream: Stream, host: str, port: int, rule: str, leftover: bytes, t0: float) -> None:
        """Terminate the tunnel: TLS with our leaf (SNI must name host), or plain HTTP inside it."""
        assert isinstance(stream, PlainStream)
        state = self.state
        stream.write(CONNECT_ESTABLISHED)
        await stream.drain()
        if leftover:
            stream.push_back(leftover)
        try:
            async with asyncio.timeout(self.limits.tls_handshake_timeout_s):
                first = await stream.read()
        except TimeoutError:
            return
        if not first:
            return
        stream.push_back(first)
        if first[0] != TLS_HANDSHAKE_RECORD:
            self.audit(
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
            await self.serve_http(stream, TunnelDest(host, port, "http"))
            return
        tls = TlsServerStream(stream, state.ca.server_context(host))
        try:
            async with asyncio.timeout(self.limits.tls_handshake_timeout_s):
                await tls.handshake()
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as exc:
            sni = tls.sni
            if sni is None or sni.server_name is None:
                reason = "tls-no-sni"
            elif not sni.ok:
                reason = "tls-sni-mismatch"
            else:
                reason = f"tls-handshake-failed: {type(exc).__name__}"
            self.count("denied" if "sni" in reason else "errors", 1)
            self.audit(
                event="connect",
                decision="deny",
                method="CONNECT",
                scheme="https",
                host=host,
                port=port,
                rule="sni-check" if "sni" in reason else rule,
                intercepted=True,
                reason=reason,
                status=None,
                duration_ms=round((time.perf_counter() - t0) * 1000.0, 3),
            )
            return
        self.count("intercepted", 1)
        self.audit(
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
        )
        try:
            await self.serve_http(tls, TunnelDest(host, port, "https"))
        finally:
            tls.close()

    # ---- requests the gateway can see --------------------------------------------------
    async def handle_request(
        self, conn: h11.Connection, stream: Stream, request: h11.Request, tunnel: TunnelDest | None
    ) -> bool:
        t0 = time.perf_counter()
        state = self.state
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        try:
            host_header = _header(list(request.headers), b"host")
            if tunnel is None:
                lowered = target[:8].lower()
                if not lowered.startswith("http://"):
                    why = (
                        "https URLs must use CONNECT"
                        if lowered.startswith("https://")
                        else "not a proxy request (use an absolute http:// URL or CONNECT)"
                    )
                    await self.refuse(stream, 400, why, method=method)
                    return False
                scheme = "http"
                host, port, path = self._split_absolute(target, scheme)
            else:
                scheme = tunnel.scheme
                if target.startswith("/"):
                    host, port, path = tunnel.host, tunnel.port, target
                else:
                    host, port, path = self._split_absolute(target, scheme)
                    if (host, port) != (tunnel.host, tunnel.port):
                        await self.refuse(
                            stream,
                            400,
                            "request URI and CONNECT target disagree",
                            method=method,
                            host=tunnel.host,
                            port=tunnel.port,
                            rule="target-mismatch",
                            intercepted=True,
                        )
                        return False
            if host_header is not None:
                h_host, h_port = parse_authority(host_header.decode("ascii", "replace"), DEFAULT_PORTS[scheme])
                if (h_host, h_port) != (host, port):
                    await self.refuse(
                        stream,
                        400,
                        "Host header disagrees with the request target",
                        method=method,
                        host=host,
                        port=port,
                        rule="target-mismatch",
                        intercepted=tunnel is not None,
                    )
                    return False
            elif tunnel is not None:
                await self.refuse(stream, 400, "missing Host header", method=method, host=host, port=port)
                return False
            norm_path = normalise_path(path)
        except HostError as exc:
            await self.refuse(stream, 400, str(exc), method=method)
            return False
        intercepted = tunnel is not None
        decision = state.policy.check_request(host, port, method, norm_path)
        if not decision.allowed:
            return await self.deny(
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
        if state.toxics.active and (toxic := state.toxics.http_status(self.sandbox, host, port)) is not None:
            return await self.toxic_answer(
                conn, stream, toxic, method, scheme, host, port, norm_path, decision.rule, intercepted, t0
            )
        cred = state.credentials.for_dest(host, port)
        self.count("allowed", 1)
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
                self.pool,
                self.limits.idle_timeout_s,
                self.limits.upstream_response_timeout_s,
            )
        except DialError as exc:
            self.audit(
                decision="error",
                status=exc.status,
                duration_ms=round((time.perf_counter() - t0) * 1000.0, 3),
                **{**fields, "reason": str(exc)},  # type: ignore[arg-type]
            )
            self.count("upstream_errors", 1)
            try:
                stream.write(raw_response(error_answer(exc.status, f"blastradius gateway: {exc}")))
                await stream.drain()
            except (ConnectionError, OSError):
                pass
            return False
        except (ConnectionError, OSError, TimeoutError, h11.ProtocolError) as exc:
            # The response had started when one side failed: record it, then drop the connection.
            self.audit(
                decision="error",
                duration_ms=round((time.perf_counter() - t0) * 1000.0, 3),
                **{**fields, "reason": f"broken mid-response: {type(exc).__name__}"},  # type: ignore[arg-type]
            )
            raise
        self.count("bytes_up", ex.bytes_up)
        self.count("bytes_down", ex.bytes_down)
        self.audit(
            decision="allow",
            status=ex.status,
            bytes_up=ex.bytes_up,
            bytes_down=ex.bytes_down,
            upstream_ms=None if ex.upstream_ms is None else round(ex.upstream_ms, 3),
            duration_ms=round((time.perf_counter() - t0) * 1000.0, 3),
            **fields,  # type: ignore[arg-type]
        )
        return True

    async def toxic_answer(
        self,
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
        self.count("toxic_answers", 1)
        self.audit(
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
        if conn is None or not await self._drain_request(conn, stream):
            stream.write(raw_response(answer, close=True))
            await stream.drain()
            return False
        headers.append((b"content-length", str(len(answer.body)).encode()))
        stream.write(conn.send(h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, b""))))
        stream.write(conn.send(h11.Data(data=answer.body)))
        stream.write(conn.send(h11.EndOfMessage()))
        await stream.drain()
        return True

    @staticmethod
    def _split_absolute(target: str, scheme: str) -> tuple[str, int, str]:
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

    async def _upstream_failed(
        self,
        stream: Stream,
        exc: DialError,
        event: str,
        method: str,
        scheme: str | None,
        host: str,
        port: int,
        rule: str,
    ) -> None:
        self.count("upstream_errors", 1)
        self.audit(
            event=event,
            decision="error",
            method=method,
            scheme=scheme,
            host=host,
            port=port,
            rule=rule,
            status=exc.status,
            reason=str(exc),
        )
        try:
            stream.write(raw_response(error_answer(exc.status, f"blastradius gateway: {exc}")))
            await stream.drain()
        except (ConnectionError, OSError):
            pass
