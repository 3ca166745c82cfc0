"""Honeytokens on the host: a throw-away HOME full of fake secrets, each carrying a unique marker.

Nothing here touches the real user's files. Every marker has the shape
`brht-<run tag>-<token id>-<32 hex>`: the run tag and token id are public (results.json records
them with the marker's SHA-256), the 32 hex digits are the secret part. A guest-side scan greps
for the public prefix plus the shape, so the scan command itself never carries a secret, and any
hit can be checked against the recorded hashes without ever writing the value down.

Planting is recorded in a small manifest under the cache directory before the first file is
written, so a run killed with SIGKILL leaves a note that the next run (or `invoke clean`, via
`sweep_leftovers`) uses to remove what it planted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.paths import cache_dir
from harness.supervisor import pid_alive

MARKER_PREFIX = "brht"
"""Every honeytoken marker starts with this, then the run tag."""
SECRET_HEX_CHARS = 32
"""128 random bits per marker: a hash of it cannot be brute-forced back into the value."""
HOME_PREFIX = "blastradius-honeyhome-"
"""Temporary HOME directories are created with this prefix (what `sweep_leftovers` looks for)."""
MANIFEST_DIR_NAME = "honeytokens"
"""Under the cache dir: one JSON manifest per live planting (no secret values in it)."""
PROJECT_REL = "code/project"
"""The one directory of the fake home that is legitimately 'mounted' into sandboxes."""
HASH_SHOWN_CHARS = 12
"""Hash characters shown in redacted evidence (the full hash is in the honeytoken table)."""
ENV_KEY_NAME = "ANTHROPIC_API_KEY"
"""The host environment variable planted with a fake model-API key (the gateway's credential)."""


def marker_regex(tag: str) -> str:
    """ERE (busybox grep -E and Python re) matching any full marker of run `tag`."""
    return f"{MARKER_PREFIX}-{tag}-[a-z0-9]+-[0-9a-f]{{{SECRET_HEX_CHARS}}}"


ANY_MARKER_RE = re.compile(rf"{MARKER_PREFIX}-[0-9a-f]{{6}}-[a-z0-9]+-[0-9a-f]{{{SECRET_HEX_CHARS}}}")
"""Any full marker of any run: what a clean run directory must not contain."""


KEY_NAME_RE = re.compile(r"(?i)(key|token|secret|passw|credential|auth|session|cookie)")
"""A variable name that suggests its value is a secret."""
KEY_ASSIGNMENT_RE = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)=([^\s\"'\\]+)")
"""NAME=value as env and /proc/*/environ print it (the value stops at whitespace, quotes and backslashes,
so the JSON-escaped form of the same text is caught too)."""
KEY_SHAPES_RE = re.compile(
    r"sk-ant-[A-Za-z0-9_-]{8,}|sk-(?:proj-)?[A-Za-z0-9_-]{20,}|\bA(?:KIA|SIA)[0-9A-Z]{16}\b"
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}|\bxox[abpr]-[A-Za-z0-9-]{10,}|\bglpat-[A-Za-z0-9_-]{20,}"
)
"""Well-known API key formats (Anthropic, OpenAI, AWS, GitHub, Slack, GitLab), wherever they appear."""
HARMLESS_VALUES = frozenset({"proxy-managed", "", "none", "null", "true", "false"})
"""Values of key-named variables that are not secrets (the gateway's sentinel among them)."""
MIN_HOST_SECRET_CHARS = 8
"""A host variable's value shorter than this is not searched for verbatim (it would match everywhere)."""


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def redact_key_values(text: str) -> str:
    """Replace every key value found in `text` by a short hash: values of key-named variables, well-known
    key shapes, and the harness's own key-named environment values wherever they appear. Honeytoken
    markers are redacted before this (see Redactor) and keep their ids."""

    def hashed(value: str) -> str:
        return f"«redacted sha256:{sha256(value)[:HASH_SHOWN_CHARS]}»"

    for name, value in os.environ.items():
        if KEY_NAME_RE.search(name) and len(value) >= MIN_HOST_SECRET_CHARS and value in text:
            text = text.replace(value, hashed(value))

    def assignment(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        if not KEY_NAME_RE.search(name) or value.lower() in HARMLESS_VALUES or value.startswith("«"):
            return match.group(0)
        return f"{name}={hashed(value)}"

    text = KEY_ASSIGNMENT_RE.sub(assignment, text)
    return KEY_SHAPES_RE.sub(lambda m: hashed(m.group(0)), text)


@dataclass(frozen=True)
class Honeytoken:
    """One planted secret. `value` never leaves this process except into the planted place."""

    id: str
    """Short public name, e.g. `ssh` or `kube-prod`; part of the marker."""
    kind: str
    """env, file, process, service."""
    where: str
    """Where it was planted, relative to the fake HOME (or `env:NAME`, `process`, `service:...`)."""
    value: str = field(repr=False)
    secret: bool = True
    """False only for the positive control, which is meant to be found."""

    @property
    def digest(self) -> str:
        return sha256(self.value)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "where": self.where, "sha256": self.digest, "secret": self.secret}


class Redactor:
    """Replaces every known marker (and any marker-shaped string) in evidence by its id and hash."""

    def __init__(self, tag: str, tokens: dict[str, Honeytoken]) -> None:
        self.tag = tag
        self._by_value = {t.value: t for t in tokens.values()}
        self._re = re.compile(marker_regex(tag))

    def identify(self, found: str) -> dict[str, Any]:
        """Which honeytoken a found marker is (by value), without the value."""
        token = self._by_value.get(found)
        return {
            "id": token.id if token else "unknown",
            "sha256": sha256(found),
            "known": token is not None,
            "secret": token.secret if token else True,
        }

    def find(self, text: str) -> list[dict[str, Any]]:
        return [self.identify(m) for m in dict.fromkeys(self._re.findall(text))]

    def __call__(self, text: str) -> str:
        def repl(m: re.Match[str]) -> str:
            info = self.identify(m.group(0))
            return f"«honeytoken {info['id']} sha256:{info['sha256'][:HASH_SHOWN_CHARS]}»"

        text = self._re.sub(repl, text)
        for value, token in self._by_value.items():  # keys embedded in a longer token (sk-ant-...)
            text = text.replace(value, f"«honeytoken {token.id}»")
        return redact_key_values(ANY_MARKER_RE.sub("«honeytoken of another run»", text))


def _manifest_dir() -> Path:
    path = cache_dir() / MANIFEST_DIR_NAME
    path.mkdir(parents=True, exist_ok=True)
    return path


def sweep_leftovers() -> list[str]:
    """Remove fake homes whose planting process is gone (a SIGKILLed run). Returns what was removed."""
    removed: list[str] = []
    for manifest in sorted(_manifest_dir().glob("*.json")):
        try:
            record = json.loads(manifest.read_text())
        except (OSError, ValueError):
            manifest.unlink(missing_ok=True)
            continue
        if pid_alive(int(record.get("pid", 0))):
            continue
        home = Path(record.get("home", ""))
        # Only ever delete what we created: a temp dir with our prefix.
        if home.name.startswith(HOME_PREFIX) and home.exists():
            shutil.rmtree(home, ignore_errors=True)
            removed.append(f"honeytoken home {home} (run {record.get('run_tag')})")
        manifest.unlink(missing_ok=True)
    return removed


class HoneyHome:
    """A temporary HOME with fake ~/.ssh, ~/.aws, ~/.kube, ~/.env, ~/.docker and a project dir."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or secrets.token_hex(3)
        self.tokens: dict[str, Honeytoken] = {}
        self.home: Path | None = None
        self.manifest: Path | None = None
        self._saved_env: dict[str, str | None] = {}

    # ---- markers -------------------------------------------------------------------------
    def new_token(self, token_id: str, kind: str, where: str, secret: bool = True) -> Honeytoken:
        value = f"{MARKER_PREFIX}-{self.tag}-{token_id}-{secrets.token_hex(SECRET_HEX_CHARS // 2)}"
        token = Honeytoken(token_id, kind, where, value, secret)
        self.tokens[token_id] = token
        return token

    def redactor(self) -> Redactor:
        return Redactor(self.tag, self.tokens)

    @property
    def regex(self) -> str:
        return marker_regex(self.tag)

    # ---- planting ------------------------------------------------------------------------
    def plant(self) -> None:
        """Idempotent: a second call does nothing. The manifest is written before any secret."""
        if self.home is not None:
            return
        self.home = Path(tempfile.mkdtemp(prefix=f"{HOME_PREFIX}{self.tag}-"))
        self.manifest = _manifest_dir() / f"{self.tag}.json"
        self.manifest.write_text(
            json.dumps({"pid": os.getpid(), "home": str(self.home), "run_tag": self.tag, "created": time.time()})
        )
        home = self.home
        api_key = self.new_token("envkey", "env", f"env:{ENV_KEY_NAME} (host), ~/.env")
        dotenv = self.new_token("dotenv", "file", ".env")
        other = self.new_token("otherenv", "file", "code/other-service/.env")
        ssh = self.new_token("ssh", "file", ".ssh/id_ed25519")
        aws = self.new_token("aws", "file", ".aws/credentials")
        kube = [self.new_token(f"kube{i}", "file", f".kube/config (context {i})") for i in range(3)]
        dockercfg = self.new_token("dockercfg", "file", ".docker/config.json")
        control = self.new_token("control", "file", f"{PROJECT_REL}/README.md", secret=False)
        files = {
            ".env": f"ANTHROPIC_API_KEY=sk-ant-api03-{api_key.value}\nDATABASE_PASSWORD={dotenv.value}\n",
            "code/other-service/.env": f"STRIPE_SECRET_KEY=sk_live_{other.value}\n",
            ".ssh/id_ed25519": (
                "-----BEGIN OPENSSH PRIVATE KEY-----\n"
                f"b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ{ssh.value}\n"
                "-----END OPENSSH PRIVATE KEY-----\n"
            ),
            ".ssh/id_ed25519.pub": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFake honeytoken@host\n",
            ".aws/credentials": (
                f"[default]\naws_access_key_id = AKIAHONEYTOKEN{self.tag.upper()}\n"
                f"aws_secret_access_key = {aws.value}\n"
            ),
            ".kube/config": _kubeconfig(kube),
            ".docker/config.json": json.dumps({"auths": {"registry.example": {"auth": dockercfg.value}}}),
            f"{PROJECT_REL}/README.md": f"# project\nPositive control for the filesystem scan: {control.value}\n",
        }
        for rel, text in files.items():
            path = home / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            if ".ssh/" in rel or rel.endswith("credentials"):
                path.chmod(0o600)
        self._saved_env[ENV_KEY_NAME] = os.environ.get(ENV_KEY_NAME)
        os.environ[ENV_KEY_NAME] = f"sk-ant-api03-{api_key.value}"

    @property
    def api_key(self) -> str:
        """The full fake key as the host environment holds it (what the gateway injects)."""
        return f"sk-ant-api03-{self.tokens['envkey'].value}"

    @property
    def project(self) -> Path:
        assert self.home is not None
        return self.home / PROJECT_REL

    def host_scan(self) -> dict[str, Any]:
        """Detector self-test: the same regex over the planted home must find every file token."""
        assert self.home is not None
        pattern = re.compile(self.regex)
        found: set[str] = set()
        for path in self.home.rglob("*"):
            if path.is_file():
                found.update(pattern.findall(path.read_text(errors="replace")))
        ids = sorted(self.redactor().identify(v)["id"] for v in found)
        expected = sorted(t.id for t in self.tokens.values() if t.kind in ("file", "env"))
        return {"found": ids, "expected": expected, "ok": set(expected) <= set(ids)}

    def remove(self) -> dict[str, Any]:
        """Undo everything; safe to call more than once and after a partial plant."""
        for name, old in self._saved_env.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        self._saved_env.clear()
        removed = False
        if self.home is not None and self.home.exists():
            shutil.rmtree(self.home, ignore_errors=True)
            removed = not self.home.exists()
        if self.manifest is not None:
            self.manifest.unlink(missing_ok=True)
        return {
            "home_removed": removed,
            "env_restored": os.environ.get(ENV_KEY_NAME, "") != self.api_key if "envkey" in self.tokens else True,
        }


def _kubeconfig(tokens: list[Honeytoken]) -> str:
    names = ["aks-prod-westeurope", "aks-staging", "minikube"]
    contexts = "".join(f"- context: {{cluster: {n}, user: {n}-admin}}\n  name: {n}\n" for n in names)
    clusters = "".join(f"- cluster: {{server: 'https://127.0.0.1:6443'}}\n  name: {n}\n" for n in names)
    users = "".join(f"- name: {n}-admin\n  user: {{token: {t.value}}}\n" for n, t in zip(names, tokens, strict=True))
    return (
        f"apiVersion: v1\nkind: Config\ncurrent-context: {names[0]}\nclusters:\n{clusters}"
        f"contexts:\n{contexts}users:\n{users}"
    )


# ---- host-side traps: services that log every connection ---------------------------------
TRAP_READ_TIMEOUT_S = 1.0
"""How long a trap waits for a request before answering anyway (nc may send nothing)."""
TRAP_MAX_REQUEST = 4096


@dataclass
class TrapHit:
    at: float
    peer: str
    request_head: str
    """First line of what the client sent (never a secret: the guest sends our probe requests)."""


class Trap:
    """A loopback TCP or unix-socket listener that logs every connection and answers with `reply`.

    Ground truth for the reachability probes: a probe that saw nothing but a trap that logged a
    connection is still a leak.
    """

    def __init__(
        self, name: str, reply: bytes, port: int = 0, unix_path: Path | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.name = name
        self.host = host
        """The loopback address it listens on (another than 127.0.0.1 where it stands in for an outside host)."""
        self.reply = reply
        self.hits: list[TrapHit] = []
        self.unix_path = unix_path
        self.requested_port = port
        self.port = 0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.note = ""

    def start(self) -> Trap:
        if self.unix_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.unix_path.parent.mkdir(parents=True, exist_ok=True)
            self.unix_path.unlink(missing_ok=True)
            sock.bind(str(self.unix_path))
        else:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.requested_port))
            except OSError:
                # The well-known port is taken on this host: use a free one and say so.
                self.note = f"{self.host}:{self.requested_port} was taken; using an ephemeral port"
                sock.bind((self.host, 0))
            self.port = sock.getsockname()[1]
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name=f"trap-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def _handle(self, conn: socket.socket, peer: Any) -> None:
        with conn:
            conn.settimeout(TRAP_READ_TIMEOUT_S)
            head = b""
            with contextlib.suppress(OSError):
                while b"\n" not in head and len(head) < TRAP_MAX_REQUEST:
                    chunk = conn.recv(TRAP_MAX_REQUEST)
                    if not chunk:
                        break
                    head += chunk
            with self._lock:
                self.hits.append(
                    TrapHit(time.time(), str(peer), head.split(b"\n", 1)[0][:200].decode(errors="replace").strip())
                )
            with contextlib.suppress(OSError):
                conn.sendall(self.reply)

    def count(self) -> int:
        with self._lock:
            return len(self.hits)

    def hits_since(self, index: int) -> list[dict[str, Any]]:
        with self._lock:
            return [{"at": h.at, "peer": h.peer, "request": h.request_head} for h in self.hits[index:]]

    def describe(self) -> dict[str, Any]:
        where = str(self.unix_path) if self.unix_path else f"{self.host}:{self.port}"
        return {"name": self.name, "listen": where, "connections": self.count(), "note": self.note}

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self.unix_path is not None:
            self.unix_path.unlink(missing_ok=True)


def http_reply(body: str, content_type: str = "text/plain") -> bytes:
    data = body.encode()
    return (
        f"HTTP/1.0 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data
