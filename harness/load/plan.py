"""The plan one Locust run executes: which proxy, which URLs, how hard. Plain JSON.

The harness writes it; the locustfile reads it from `--br-plan` (Locust forwards custom
arguments from the master to every worker, local or remote, when the run starts).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

TRAFFIC_KINDS = ("model", "page", "download", "blocked")
"""model: HTTPS POST JSON through CONNECT (the gateway may intercept and inject the key);
page: plain-http GET of 1 KiB (absolute-form through the proxy: the per-request cost);
download: plain-http GET of a larger body (bandwidth);
blocked: plain-http GET of a host every proxy denies (the deny path)."""

EXPECTED_STATUS = {"model": (200,), "page": (200,), "download": (200,), "blocked": (403,)}
"""What counts as success per kind: for `blocked` the proxy's refusal *is* the answer."""

USER_CLASS = {"model": "ModelUser", "page": "PageUser", "download": "DownloadUser", "blocked": "BlockedUser"}
"""Locust user class per traffic kind (in harness/load/locustfile.py)."""


@dataclass
class Route:
    """How one target of an interleaved plan is reached."""

    proxy: tuple[str, int] | None
    """Loopback proxy address, or None for the direct path."""
    urls: dict[str, str]
    """Traffic kind -> absolute URL."""
    ca_file: str
    """PEM bundle the client verifies TLS against through this target."""
    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    """Traffic kind -> extra request headers."""


@dataclass
class LoadPlan:
    target: str
    """Target name, for labels only."""
    proxy: tuple[str, int] | None
    """Loopback proxy address, or None for the direct path."""
    urls: dict[str, str]
    """Traffic kind -> absolute URL."""
    ca_file: str
    """PEM bundle the client verifies TLS against (upstream CA plus any intercepting proxy's CA)."""
    samples_dir: str
    """Each Locust process appends one CSV line per request here (samples-<pid>.csv)."""
    user_rps: float = 0.0
    """Requests per second per user (constant_throughput); 0 = closed loop, no wait."""
    model_body_bytes: int = 1024
    """Size of the JSON body a model request POSTs."""
    stream: bool = False
    """Model user reads its response as a stream and also reports time to first byte."""
    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    """Traffic kind -> extra request headers (e.g. the credential sentinel)."""
    timeout_s: float = 10.0
    """Socket timeout per request."""
    routes: dict[str, Route] = field(default_factory=dict)
    """Interleaved plans: target -> how to reach it (proxy, urls, ca_file above are then unused)."""
    schedule: list[tuple[float, float, str]] = field(default_factory=list)
    """Interleaved plans: (start, end, target) windows in wall-clock time, in order, back to back; every
    user sends to the target of the window its request starts in, and waits outside the windows."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoadPlan:
        data = json.loads(text)
        data["proxy"] = _address(data.get("proxy"))
        data["routes"] = {
            name: Route(**{**route, "proxy": _address(route.get("proxy"))})
            for name, route in data.get("routes", {}).items()
        }
        data["schedule"] = [(float(a), float(b), str(t)) for a, b, t in data.get("schedule", [])]
        return cls(**data)


def _address(value: list[Any] | tuple[str, int] | None) -> tuple[str, int] | None:
    return None if value is None else (str(value[0]), int(value[1]))
