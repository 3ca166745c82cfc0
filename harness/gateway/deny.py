"""What a denied request gets back, per deny mode.

403           Docker-compatible text body naming host:port and the rule.
403-explained the same status plus X-Blastradius-Decision (and sandbox-runtime's X-Proxy-Error)
              and a JSON body an agent can parse: it says the block is a policy, not an outage.
reset         no HTTP answer: the connection is reset (RST), failing fast.
The loop breaker's answer is always an HTTP answer, whatever the mode: it exists to be read.
It is 429 by default, or 200 ("200-terminal", see loopbreaker.py) so that a client which retries
every non-2xx stops; either way the headers and JSON body say the block is permanent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from harness.gateway.names import format_authority

DECISION_HEADER = b"x-blastradius-decision"
PROXY_ERROR_HEADER = b"x-proxy-error"
MODE_403 = "403"
MODE_EXPLAINED = "403-explained"
MODE_RESET = "reset"
LOOP_STATUS = 429  # Too Many Requests: the HTTP-correct loop answer
TERMINAL_STATUS = 200  # "200-terminal": ends a loop that only a 2xx ends


@dataclass(frozen=True)
class DenyAnswer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def _header_safe(text: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 and c != ";" else "_" for c in text)


def deny_answer(mode: str, host: str, port: int, rule: str, sandbox: str, reason: str = "") -> DenyAnswer:
    """The HTTP answer for a denied request (mode 'reset' is handled by the caller)."""
    where = format_authority(host, port)
    text = f"Blocked by network policy: domain {where} is not allowed (rule: {rule})"
    if reason:
        text += f" ({reason})"
    if mode != MODE_EXPLAINED:
        return DenyAnswer(403, [(b"content-type", b"text/plain; charset=utf-8")], (text + "\n").encode())
    decision = f"deny; rule={_header_safe(rule)}; host={host}; port={port}"
    body = {
        "error": "blocked_by_policy",
        "decision": "deny",
        "host": host,
        "port": port,
        "rule": rule,
        "sandbox": sandbox,
        "permanent": True,
        "retryable": False,
        "message": text + ". This is a policy decision, not a network fault: retrying will not help.",
    }
    if reason:
        body["reason"] = reason
    headers = [
        (b"content-type", b"application/json"),
        (DECISION_HEADER, decision.encode()),
        (PROXY_ERROR_HEADER, b"blocked-by-allowlist"),
    ]
    return DenyAnswer(403, headers, json.dumps(body).encode() + b"\n")


def loop_answer(
    host: str,
    port: int,
    rule: str,
    sandbox: str,
    count: int,
    window_s: float,
    counted: str = "this exact request",
    terminal: bool = False,
) -> DenyAnswer:
    """The breaker's answer: 429, or 200 when `terminal`; headers and body identical either way.
    `counted` says what was denied `count` times (layers/answers.counted_as)."""
    where = format_authority(host, port)
    body = {
        "error": "retry_loop_detected",
        "decision": "deny",
        "host": host,
        "port": port,
        "rule": rule,
        "sandbox": sandbox,
        "permanent": True,
        "retryable": False,
        "message": (
            f"{where} is blocked by network policy (rule: {rule}), and {counted} was denied "
            f"{count} times in {window_s:g}s. The block is permanent: stop retrying and change approach."
        ),
    }
    headers = [
        (b"content-type", b"application/json"),
        (DECISION_HEADER, f"deny; rule={_header_safe(rule)}; host={host}; port={port}; loop=1; permanent".encode()),
        (PROXY_ERROR_HEADER, b"retry-loop-detected"),
    ]
    return DenyAnswer(TERMINAL_STATUS if terminal else LOOP_STATUS, headers, json.dumps(body).encode() + b"\n")


def error_answer(status: int, message: str) -> DenyAnswer:
    return DenyAnswer(status, [(b"content-type", b"text/plain; charset=utf-8")], (message + "\n").encode())


REASONS = {
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    408: b"Request Timeout",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def raw_response(answer: DenyAnswer, close: bool = True) -> bytes:
    """Serialise without h11: used when the connection state is unknown (parse errors, limits)."""
    head = [b"HTTP/1.1 %d %s" % (answer.status, REASONS.get(answer.status, b"Error"))]
    head += [k + b": " + v for k, v in answer.headers]
    head.append(b"content-length: %d" % len(answer.body))
    if close:
        head.append(b"connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + answer.body
