"""The bench's upstream: our own nginx (Debian's `nginx-light`) on loopback, so that neither the upstream nor
Python sets the figures of a proxy that is faster than a Python server.

    nginx = Nginx.start(run_dir / "proxy" / "nginx", supervisor, key="sk-...")
    nginx.url("page")         # http://127.0.0.1:<http_port>/bytes/1024
    nginx.stop()

Three listeners, all on 127.0.0.1:
  http   plain http: /bytes/<n> (static files written by `add_bytes`), POST allowed too
  https  TLS with a per-run CA naming api.anthropic.com and 127.0.0.1: /v1/messages answers a 1 KiB JSON,
         /bytes/<n> as above. For Host api.anthropic.com nginx checks the injected key with a `map` on the
         header and answers 401 otherwise: the credential binding of gateway-intercept stays real.
  deny   answers 403 to everything: `direct`'s stand-in for the deny path of a proxy (blocked traffic).

`daemon off;` under the Supervisor, with its own pid file, ports, logs and temp paths. Its live files (config
with the key, TLS key, bodies) sit in a private scratch dir while it runs, since its worker drops to `nobody`;
on stop the error log and the config (key redacted) are copied to the run dir and the scratch dir removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harness.errors import EnvironmentMissing
from harness.gateway.tls import issue_leaf, make_ca
from harness.load.peers import LOOPBACK, free_port, wait_listening
from harness.scratch import make_scratch_dir, remove_scratch_dir
from harness.supervisor import Supervisor

INSTALL = "apt-get install -y nginx-light"
BINARIES = ("/usr/sbin/nginx",)
MODEL_HOST = "api.anthropic.com"
MODEL_PATH = "/v1/messages"
KEY_HEADER = "x-api-key"
MODEL_ANSWER_BYTES = 1024
"""Size of the model stand-in's JSON answer: a short completion."""
WORKER_PROCESSES = 1
"""One worker: on 2 shared cores more would only take CPU from the generator and the proxy; its CPU is
sampled, and a figure where nginx was the busiest process says so."""
KEEPALIVE_TIMEOUT_S = 300
"""Longer than the longest gap between a target's windows, so kept-alive connections survive the rounds."""
KEEPALIVE_REQUESTS = 1_000_000
"""nginx's default (1000) would close a kept-alive connection every few ms at capacity."""
REDACTED = "<redacted>"


def binary() -> str | None:
    """nginx's executable, or None when it is not installed."""
    return shutil.which("nginx") or next((p for p in BINARIES if os.access(p, os.X_OK)), None)


def require() -> str:
    exe = binary()
    if exe is None:
        raise EnvironmentMissing(f"nginx is not installed (the bench's upstream); install it with: {INSTALL}")
    return exe


def _answer(size: int) -> str:
    """A JSON body of exactly `size` bytes (nginx `return` text: no quotes or `$` inside)."""
    head, tail = '{"type":"message","content":"', '"}'
    return head + "x" * max(0, size - len(head) - len(tail)) + tail


def config(live: Path, http_port: int, https_port: int, deny_port: int, key: str) -> str:
    """nginx.conf of our instance: its files under `live`, loopback listeners only."""
    answer = _answer(MODEL_ANSWER_BYTES)
    tls = f"""\
        ssl_certificate {live}/tls.pem;
        ssl_certificate_key {live}/tls-key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:br:1m;
"""
    routes = f"""\
        location = {MODEL_PATH} {{ default_type application/json; return 200 '{answer}'; }}
        # Static files refuse POST with 405: serve them anyway (a streamed model answer POSTs to /bytes/<n>).
        location /bytes/ {{ alias {live}/www/; default_type application/octet-stream; error_page 405 =200 $uri; }}
"""
    return f"""\
daemon off;
master_process on;
worker_processes {WORKER_PROCESSES};
pid {live}/nginx.pid;
error_log {live}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout {KEEPALIVE_TIMEOUT_S}s;
    keepalive_requests {KEEPALIVE_REQUESTS};
    client_body_temp_path {live}/tmp/body;
    proxy_temp_path {live}/tmp/proxy;
    fastcgi_temp_path {live}/tmp/fastcgi;
    uwsgi_temp_path {live}/tmp/uwsgi;
    scgi_temp_path {live}/tmp/scgi;
    map $http_{KEY_HEADER.replace("-", "_")} $br_key_ok {{ default 0; "{key}" 1; }}
    server {{
        listen {LOOPBACK}:{http_port} default_server;
{routes}    }}
    server {{
        listen {LOOPBACK}:{https_port} ssl default_server;
{tls}{routes}    }}
    server {{
        listen {LOOPBACK}:{https_port} ssl;
        server_name {MODEL_HOST};
{tls}        if ($br_key_ok = 0) {{ return 401; }}
{routes}    }}
    server {{
        listen {LOOPBACK}:{deny_port} default_server;
        location / {{ return 403; }}
    }}
}}
"""


def _write_tls(live: Path) -> bytes:
    """Leaf key and chain for the https listener; returns the CA's PEM (what clients and proxies trust)."""
    ca_key, ca_cert = make_ca("blastradius bench upstream CA")
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = issue_leaf(ca_key, ca_cert, leaf_key, [MODEL_HOST, LOOPBACK])
    (live / "tls.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file = live / "tls-key.pem"
    key_file.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_file.chmod(0o600)
    return ca_cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Nginx:
    """One running nginx of ours."""

    workdir: Path
    """Where its CA, redacted config and logs are kept (in the run dir)."""
    live: Path
    """Its private scratch dir while it runs."""
    proc: subprocess.Popen[bytes]
    """The master process (its worker is its child)."""
    supervisor: Supervisor
    http_port: int
    https_port: int
    deny_port: int
    ca_file: Path
    """PEM of the CA its https certificate chains to."""
    sizes: set[int] = field(default_factory=set)
    """Body sizes /bytes/<n> serves."""

    @classmethod
    def start(cls, workdir: Path, supervisor: Supervisor, key: str, sizes: tuple[int, ...] = ()) -> Nginx:
        exe = require()
        workdir.mkdir(parents=True, exist_ok=True)
        live = make_scratch_dir("br-nginx-")
        try:
            os.chmod(live, 0o755)
            (live / "www").mkdir()
            (live / "www").chmod(0o755)
            (live / "tmp").mkdir()
            ca_file = workdir / "upstream-ca.pem"
            ca_file.write_bytes(_write_tls(live))
            ports = (free_port(), free_port(), free_port())
            conf = live / "nginx.conf"
            conf.write_text(config(live, *ports, key))
            conf.chmod(0o600)  # it holds the bench's model key; the master reads it as root
            (workdir / "nginx.conf").write_text(config(live, *ports, REDACTED))
            log = workdir / "nginx.out"
            with open(log, "ab") as out:
                # -e: the early error log too (before the config is read) goes to our file, not /var/log.
                proc = supervisor.spawn(
                    [exe, "-c", str(conf), "-p", str(live), "-e", str(live / "error.log")],
                    f"nginx:{ports[0]}",
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        except BaseException:
            remove_scratch_dir(live)
            raise
        nginx = cls(workdir, live, proc, supervisor, *ports, ca_file)
        try:
            for port in ports:
                wait_listening(port, proc, log)
            for size in sizes:
                nginx.add_bytes(size)
        except BaseException:
            nginx.stop()
            raise
        return nginx

    @property
    def pids(self) -> list[int]:
        """The master's pid; its worker is counted with it (CPU samplers follow children)."""
        return [self.proc.pid]

    def add_bytes(self, size: int) -> str:
        """Serve a body of `size` bytes at /bytes/<size>; returns that path."""
        path = self.live / "www" / str(size)
        if size not in self.sizes:
            path.write_bytes(b"x" * size)
            path.chmod(0o644)
            self.sizes.add(size)
        return f"/bytes/{size}"

    def stop(self) -> None:
        self.supervisor.stop(self.proc.pid)
        with contextlib.suppress(OSError):
            shutil.copyfile(self.live / "error.log", self.workdir / "error.log")
        remove_scratch_dir(self.live)
