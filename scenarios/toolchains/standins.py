"""The package index and git stand-ins: static files over HTTPS on loopback, one directory per host name.

`FilesServer` serves `<root>/<Host>/<path>` (a directory's index.html; the query string ignored) with a
certificate of its own CA naming every host it stands in for. The gateway trusts that CA (bundled with the
model API stand-in's) and reaches the server only through its upstream overrides, so pypi.org,
files.pythonhosted.org and github.com never leave loopback. What it serves:

- a PEP 503 simple index on pypi.org (`/simple/<project>/`) whose links point at files.pythonhosted.org,
  with real wheels fetched once on the host with `pip download` and cached;
- a bare git repository on github.com after `git update-server-info`: git's dumb HTTP protocol (git asks for
  `info/refs?service=git-upload-pack`, gets a static file, and fetches the objects one by one);
- a small text file per client on github.com (`/blastradius/toolchains/raw/<client>.txt`), the allowed
  destination of curl, wget and requests.
"""

from __future__ import annotations

import hashlib
import shutil
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harness.errors import EnvironmentMissing
from harness.gateway.tls import issue_leaf, make_ca

WHEELS = ("six==1.16.0", "tomli==2.0.1")
"""Real wheels the index stand-in serves (pure Python, no dependencies): `pip download`ed once, then cached."""
PIP_DOWNLOAD_TIMEOUT_S = 120
GIT_TIMEOUT_S = 30
INDEX_HOST = "pypi.org"
FILES_HOST = "files.pythonhosted.org"
GIT_HOST = "github.com"
GIT_REPO_PATH = "/blastradius/demo.git"
RAW_PATH = "/blastradius/toolchains/raw"
NAMES = (INDEX_HOST, FILES_HOST, GIT_HOST)


def fetch_wheels(cache: Path) -> list[Path]:
    """The wheels of WHEELS in `cache` (downloaded by the host's pip the first time); one line if that fails."""
    cache.mkdir(parents=True, exist_ok=True)
    wanted = {spec.split("==")[0].replace("-", "_").lower(): spec for spec in WHEELS}
    have = {p.name.split("-")[0].lower(): p for p in cache.glob("*.whl")}
    missing = [spec for name, spec in wanted.items() if name not in have]
    if missing:
        argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(cache)]
        proc = subprocess.run(
            [*argv, *missing], capture_output=True, text=True, timeout=PIP_DOWNLOAD_TIMEOUT_S, check=False
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise EnvironmentMissing(
                f"toolchains: fetching the index stand-in's wheels ({', '.join(missing)}) with pip download "
                f"failed: {last}; run it once with network access (they are cached in {cache})"
            )
        have = {p.name.split("-")[0].lower(): p for p in cache.glob("*.whl")}
    return [have[name] for name in wanted]


def build_index(root: Path, wheels: list[Path]) -> list[str]:
    """A PEP 503 simple index on pypi.org whose links lead to files.pythonhosted.org; returns the projects."""
    projects = []
    for wheel in wheels:
        project = wheel.name.split("-")[0].lower().replace("_", "-")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        files_dir = root / FILES_HOST / "packages" / digest[:2] / digest[2:4]
        files_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(wheel, files_dir / wheel.name)
        page = root / INDEX_HOST / "simple" / project / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        link = f"https://{FILES_HOST}/packages/{digest[:2]}/{digest[2:4]}/{wheel.name}#sha256={digest}"
        page.write_text(f'<!DOCTYPE html>\n<html><body>\n<a href="{link}">{wheel.name}</a><br/>\n</body></html>\n')
        projects.append(project)
    listing = "".join(f'<a href="/simple/{p}/">{p}</a><br/>\n' for p in projects)
    (root / INDEX_HOST / "simple" / "index.html").write_text(
        f"<!DOCTYPE html>\n<html><body>\n{listing}</body></html>\n"
    )
    return projects


def build_git_repo(root: Path, scratch: Path) -> str:
    """A bare repository served by git's dumb HTTP protocol; returns its HEAD commit."""
    git = shutil.which("git")
    if git is None:
        raise EnvironmentMissing("toolchains: the git stand-in needs git on the host (apt-get install git)")
    work = scratch / "git-src"
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(scratch),
        "GIT_AUTHOR_NAME": "blastradius",
        "GIT_AUTHOR_EMAIL": "toolchains@blastradius.invalid",
        "GIT_COMMITTER_NAME": "blastradius",
        "GIT_COMMITTER_EMAIL": "toolchains@blastradius.invalid",
        "GIT_CONFIG_NOSYSTEM": "1",
    }

    def run(*args: str, cwd: Path | None = None) -> str:
        proc = subprocess.run(
            [git, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False
        )
        if proc.returncode != 0:
            raise EnvironmentMissing(f"toolchains: building the git stand-in failed at git {args[0]}: {proc.stderr}")
        return proc.stdout.strip()

    work.mkdir(parents=True, exist_ok=True)
    run("init", "-q", "-b", "main", str(work))
    (work / "README.md").write_text("The git stand-in of blastradius's toolchains scenario.\n")
    run("add", "README.md", cwd=work)
    run("commit", "-q", "-m", "stand-in", cwd=work)
    bare = root / GIT_HOST / GIT_REPO_PATH.lstrip("/")
    bare.parent.mkdir(parents=True, exist_ok=True)
    run("clone", "-q", "--bare", "--no-local", str(work), str(bare))
    run("update-server-info", cwd=bare)
    return run("rev-parse", "HEAD", cwd=work)


def build_raw_files(root: Path, clients: list[str]) -> None:
    for client in clients:
        path = root / GIT_HOST / RAW_PATH.lstrip("/") / f"{client}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"allowed content for {client}\n")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are recorded in `served`, not printed."""

    def _file(self) -> Path | None:
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        path = unquote(urlsplit(self.path).path)
        if host not in NAMES or ".." in path.split("/"):
            return None
        target = self.server.root / host / path.lstrip("/")
        if target.is_dir():
            target = target / "index.html"
        return target if target.is_file() else None

    def _answer(self, body: bool) -> None:
        target = self._file()
        with self.server.lock:
            self.server.served.append({"host": self.headers.get("Host"), "path": self.path, "found": bool(target)})
        if target is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = target.read_bytes()
        kind = "text/html" if target.suffix == ".html" else "application/octet-stream"
        if target.parent.name == "info" or target.name == "HEAD":
            kind = "text/plain"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(True)

    def do_HEAD(self) -> None:
        self._answer(False)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    root: Path
    served: list[dict[str, Any]]
    lock: threading.Lock


class FilesServer:
    """Static files over HTTPS on 127.0.0.1, for NAMES; `ca_file` is the CA the gateway must trust."""

    def __init__(self, root: Path, scratch: Path) -> None:
        self.root = root
        self.scratch = scratch
        self.port = 0
        self.ca_file = scratch / "files-ca.pem"
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FilesServer:
        ca_key, ca_cert = make_ca("blastradius toolchains stand-in CA")
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = issue_leaf(ca_key, ca_cert, leaf_key, list(NAMES))
        self.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        cert_file, key_file = self.scratch / "files-leaf.pem", self.scratch / "files-key.pem"
        cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            leaf_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_file.chmod(0o600)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
        server = _Server(("127.0.0.1", 0), _Handler)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.root, server.served, server.lock = self.root, [], threading.Lock()
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="toolchains-files", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def served(self) -> list[dict[str, Any]]:
        assert self._server is not None
        with self._server.lock:
            return list(self._server.served)

    def overrides(self) -> dict[str, str]:
        """Every name it stands in for, :443, dialled at this server (the gateway's upstream overrides)."""
        return {f"{name}:443": f"127.0.0.1:{self.port}" for name in NAMES}
