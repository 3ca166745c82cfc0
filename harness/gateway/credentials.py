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

from harness.gateway.errors import SetupError, check_keys
from harness.gateway.names import MAX_PORT, HostError, normalise_host

log = logging.getLogger(__name__)

SENTINEL = "proxy-managed"
SECRET_COMMAND_TIMEOUT_S = 10.0
# Secrets shorter than this are refused: the audit scrubber could not tell them from noise.
MIN_SECRET_LEN = 8


class CredentialError(SetupError):
    """A credential that cannot be set up (bad spec, unusable secret); its message names the fix."""


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
    def from_dict(cls, data: dict[str, Any], where: str = "credential") -> CredentialSpec:
        """Every key checked (a misspelt `heder:` is an error naming `header`), every value typed."""
        check_keys(data, cls.__dataclass_fields__, where, CredentialError)
        for required in ("name", "host", "header"):
            if not isinstance(data.get(required), str) or not data[required]:
                raise CredentialError(f"{where}: {required} must be a non-empty string, got {data.get(required)!r}")
        port = data.get("port", 443)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= MAX_PORT:
            raise CredentialError(f"{where}: port must be a number 1-65535, got {port!r}")
        sources = [k for k in ("env", "file", "command") if data.get(k) is not None]
        if len(sources) != 1:
            raise CredentialError(f"{where}: give exactly one of env, file or command for the secret, got {sources}")
        for key in ("template", *sources):
            if key in data and not isinstance(data[key], str):
                raise CredentialError(f"{where}: {key} must be a string, got {data[key]!r}")
        if "{secret}" not in data.get("template", "{secret}"):
            raise CredentialError(f"{where}: template must contain {{secret}}, got {data['template']!r}")
        return cls(**data)


DEFAULT_CREDENTIALS: tuple[CredentialSpec, ...] = (
    CredentialSpec("anthropic", "api.anthropic.com", "x-api-key", env="ANTHROPIC_API_KEY"),
    CredentialSpec("openai", "api.openai.com", "authorization", template="Bearer {secret}", env="OPENAI_API_KEY"),
)


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
        raise CredentialError(
            f"credential {spec.name}: the secret in {_source(spec)} is {len(value)} characters, shorter than "
            f"{MIN_SECRET_LEN}: set it to the full key, or unset it to run without this credential"
        )
    if any(c in value for c in "\r\n\0"):
        raise CredentialError(
            f"credential {spec.name}: the secret in {_source(spec)} contains a line break or NUL: "
            "set it to the key alone"
        )
    return value


def _source(spec: CredentialSpec) -> str:
    """Where a secret came from, as the user would name it: $VAR, the file or the command."""
    if spec.env:
        return f"${spec.env}"
    return f"file {spec.file}" if spec.file else f"the output of `{spec.command}`"


@dataclass(frozen=True)
class BoundCredential:
    name: str
    header: bytes
    value: bytes | None  # None: configured but no secret on this host; the sentinel is still stripped


class CredentialStore:
    """Credentials by exact (host, port). Lookup is a dict hit on the hot path."""

    def __init__(self, specs: list[CredentialSpec] | tuple[CredentialSpec, ...]) -> None:
        self._by_dest: dict[tuple[str, int], BoundCredential] = {}
        self._keys: list[tuple[str, str, tuple[str, int]]] = []
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
                self._keys.append((spec.name, secret, (host, spec.port)))
            else:
                log.warning("credential %s: no secret found on the host", spec.name)
            self._by_dest[(host, spec.port)] = BoundCredential(spec.name, spec.header.lower().encode("ascii"), value)

    def for_dest(self, host: str, port: int) -> BoundCredential | None:
        return self._by_dest.get((host, port))

    def keys(self) -> list[tuple[str, str, tuple[str, int]]]:
        """(name, secret, bound host:port) of every secret present, for exfil.KnownKeys only."""
        return list(self._keys)

    def names(self) -> list[str]:
        return sorted(c.name for c in self._by_dest.values())


def inject(headers: list[tuple[bytes, bytes]], cred: BoundCredential) -> list[tuple[bytes, bytes]]:
    """Replace whatever the sandbox put in the credential's header (the sentinel) with the key."""
    out = [(k, v) for k, v in headers if k.lower() != cred.header]
    if cred.value is not None:
        out.append((cred.header, cred.value))
    return out
