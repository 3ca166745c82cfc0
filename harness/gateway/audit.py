"""The audit log: one JSONL record per decision, never a secret.

Records carry the credential's *name*. As a second line of defence every line is checked
against the secret values before it is written, and any hit is redacted and counted.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REDACTED = "[REDACTED]"
SCHEMA_VERSION = 1
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
"""One encoder for every record: json.dumps with options builds a new one per call."""


@dataclass
class AuditRecord:
    """One decision. Fields are None where they do not apply (e.g. path of a blind tunnel)."""

    event: str  # connect | request | dns | retry_loop_detected | refused | credential_exfiltration
    sandbox: str
    decision: str  # allow | deny | error
    method: str | None = None
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None
    rule: str | None = None
    deny_mode: str | None = None
    credential: str | None = None
    status: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    upstream_ms: float | None = None
    duration_ms: float | None = None
    intercepted: bool = False
    conn: int | None = None
    reason: str | None = None
    upstream_addr: str | None = None  # address:port the gateway connected to (its socket's peer)
    tls_profile: str | None = None  # the listener's guest-facing TLS profile, on an intercepted TLS connect


class AuditLog:
    def __init__(self, path: Path | None, secrets: list[str]) -> None:
        self.path = path
        self._secrets = [s for s in secrets if s]
        self._fh: IO[str] | None = None
        self.records = 0
        self.redactions = 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Line-buffered: a record is on disk when write() returns, so a SIGKILLed gateway
            # loses nothing and tests can read the file without a flush call.
            self._fh = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def write(self, record: AuditRecord) -> None:
        # Every field is a scalar, so the instance dict is the record; asdict's deep copy was a
        # measurable share of the gateway's time per request.
        data: dict[str, Any] = {"v": SCHEMA_VERSION, "ts": round(time.time(), 6), **vars(record)}
        line = _ENCODER.encode(data)
        line = self.scrub(line)
        self.records += 1
        if self._fh is not None:
            self._fh.write(line + "\n")

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                self.redactions += 1
                text = text.replace(secret, REDACTED)
        return text

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class ScrubFilter(logging.Filter):
    """Redacts secrets from gateway log lines, as the audit log does: belt and braces."""

    def __init__(self, audit: AuditLog) -> None:
        super().__init__()
        self._audit = audit

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = self._audit.scrub(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        if record.exc_info and record.exc_info[1] is not None:
            text = self._audit.scrub(str(record.exc_info[1]))
            if text != str(record.exc_info[1]):
                record.exc_info = None
                record.msg = f"{record.msg} [exception text redacted]"
        return True


def summarise(path: Path) -> dict[str, dict[str, int]]:
    """Decisions per sandbox from an audit log, for results.json and the report's table.

    Keys per sandbox: allow, deny, error, retry_loop_detected, dns_allow, dns_deny,
    intercepted, credential_injections, credential_exfiltration.
    """
    table: dict[str, Counter[str]] = {}
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            counts = table.setdefault(str(rec.get("sandbox")), Counter())
            event = rec.get("event")
            if event == "retry_loop_detected":
                counts["retry_loop_detected"] += 1
                continue
            if event == "dns":
                counts[f"dns_{rec.get('decision')}"] += 1
                continue
            counts[str(rec.get("decision"))] += 1
            if event == "credential_exfiltration":
                counts["credential_exfiltration"] += 1
            if rec.get("intercepted") and event == "connect" and rec.get("decision") == "allow":
                counts["intercepted"] += 1
            if rec.get("credential") and rec.get("decision") == "allow":
                counts["credential_injections"] += 1
    return {sandbox: dict(counts) for sandbox, counts in sorted(table.items())}


class AuditTail:
    """Reads an audit log from where it last stopped, so each step of a scenario sees only its own records; a
    line the gateway is still writing waits for the next read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        """Bytes of whole lines read so far."""

    def new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]


def answer_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    """How many of the records got each answer: the HTTP status, or "reset" where the gateway sent none."""
    answers: dict[str, int] = {}
    for record in records:
        key = "reset" if record.get("status") is None else str(record["status"])
        answers[key] = answers.get(key, 0) + 1
    return answers
