"""Host-side credentials, bound to one exact host:port, injected only into requests to it.

The sandbox never holds a key: where an agent would put one it holds SENTINEL. The real value
is read on the host (env, file or command) inside the gateway process and only ever written
into the header of a request whose normalised destination equals the credential's host:port.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.gateway.names import HostError, normalise_host

log = logging.getLogger(__name__)

SENTINEL = "proxy-managed"
SECRET_COMMAND_TIMEOUT_S = 10.0
# Secrets shorter than this are refused: the audit scrubber could not tell them from noise.
MIN_SECRET_LEN = 8


@dataclass(frozen=True)
class CredentialSpec:
    """Where a secret comes from and where it may go. Never holds the secret itself."""

    name: str
    host: str
    header: str
    port: int = 443
    template: str = "{secret}"
    env: str | None = None
    file: str | None = None
    command: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CredentialSpec:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


DEFAULT_CREDENTIALS: tuple[CredentialSpec, ...] = (
    CredentialSpec("anthropic", "api.anthropic.com", "x-api-key", env="ANTHROPIC_API_KEY"),
    CredentialSpec("openai", "api.openai.com", "authorization", template="Bearer {secret}", env="OPENAI_API_KEY"),
)


class CredentialError(ValueError):
    pass


def read_secret(spec: CredentialSpec) -> str | None:
    """Read the secret from the host; None when its source is empty or absent."""
    value: str | None = None
    if spec.env:
        value = os.environ.get(spec.env)
    elif spec.file:
        try:
            value = Path(spec.file).expanduser().read_text()
        except OSError:
            value = None
    elif spec.command:
        try:
            out = subprocess.run(
                shlex.split(spec.command),
                capture_output=True,
                text=True,
                timeout=SECRET_COMMAND_TIMEOUT_S,
                check=True,
            )
            value = out.stdout
        except (OSError, subprocess.SubprocessError):
            # The command's output may hold the secret; log only which credential failed.
            log.warning("credential %s: secret command failed", spec.name)
            value = None
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if len(value) < MIN_SECRET_LEN:
        raise CredentialError(f"credential {spec.name}: secret shorter than {MIN_SECRET_LEN} chars")
    if any(c in value for c in "\r\n\0"):
        raise CredentialError(f"credential {spec.name}: secret contains control characters")
    return value


@dataclass(frozen=True)
class BoundCredential:
    name: str
    header: bytes
    value: bytes | None  # None: configured but no secret on this host; the sentinel is still stripped


class CredentialStore:
    """Credentials by exact (host, port). Lookup is a dict hit on the hot path."""

    def __init__(self, specs: list[CredentialSpec] | tuple[CredentialSpec, ...]) -> None:
        self._by_dest: dict[tuple[str, int], BoundCredential] = {}
        self._secrets: list[str] = []
        for spec in specs:
            try:
                host = normalise_host(spec.host)
            except HostError as exc:
                raise CredentialError(f"credential {spec.name}: {exc}") from exc
            if (host, spec.port) in self._by_dest:
                raise CredentialError(f"two credentials for {host}:{spec.port}")
            secret = read_secret(spec)
            value = spec.template.format(secret=secret).encode() if secret else None
            if secret:
                self._secrets.append(secret)
            else:
                log.warning("credential %s: no secret found on the host", spec.name)
            self._by_dest[(host, spec.port)] = BoundCredential(spec.name, spec.header.lower().encode("ascii"), value)

    def for_dest(self, host: str, port: int) -> BoundCredential | None:
        return self._by_dest.get((host, port))

    def secrets(self) -> list[str]:
        """Secret values, for the audit/log scrubber only."""
        return list(self._secrets)

    def names(self) -> list[str]:
        return sorted(c.name for c in self._by_dest.values())


def inject(headers: list[tuple[bytes, bytes]], cred: BoundCredential) -> list[tuple[bytes, bytes]]:
    """Replace whatever the sandbox put in the credential's header (the sentinel) with the key."""
    out = [(k, v) for k, v in headers if k.lower() != cred.header]
    if cred.value is not None:
        out.append((cred.header, cred.value))
    return out
