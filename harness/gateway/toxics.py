"""Toxics: Toxiproxy-style faults injected inside the gateway, switched on and off at run time.

The vocabulary is Toxiproxy's so users recognise it:

    latency     {latency, jitter}                    ms added to every chunk (jitter: +/- uniform)
    bandwidth   {rate}                               KB/s (1 KB = 1024 B), paced in 100 ms slices
    slow_close  {delay}                              ms held before a close is passed on
    timeout     {timeout}                            data dropped; the connection closed after
                                                     `timeout` ms (0: held for ever, until removed)
    reset_peer  {timeout}                            the connection reset (RST) `timeout` ms after
                                                     the toxic first sees data on it (0: at once)
    slicer      {average_size, size_variation, delay} chunks cut into ~average_size-byte slices,
                                                     `delay` microseconds apart
    limit_data  {bytes}                              the connection closed once `bytes` have passed

each with `toxicity` (the probability a connection is affected, rolled once per connection as
Toxiproxy does) and `stream`: `upstream` (sandbox -> upstream) or `downstream` (upstream ->
sandbox). Two more that act at the HTTP level rather than on bytes:

    http_status {status, retry_after}                the upstream "answers" this status (429 with
                                                     Retry-After, 5xx) without being asked
    down        {}                                   the gateway is down: the sandbox's listener is
                                                     closed (connection refused) and its open
                                                     connections are cut; removing it re-listens on
                                                     the same port

A toxic is scoped to one upstream (`upstream: host` or `host:port`), one sandbox (`sandbox: id`),
both, or neither (everything).

Where they act: a blind CONNECT tunnel runs both directions through `Link`s in tunnel.relay; a
request the gateway forwards (plain http, or inside terminated TLS) talks to its upstream through
`ToxicStream`, which plays the upstream direction on drain() and the downstream on read(). So
`timeout`/`limit_data` close and `reset_peer` resets the sandbox's connection too, as a
transparent proxy would. The hot path pays one attribute check per chunk while no toxic exists.

Toxics live only in the gateway's memory: a control `toxic_clear`, SIGUSR1, or the gateway's exit
removes them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

UPSTREAM = "upstream"
DOWNSTREAM = "downstream"
STREAMS = (UPSTREAM, DOWNSTREAM)

# Byte-level toxics (they act on a connection's data) and their attributes with defaults.
STREAM_TOXICS: dict[str, dict[str, float]] = {
    "latency": {"latency": 0.0, "jitter": 0.0},
    "bandwidth": {"rate": 0.0},
    "slow_close": {"delay": 0.0},
    "timeout": {"timeout": 0.0},
    "reset_peer": {"timeout": 0.0},
    "slicer": {"average_size": 0.0, "size_variation": 0.0, "delay": 0.0},
    "limit_data": {"bytes": 0.0},
}
HTTP_STATUS = "http_status"
DOWN = "down"
HTTP_STATUS_DEFAULTS: dict[str, Any] = {"status": 503, "retry_after": None}
TOXIC_TYPES = (*STREAM_TOXICS, HTTP_STATUS, DOWN)

KIB = 1024
MS = 1 / 1000
US = 1 / 1_000_000
# Toxiproxy's bandwidth toxic writes in 100 ms slices; so do we, so pacing looks the same.
BANDWIDTH_SLICE_S = 0.1
# How often a held close looks again whether its timeout toxic is still there.
HOLD_POLL_S = 0.05
# A slicer with no average size would loop for ever on 0-byte slices.
MIN_SLICE_BYTES = 1


class ToxicError(ValueError):
    """A toxic description that cannot be applied."""


@dataclass
class Toxic:
    """One fault. `upstream` / `sandbox` scope it; None means any."""

    name: str
    type: str
    stream: str = DOWNSTREAM
    toxicity: float = 1.0
    attributes: dict[str, Any] = field(default_factory=dict)
    upstream: str | None = None
    sandbox: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Toxic:
        kind = str(data.get("type", ""))
        if kind not in TOXIC_TYPES:
            raise ToxicError(f"unknown toxic type {kind!r}; one of {', '.join(TOXIC_TYPES)}")
        stream = str(data.get("stream", DOWNSTREAM))
        if stream not in STREAMS:
            raise ToxicError(f"stream must be upstream or downstream, not {stream!r}")
        toxicity = float(data.get("toxicity", 1.0))
        if not 0.0 <= toxicity <= 1.0:
            raise ToxicError("toxicity is a probability in [0, 1]")
        given = dict(data.get("attributes") or {})
        defaults: dict[str, Any] = (
            STREAM_TOXICS.get(kind) or (HTTP_STATUS_DEFAULTS if kind == HTTP_STATUS else {})  # type: ignore[assignment]
        )
        unknown = set(given) - set(defaults)
        if unknown:
            raise ToxicError(f"{kind} has no attribute(s) {sorted(unknown)}; it takes {sorted(defaults)}")
        attributes = {**defaults, **given}
        for key, value in attributes.items():
            if value is not None and (not isinstance(value, int | float) or value < 0):
                raise ToxicError(f"{kind}.{key} must be a non-negative number")
        if kind == HTTP_STATUS and not 100 <= int(attributes["status"]) <= 599:
            raise ToxicError("http_status.status must be an HTTP status code")
        if kind == DOWN and data.get("upstream"):
            raise ToxicError("'down' takes the gateway down for sandboxes; it cannot be scoped to an upstream")
        scope = data.get("scope") or {}
        upstream = data.get("upstream", scope.get("upstream"))
        sandbox = data.get("sandbox", scope.get("sandbox"))
        name = str(data.get("name") or f"{kind}_{stream}")
        return cls(
            name=name,
            type=kind,
            stream=stream,
            toxicity=toxicity,
            attributes=attributes,
            upstream=str(upstream).lower().rstrip(".") if upstream else None,
            sandbox=str(sandbox) if sandbox else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def matches(self, sandbox: str, host: str | None, port: int | None) -> bool:
        if self.sandbox is not None and self.sandbox != sandbox:
            return False
        if self.upstream is None:
            return True
        if host is None:
            return False
        want_host, sep, want_port = self.upstream.rpartition(":")
        if sep and want_port.isdigit():
            return want_host == host and int(want_port) == port
        return self.upstream == host


@dataclass
class Plan:
    """What to do with one chunk: send these (delay before, bytes) pieces, then maybe end."""

    pieces: list[tuple[float, bytes]]
    then: str | None = None  # "close" | "reset"


CLOSE = "close"
RESET = "reset"


class ToxicRegistry:
    """The gateway's toxics. `active` is the only thing the hot path looks at."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.toxics: dict[str, Toxic] = {}
        self.version = 0
        self.active = False
        self.applied: Counter[str] = Counter()
        """Connections (or requests, for http_status) each toxic acted on."""
        self.rng = rng or random.Random()
        self._uids = itertools.count(1)
        self._uid: dict[str, int] = {}

    def _changed(self) -> None:
        self.version += 1
        self.active = bool(self.toxics)

    def add(self, toxic: Toxic) -> Toxic:
        if toxic.name in self.toxics:
            raise ToxicError(f"a toxic named {toxic.name!r} already exists")
        self.toxics[toxic.name] = toxic
        # A fresh uid per addition, so a re-added toxic is rolled again on live connections.
        self._uid[toxic.name] = next(self._uids)
        self._changed()
        return toxic

    def remove(self, name: str) -> Toxic | None:
        toxic = self.toxics.pop(name, None)
        self._uid.pop(name, None)
        if toxic is not None:
            self._changed()
        return toxic

    def clear(self) -> list[Toxic]:
        gone = list(self.toxics.values())
        self.toxics.clear()
        self._uid.clear()
        self._changed()
        return gone

    def uid(self, name: str) -> int:
        return self._uid.get(name, 0)

    def snapshot(self) -> dict[str, Any]:
        return {"active": [t.to_dict() for t in self.toxics.values()], "applied": dict(self.applied)}

    def roll(self, toxic: Toxic) -> bool:
        return toxic.toxicity >= 1.0 or self.rng.random() < toxic.toxicity

    # ---- HTTP-level toxics ---------------------------------------------------------------
    def http_status(self, sandbox: str, host: str, port: int) -> Toxic | None:
        """The http_status toxic answering this request instead of the upstream, if any."""
        for toxic in self.toxics.values():
            if toxic.type == HTTP_STATUS and toxic.matches(sandbox, host, port) and self.roll(toxic):
                self.applied[toxic.name] += 1
                return toxic
        return None

    def down_sandboxes(self, all_sandboxes: list[str]) -> set[str]:
        """Sandboxes whose listener a `down` toxic keeps closed."""
        down: set[str] = set()
        for toxic in self.toxics.values():
            if toxic.type == DOWN:
                down.update(s for s in all_sandboxes if toxic.sandbox in (None, s))
        return down

    # ---- byte-level toxics ---------------------------------------------------------------
    def links(self, sandbox: str, host: str | None, port: int | None, ends: list[Closable]) -> tuple[Link, Link]:
        """The (upstream, downstream) links of one proxied connection between `ends`."""
        ctl = ConnControl(ends)
        return Link(self, ctl, sandbox, host, port, UPSTREAM), Link(self, ctl, sandbox, host, port, DOWNSTREAM)


class Closable(Protocol):
    def abort_with_reset(self) -> None: ...

    def close(self) -> None: ...


class ConnControl:
    """Both ends of one proxied connection, so a toxic can close or reset it as a whole."""

    def __init__(self, ends: list[Closable]) -> None:
        self.ends = ends
        self.ended: str | None = None
        self._timers: set[asyncio.Task[None]] = set()

    def reset(self) -> None:
        if self.ended is None:
            self.ended = RESET
        for end in self.ends:
            with contextlib.suppress(Exception):
                end.abort_with_reset()

    def close(self) -> None:
        if self.ended is None:
            self.ended = CLOSE
        for end in self.ends:
            with contextlib.suppress(Exception):
                end.close()

    def later(self, delay_s: float, action: Callable[[], None]) -> None:
        async def fire() -> None:
            await asyncio.sleep(delay_s)
            action()

        task = asyncio.ensure_future(fire())
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)

    def cancel_timers(self) -> None:
        for task in list(self._timers):
            task.cancel()


class Link:
    """One direction of one connection: turns each chunk into a Plan under the live toxics."""

    __slots__ = (
        "_limited",
        "_rolled",
        "_timed",
        "_toxics",
        "_version",
        "ctl",
        "direction",
        "host",
        "port",
        "registry",
        "sandbox",
    )

    def __init__(
        self,
        registry: ToxicRegistry,
        ctl: ConnControl,
        sandbox: str,
        host: str | None,
        port: int | None,
        direction: str,
    ) -> None:
        self.registry = registry
        self.ctl = ctl
        self.sandbox = sandbox
        self.host = host
        self.port = port
        self.direction = direction
        self._limited: dict[int, int] = {}  # limit_data uid -> bytes it has let through so far
        self._version = -1
        self._toxics: list[Toxic] = []
        self._rolled: dict[int, bool] = {}  # toxic uid -> does it affect this connection
        self._timed: set[int] = set()  # uids whose timer (timeout / reset_peer) is already set

    def current(self) -> list[Toxic]:
        reg = self.registry
        if reg.version != self._version:
            self._version = reg.version
            chosen = []
            for toxic in reg.toxics.values():
                if toxic.type not in STREAM_TOXICS or toxic.stream != self.direction:
                    continue
                if not toxic.matches(self.sandbox, self.host, self.port):
                    continue
                uid = reg.uid(toxic.name)
                if uid not in self._rolled:
                    self._rolled[uid] = reg.roll(toxic)
                    if self._rolled[uid]:
                        reg.applied[toxic.name] += 1
                if self._rolled[uid]:
                    chosen.append(toxic)
            self._toxics = chosen
        return self._toxics

    async def before_close(self) -> None:
        """Hold a close (EOF) in this direction: slow_close's delay, and for as long as a timeout
        toxic swallows the data (its own timer, or its removal, ends the wait)."""
        if not self.registry.active:
            return
        delay = sum(t.attributes["delay"] for t in self.current() if t.type == "slow_close") * MS
        if delay:
            await asyncio.sleep(delay)
        while self.ctl.ended is None and any(t.type == "timeout" for t in self.current()):
            await asyncio.sleep(HOLD_POLL_S)

    def plan(self, data: bytes) -> Plan:
        """How `data` goes on. Pure bookkeeping, no I/O, except scheduling timeout/reset timers."""
        toxics = self.current() if self.registry.active else []
        if not toxics:
            return Plan([(0.0, data)])
        rng = self.registry.rng
        then: str | None = None
        delay = 0.0
        for toxic in toxics:
            attrs = toxic.attributes
            uid = self.registry.uid(toxic.name)
            if toxic.type == "timeout":
                if attrs["timeout"] > 0 and uid not in self._timed:
                    self._timed.add(uid)
                    self.ctl.later(attrs["timeout"] * MS, self.ctl.close)
                return Plan([])  # data goes nowhere while the toxic is on
            if toxic.type == "reset_peer":
                if attrs["timeout"] <= 0:
                    return Plan([], RESET)
                if uid not in self._timed:
                    self._timed.add(uid)
                    self.ctl.later(attrs["timeout"] * MS, self.ctl.reset)
            elif toxic.type == "limit_data":
                # Counted from the moment the toxic is on, like Toxiproxy's per-toxic state.
                allowed = max(0, int(attrs["bytes"]) - self._limited.get(uid, 0))
                if len(data) >= allowed:
                    data, then = data[:allowed], CLOSE
            elif toxic.type == "latency":
                jitter = attrs["jitter"]
                delay += max(0.0, attrs["latency"] + (rng.uniform(-jitter, jitter) if jitter else 0.0)) * MS
        for toxic in toxics:
            if toxic.type == "limit_data":
                uid = self.registry.uid(toxic.name)
                self._limited[uid] = self._limited.get(uid, 0) + len(data)
        pieces = [(delay, data)] if data else []
        for toxic in toxics:
            if toxic.type == "bandwidth" and toxic.attributes["rate"] > 0:
                pieces = _pace(pieces, toxic.attributes["rate"] * KIB)
            elif toxic.type == "slicer" and toxic.attributes["average_size"] > 0:
                pieces = _slice(pieces, toxic.attributes, rng)
        if then is None and delay and not pieces:
            pieces = [(delay, b"")]
        return Plan(pieces, then)


def _pace(pieces: list[tuple[float, bytes]], rate_bps: float) -> list[tuple[float, bytes]]:
    """Cut into 100 ms worth of bytes each, each waiting for its own transmission time."""
    step = max(MIN_SLICE_BYTES, int(rate_bps * BANDWIDTH_SLICE_S))
    out: list[tuple[float, bytes]] = []
    for delay, data in pieces:
        first = True
        for i in range(0, len(data), step):
            piece = data[i : i + step]
            out.append(((delay if first else 0.0) + len(piece) / rate_bps, piece))
            first = False
    return out


def _slice(pieces: list[tuple[float, bytes]], attrs: dict[str, Any], rng: random.Random) -> list[tuple[float, bytes]]:
    average, variation, gap = int(attrs["average_size"]), int(attrs["size_variation"]), attrs["delay"] * US
    out: list[tuple[float, bytes]] = []
    for delay, data in pieces:
        i = 0
        first = True
        while i < len(data):
            size = max(MIN_SLICE_BYTES, average + (rng.randint(-variation, variation) if variation else 0))
            # The gap also goes before the first slice of a read, as Toxiproxy sleeps after every slice:
            # without it a short read (a response head) and the next slice leave back to back.
            out.append((delay + gap if first else gap, data[i : i + size]))
            i += size
            first = False
    return out


async def send_plan(
    plan: Plan, write: Callable[[bytes], None], drain: Callable[[], Awaitable[None]], ctl: ConnControl
) -> bool:
    """Play a plan onto a writer. False when the connection has been ended by a toxic."""
    for delay, piece in plan.pieces:
        if delay > 0:
            await drain()  # what was sent before this piece must leave before the wait
            await asyncio.sleep(delay)
        if ctl.ended:
            return False
        if piece:
            write(piece)
    if plan.then == RESET:
        ctl.reset()
        return False
    if plan.then == CLOSE:
        await drain()
        ctl.close()
        return False
    return ctl.ended is None


class ToxicStream:
    """An upstream connection of the forwarding path with the toxics in its way.

    Writes are held until drain() (forward.py always drains a request before it waits for the
    answer), then played through the upstream link; reads come out of the downstream link one
    piece at a time, so pacing and slicing reach the sandbox as they would through Toxiproxy.
    """

    def __init__(self, inner: Any, up: Link, down: Link) -> None:
        self.inner = inner
        self.reader = inner.reader
        self.writer = inner.writer
        self.up = up
        self.down = down
        self._held = bytearray()
        self._queue: deque[tuple[float, bytes]] = deque()
        self._then: str | None = None

    # PlainStream's interface ---------------------------------------------------------------
    def push_back(self, data: bytes) -> None:
        self._queue.appendleft((0.0, data))

    def write(self, data: bytes) -> None:
        if self._held or self.up.registry.active:
            self._held += data
        else:
            self.inner.write(data)

    def write_buffered(self) -> int:
        return len(self._held) + int(self.inner.write_buffered())

    async def drain(self) -> None:
        if self._held:
            data, self._held = bytes(self._held), bytearray()
            if not await send_plan(self.up.plan(data), self.inner.write, self.inner.drain, self.up.ctl):
                raise ConnectionResetError(f"toxic ended the connection ({self.up.ctl.ended})")
        await self.inner.drain()

    async def read(self, n: int = 0) -> bytes:
        if not self._queue and self._then is None and not self.down.registry.active:
            return await (self.inner.read(n) if n else self.inner.read())  # no toxic anywhere
        while True:
            if self._queue:
                delay, piece = self._queue.popleft()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.down.ctl.ended == RESET:
                    raise ConnectionResetError("toxic reset the connection")
                if piece:
                    return piece
                continue
            if self._then == RESET or self.down.ctl.ended == RESET:
                self.down.ctl.reset()
                raise ConnectionResetError("toxic reset the connection")
            if self._then == CLOSE or self.down.ctl.ended == CLOSE:
                self.down.ctl.close()
                return b""
            data = await (self.inner.read(n) if n else self.inner.read())
            if not data:
                await self.down.before_close()
                return b""
            plan = self.down.plan(data)
            self._queue.extend(plan.pieces)
            self._then = plan.then

    def abort_with_reset(self) -> None:
        self.inner.abort_with_reset()

    def close(self) -> None:
        self.up.ctl.cancel_timers()
        self.inner.close()
