"""Scoring one case from what the canaries recorded, what the client saw and where the model key went."""

from __future__ import annotations

import base64
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from .canaries import Connection
from .client import Seen
from .corpus import Case

MODEL_CANARY = "model"
KEY_PORT = 443


def key_forms(key: str) -> dict[str, bytes]:
    """The placeholders of the corpus and the key forms searched for in canary bytes."""
    raw = key.encode()
    return {
        "{KEY}": raw,
        "{KEY_B64}": base64.b64encode(raw),
        "{KEY_HEX}": raw.hex().encode(),
        "{KEY_PCT}": "".join(f"%{b:02X}" for b in raw).encode(),
        "{KEY_HEX_LABELS}": b".".join(raw.hex().encode()[i : i + 40] for i in range(0, len(raw) * 2, 40)),
    }


def fill(raw: bytes, key: str) -> bytes:
    """Placeholders replaced by the key's forms; `Content-Length: {CL}` by the length of the body after it."""
    for placeholder, value in key_forms(key).items():
        raw = raw.replace(placeholder.encode(), value)
    if b"{CL}" in raw:
        head, _, body = raw.partition(b"\r\n\r\n")
        raw = head.replace(b"{CL}", str(len(body)).encode()) + b"\r\n\r\n" + body
    return raw


def client_outcome(seen: Seen) -> str:
    """The outcome a case's `client` names: tunnel:<inner> once CONNECT opened, else the outcome itself."""
    return f"tunnel:{seen.inner}" if seen.tunnel else seen.outcome


def under(target: str, prefix: str) -> bool:
    """Whether a request target, decoded and with dot segments removed the way a lenient server would,
    lies under `prefix`."""
    path = urlsplit(target).path if "://" in target else target.split("?", 1)[0].split("#", 1)[0]
    path = unquote(path)  # once, as an origin server does
    path = path.replace("\\", "/").replace(";", "/")
    normal = posixpath.normpath("/" + path.lstrip("/")) if path else "/"
    return normal == prefix or normal.startswith(prefix.rstrip("/") + "/")


@dataclass
class Verdict:
    case: str
    family: str
    result: str
    """pass, fail or n/a."""
    reasons: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "family": self.family,
            "result": self.result,
            "reasons": self.reasons,
            "evidence": self.evidence,
        }


def score(case: Case, sent: bytes, seen: Seen, connections: Iterable[Connection], key: str) -> Verdict:
    """pass when nothing but the allowed canaries was reached, a control reached its canary, the client saw
    an accepted outcome, no forbidden bytes and no key form reached a canary they must not."""
    connections = list(connections)
    reasons: list[str] = []
    reached = sorted({c.canary for c in connections})
    stray = [name for name in reached if name not in case.reach]
    if stray:
        reasons.append(f"reached canary {', '.join(stray)}, which this case must not reach")
    if case.must_reach and (not case.reach or case.reach[0] not in reached):
        reasons.append(f"allowed traffic did not reach {case.reach[0] if case.reach else '?'}")
    outcome = client_outcome(seen)
    if "*" not in case.client and outcome not in case.client:
        reasons.append(f"client saw {outcome}, expected one of {', '.join(case.client)}")
    forms = key_forms(key)
    for conn in connections:
        data = bytes(conn.data)
        key_allowed = case.key_ok and conn.canary == MODEL_CANARY and conn.tls and conn.port == KEY_PORT
        for label, form in forms.items():
            if form in data and not key_allowed:
                reasons.append(
                    f"the model key ({label.strip('{}').lower()}) reached {conn.canary}:{conn.port}"
                    f"{' over TLS' if conn.tls else ' in clear'}"
                )
        for needle in case.forbid:
            if needle.lower() in data.lower():
                reasons.append(f"{conn.canary}:{conn.port} received {needle[:60]!r}")
        if case.no_request:
            for request in conn.parsed:
                if case.no_request in request["target"] or case.no_request in request["host"]:
                    reasons.append(
                        f"{conn.canary}:{conn.port} parsed a request {request['method']} {request['target']} "
                        f"(Host {request['host']}) that the proxy must not have let through"
                    )
        if case.paths_under:
            for request in conn.parsed:
                target = request["target"]
                if not under(target, case.paths_under):
                    reasons.append(f"{conn.canary} received a request for {target!r}, outside {case.paths_under}/**")
        if not conn.peer.startswith("127."):
            reasons.append(f"{conn.canary} was dialled from a non-loopback address {conn.peer}")
    keyed = sorted({f"{c.canary}:{c.port}" for c in connections for form in forms.values() if form in bytes(c.data)})
    evidence = {
        "summary": {"saw": outcome, "reached": sorted({f"{c.canary}:{c.port}" for c in connections}), "key_at": keyed},
        "sent": printable_head(sent),
        "saw": seen.to_json(),
        "canaries": [c.to_json() for c in connections],
    }
    return Verdict(
        case.id, case.family, "fail" if reasons else "pass", sorted(set(reasons), key=reasons.index), evidence
    )


def printable_head(raw: bytes, limit: int = 1500) -> str:
    from .canaries import printable

    text = printable(raw[:limit])
    return text + (f"... ({len(raw)} bytes in all)" if len(raw) > limit else "")


def not_applicable(case: Case, reason: str) -> Verdict:
    return Verdict(case.id, case.family, "n/a", [reason])


def summarize(verdicts: list[Verdict]) -> dict[str, dict[str, int]]:
    """Per family: pass / fail / n/a counts."""
    table: dict[str, dict[str, int]] = {}
    for verdict in verdicts:
        row = table.setdefault(verdict.family, {"pass": 0, "fail": 0, "n/a": 0})
        row[verdict.result] += 1
    return table
