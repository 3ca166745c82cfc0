"""The conformance client: sends one case's bytes to an egress and says what it saw."""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from .canaries import printable

READ_TIMEOUT_S = 1.5
"""The longest a case waits for an answer; a proxy silent longer has 'timeout' as its outcome."""
MAX_ANSWER_BYTES = 256 * 1024


@dataclass
class Seen:
    """What the client saw."""

    outcome: str
    """2xx, 3xx, 4xx, 5xx, reset (RST), closed (no status line), timeout, tls-error, or dns: answer / refused / ..."""
    status: int = 0
    answer: bytes = b""
    tunnel: bool = False
    """CONNECT answered 2xx."""
    inner: str | None = None
    """Outcome inside the tunnel."""
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["answer"] = printable(self.answer[:800])
        return data


def outcome_of(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "closed"


def status_of(answer: bytes) -> int:
    parts = answer.split(b"\r\n", 1)[0].split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() and parts[0].startswith(b"HTTP/") else 0


def read_answer(sock: socket.socket, deadline: float, head_only: bool = False) -> tuple[bytes, str]:
    """Bytes of one answer (head, and its Content-Length body unless head_only) and how reading ended."""
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, "timeout"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, "timeout"
        except ConnectionResetError:
            return data, "reset"
        except ssl.SSLError as exc:
            return data, f"tls-error:{exc.reason}"
        except OSError as exc:
            return data, f"error:{exc.strerror}"
        if not chunk:
            return data, "closed"
        data += chunk
        if len(data) > MAX_ANSWER_BYTES:
            return data, "complete"
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            continue
        if head_only:
            return data, "complete"
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length" and value.strip().isdigit():
                length = int(value.strip())
        if length is not None and len(body) >= length:
            return data, "complete"


def seen_from(data: bytes, ended: str) -> Seen:
    status = status_of(data)
    if status:
        return Seen(outcome_of(status), status, data)
    if ended in ("reset", "timeout") or ended.startswith("tls-error"):
        return Seen(ended.split(":")[0], 0, data, detail=ended)
    return Seen("closed", 0, data, detail=ended)


def exchange(proxy: tuple[str, int], raw: bytes, timeout: float = READ_TIMEOUT_S) -> Seen:
    """One plain proxy request on a fresh connection."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection(proxy, timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(raw)
            data, ended = read_answer(sock, deadline)
            return seen_from(data, ended)
    except ConnectionRefusedError:
        return Seen("reset", detail="connection refused by the proxy")
    except OSError as exc:
        return Seen("reset", detail=str(exc))


def tunnel(
    proxy: tuple[str, int],
    head: bytes,
    inner: bytes,
    sni: str | None,
    tls: bool,
    trust: ssl.SSLContext,
    timeout: float = READ_TIMEOUT_S,
) -> Seen:
    """CONNECT `head`; if the tunnel opens, `inner` through it (inside TLS with server_hostname `sni` when tls)."""
    deadline = time.monotonic() + timeout * 2
    try:
        with socket.create_connection(proxy, timeout=timeout) as sock:
            sock.sendall(head)
            data, ended = read_answer(sock, time.monotonic() + timeout, head_only=True)
            seen = seen_from(data, ended)
            if seen.outcome != "2xx":
                return seen
            seen.tunnel = True
            stream: socket.socket = sock
            if tls:
                sock.settimeout(timeout)
                try:
                    stream = trust.wrap_socket(sock, server_hostname=sni or None)
                except (ssl.SSLError, OSError, ValueError, UnicodeError) as exc:
                    seen.inner = "tls-error"
                    seen.detail = f"{type(exc).__name__}: {exc}"[:300]
                    return seen
            if not inner:
                seen.inner = "open"
                return seen
            with contextlib.suppress(OSError):
                stream.sendall(inner)
            body, ended = read_answer(stream, deadline)
            inner_seen = seen_from(body, ended)
            seen.inner = inner_seen.outcome
            seen.answer = data + b"--- inside the tunnel ---\r\n" + body
            return seen
    except ConnectionRefusedError:
        return Seen("reset", detail="connection refused by the proxy")
    except OSError as exc:
        return Seen("reset", detail=str(exc))


def dns_query(port: int, name: bytes, qtype: int = 1, timeout: float = READ_TIMEOUT_S) -> Seen:
    """One UDP query to a policy-gated resolver on loopback: answer (with addresses), refused, or another rcode."""
    ident = random.randrange(65536)
    labels = b"".join(bytes([len(part)]) + part for part in name.rstrip(b".").split(b".")) + b"\0"
    query = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + struct.pack(">HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(query, ("127.0.0.1", port))
            answer, _ = sock.recvfrom(4096)
        except TimeoutError:
            return Seen("timeout")
        except OSError as exc:
            return Seen("reset", detail=str(exc))
    rcode = answer[3] & 0x0F if len(answer) >= 4 else -1
    count = struct.unpack(">H", answer[6:8])[0] if len(answer) >= 8 else 0
    if rcode == 0 and count:
        return Seen("answer", 0, answer, detail=f"{count} answers")
    return Seen({0: "empty", 3: "nxdomain", 5: "refused"}.get(rcode, f"rcode-{rcode}"), 0, answer)


def concurrent(proxy: tuple[str, int], raw: bytes, count: int) -> Seen:
    """`count` connections at once, each sending `raw`; the worst outcome among them (any 2xx first)."""
    with ThreadPoolExecutor(max_workers=count) as pool:
        seen = list(pool.map(lambda _: exchange(proxy, raw), range(count)))
    order = ["2xx", "3xx", "timeout", "closed", "reset", "5xx", "4xx"]
    worst = min(seen, key=lambda s: order.index(s.outcome) if s.outcome in order else 0)
    worst.detail = " ".join(f"{o}:{sum(1 for s in seen if s.outcome == o)}" for o in sorted({s.outcome for s in seen}))
    return worst


def slow(proxy: tuple[str, int], raw: bytes, pieces: int, pause: float) -> Seen:
    """`raw` sent in `pieces` with `pause` seconds between them (slow headers)."""
    step = max(1, len(raw) // pieces)
    deadline = time.monotonic() + pieces * pause + READ_TIMEOUT_S
    try:
        with socket.create_connection(proxy, timeout=READ_TIMEOUT_S) as sock:
            for i in range(0, len(raw), step):
                try:
                    sock.sendall(raw[i : i + step])
                except OSError:
                    break
                time.sleep(pause)
            data, ended = read_answer(sock, deadline)
            return seen_from(data, ended)
    except OSError as exc:
        return Seen("reset", detail=str(exc))
