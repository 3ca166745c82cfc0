"""toolchains: what curl, wget, pip, git, requests and the model SDKs really do when the gateway says no.

Each client runs inside a debian sandbox (`--image debian`: the real binaries and libraries, trusting the gateway's
CA) against a destination the policy denies and then one it allows, under every deny mode (403, 403-explained,
reset) with the loop breaker off and on (answering 429 or 200-terminal). Per cell, from the gateway's audit log
(never the client's word): the requests sent, the answers they got and the loop trips; from the client: its exit
status, the seconds until it gave up, and whether its output named the policy (the deny's words reached the user);
and the collateral: whether the allowed call right after, on the same client, still worked.

    curl            plain; curl-retry: --retry 5; curl-retry-all: --retry 5 --retry-all-errors
    wget            --tries=5
    pip             pip install from an index stand-in (real wheels, `pip download`ed once on the host)
    git             git clone over https from a git stand-in (a bare repository, git's dumb HTTP protocol)
    requests        a requests Session with a urllib3 Retry (clients.REQUESTS_RETRY)
    anthropic       the SDKs with their default retries, against the model API stand-in; their denied call is
    openai          GET /v1/models on their own API host (outside the policy's POST rule)

Every destination is a loopback stand-in: pypi.org, files.pythonhosted.org and github.com are pointed at
standins.FilesServer, the model APIs at harness.standins' UpstreamServer, and every other name at a closed
loopback port, by the gateway's upstream overrides; the run fails if the audit log shows any other address dialled.

Deny mode and breaker are gateway-wide, so the run is phases (deny mode x breaker setting, the breaker's state
new each phase: set_deny makes a new one); within a phase every client runs at once, across a few sandboxes
(clients.CLIENTS' groups). The Python clients run in a long-lived driver per client (driver.py), which imports
its library once. A cell still running at `cell_timeout_s` is recorded as "still retrying at timeout".
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config import RunConfig
from harness.errors import ConfigError
from harness.fleet import Fleet
from harness.gateway.audit import AuditTail
from harness.gateway.process import CredentialSpec, GatewayConfig, GatewayProcess
from harness.paths import cache_dir
from harness.sandbox import Sandbox
from harness.scenario.base import Needs, ScenarioContext
from harness.standins.upstream import UpstreamServer

from . import clients as cl
from .standins import FilesServer, build_git_repo, build_index, build_raw_files, fetch_wheels

NAME = "toolchains"
HERE = Path(__file__).resolve().parent
DRIVER = HERE / "driver.py"
IMAGE = "debian"
MODEL_HOSTS = ("api.anthropic.com", "api.openai.com")
MODEL_KEYS = {
    "api.anthropic.com": ("anthropic", "x-api-key", "{secret}", "BR_TC_ANTHROPIC_KEY", "sk-ant-tc-0123456789abcdef"),
    "api.openai.com": ("openai", "authorization", "Bearer {secret}", "BR_TC_OPENAI_KEY", "sk-tc-0123456789abcdef"),
}
"""Stand-in keys the gateway injects (the upstream checks they arrived); the sandbox holds only the sentinel."""
SINK = "127.0.0.1:9"
"""Where every name without a stand-in is dialled (the discard port, closed here): a name the policy let
through by mistake still never leaves loopback."""
LOOP_WINDOW_S = 60.0
DRIVER_START_TIMEOUT_S = 300.0
"""Starting a driver imports its library: ~40 s for anthropic in a TCG guest on a quiet host (README), more
while other guests boot beside it."""
EXEC_SLACK_S = 30.0
"""A cell's exec timeout beyond the cell's own: the guest agent's and the shell's start under TCG."""
AUDIT_SETTLE_S = 0.5
"""After a phase, before its audit records are read: the gateway writes a record as it answers."""
POLICY = """\
name: toolchains
deny_mode: 403
loop_breaker: {threshold: 5, window_s: 60}
rules:
  - allow: pypi.org
    methods: [GET, HEAD]
    paths: ["/simple/**"]
  - allow: files.pythonhosted.org
    methods: [GET, HEAD]
    paths: ["/packages/**"]
  - allow: github.com
    methods: [GET, HEAD]
    paths: ["/blastradius/**"]
  - allow: api.anthropic.com
    methods: [POST]
    paths: ["/v1/messages"]
  - allow: api.openai.com
    methods: [POST]
    paths: ["/v1/chat/completions"]
"""
"""Every allowed host has a method/path rule, so the gateway terminates its TLS (with the CA the guest trusts)
and records each request's path; the denied destinations match no rule."""


def _names(text: str, known: tuple[str, ...], what: str) -> list[str]:
    chosen = list(known) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown or not chosen:
        raise ConfigError(
            f"toolchains: unknown {what} {', '.join(unknown) or '(none given)'}; choose from all, {', '.join(known)}"
        )
    return chosen


@dataclass(frozen=True)
class Options:
    """`invoke scenario toolchains --set clients=curl,pip --set modes=403-explained`."""

    clients: str = "all"
    """Clients to run, comma-separated, or all: curl, curl-retry, curl-retry-all, wget, pip, git, requests,
    anthropic, openai."""
    modes: str = "all"
    """Deny modes, comma-separated, or all: 403, 403-explained, reset."""
    breakers: str = "all"
    """Loop breaker settings, comma-separated, or all: off, 429, 200-terminal."""
    threshold: int = 5
    """Loop breaker: identical denied requests within 60 s before its answer."""
    cell_timeout_s: float = 90.0
    """A cell still running after this many seconds is recorded as still retrying at timeout."""

    @property
    def client_list(self) -> list[str]:
        return _names(self.clients, tuple(cl.BY_NAME), "client")

    @property
    def mode_list(self) -> list[str]:
        return _names(self.modes, cl.DENY_MODES, "deny mode")

    @property
    def breaker_list(self) -> list[str]:
        return _names(self.breakers, cl.BREAKERS, "breaker setting")

    def validate(self) -> None:
        self.client_list, self.mode_list, self.breaker_list  # noqa: B018 - each raises on a bad name
        if self.threshold < 1 or self.cell_timeout_s <= 0:
            raise ConfigError("toolchains needs threshold >= 1 and cell_timeout_s > 0")


def needs(options: Options, config: RunConfig) -> Needs:
    """Real clients: the debian image (curl, wget, git, pip, requests and the SDKs)."""
    return Needs(image=IMAGE)


def create(options: Options) -> ToolchainsScenario:
    return ToolchainsScenario(options)


SAMPLE_EVERY_S = 0.25
"""How often the gateway process's sockets are sampled for a remote address outside loopback."""


class DialSampler:
    """The gateway process's TCP peers, sampled while the matrix runs: a second witness, beside the audit log's
    upstream_addr, that nothing it dialled left loopback."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peers: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="toolchains-dial-sampler")

    def _loop(self) -> None:
        import psutil

        while not self._stop.wait(SAMPLE_EVERY_S):
            try:
                conns = psutil.Process(self.pid).net_connections(kind="tcp")
            except psutil.Error:
                continue
            self.samples += 1
            self.peers.update(f"{c.raddr.ip}:{c.raddr.port}" for c in conns if c.raddr)

    def __enter__(self) -> DialSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def parse_probe(text: str) -> tuple[list[str], dict[str, str]]:
    """The availability probe's output: what is missing, and the versions it found."""
    missing, versions = [], {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "missing":
            missing.append(rest.strip())
        elif kind == "version":
            name, _, version = rest.partition(" ")
            versions[name] = version.strip()
    return missing, versions


def probe_command(commands: set[str], modules: set[str]) -> str:
    """One shell command that names what is missing (`command -v`, find_spec: nothing is imported) and the
    versions of what is there."""
    checks = [f"command -v {c} >/dev/null 2>&1 || echo 'missing {c}'" for c in sorted(commands)]
    for binary in sorted(commands & {"curl", "wget", "git"}):
        checks.append(f'command -v {binary} >/dev/null 2>&1 && echo "version {binary} $({binary} --version | head -1)"')
    if modules:
        script = (
            "import importlib.util as u, importlib.metadata as m\n"
            f"for name in {sorted(modules)!r}:\n"
            "    if u.find_spec(name) is None: print('missing', name)\n"
            "    else:\n"
            "        try: print('version', name, m.version(name))\n"
            "        except Exception: print('version', name, '?')\n"
        )
        checks.append(f"command -v python3 >/dev/null 2>&1 && python3 -c {shlex.quote(script)}")
    return "; ".join(checks)


class ToolchainsScenario:
    name = NAME

    def __init__(self, options: Options) -> None:
        self.options = options
        self.clients = [cl.BY_NAME[n] for n in options.client_list]
        self.fleet: Fleet | None = None
        self.files: FilesServer | None = None
        self.upstream: UpstreamServer | None = None
        self.sandboxes: dict[str, Sandbox] = {}
        self.cells: list[dict[str, Any]] = []
        self.checks: list[str] = []
        self.drivers: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @property
    def gateway(self) -> GatewayProcess:
        assert self.fleet is not None and self.fleet.gateway is not None
        return self.fleet.gateway

    def sandbox_id(self, client: cl.Client) -> str:
        return f"tc-{client.group}"

    # ---- setup -------------------------------------------------------------------------------------------
    def setup(self, ctx: ScenarioContext) -> None:
        standins = ctx.run_dir / "standins"
        root = standins / "files"
        root.mkdir(parents=True, exist_ok=True)
        with ctx.journal.activity("build-stand-ins") as act:
            wheels = fetch_wheels(cache_dir() / "toolchains" / "wheels")
            projects = build_index(root, wheels)
            head = build_git_repo(root, standins)
            build_raw_files(root, [c.name for c in self.clients])
            act.output = {"wheels": [w.name for w in wheels], "projects": projects, "git_head": head}
        with ctx.journal.activity("start-stand-ins") as act:
            self.files = ctx.keep(FilesServer(root, standins))
            expected = {
                host: (header, template.format(secret=key))
                for host, (_, header, template, _e, key) in MODEL_KEYS.items()
            }
            self.upstream = ctx.keep(UpstreamServer(expected=expected))
            assert self.upstream.ca_file is not None
            bundle = standins / "upstream-cas.pem"
            bundle.write_bytes(self.upstream.ca_file.read_bytes() + self.files.ca_file.read_bytes())
            act.output = {"files_port": self.files.port, "model_api_port": self.upstream.https_port}
        policy = ctx.run_dir / "toolchains-policy.yaml"
        policy.write_text(POLICY)
        overrides = {"*": SINK, **self.upstream.overrides(MODEL_HOSTS), **self.files.overrides()}
        config = GatewayConfig(
            policy=policy,
            deny_mode="403",
            loop_threshold=self.options.threshold,
            loop_window_s=LOOP_WINDOW_S,
            audit_path=ctx.run_dir / "gateway-audit.jsonl",
            state_dir=ctx.run_dir / "gateway",
            credentials=[
                CredentialSpec(name, host, header, port=443, env=env, template=template)
                for host, (name, header, template, env, _key) in MODEL_KEYS.items()
            ],
            upstream_overrides=overrides,
            upstream_ca_file=bundle,
            extra_env={env: key for _n, _h, _t, env, key in MODEL_KEYS.values()},
        )
        self.fleet = ctx.keep(ctx.fleet(config))
        groups = sorted({c.group for c in self.clients})
        with ctx.journal.activity("boot-sandboxes") as act:
            with ThreadPoolExecutor(max_workers=len(groups)) as pool:
                booted = list(pool.map(lambda g: ctx.boot(self.fleet, f"tc-{g}"), groups))
            self.sandboxes = {s.id: s for s in booted}
            act.output = {"sandboxes": sorted(self.sandboxes)}
        with ctx.journal.activity("probe:clients-in-image", "probe") as act:
            act.output = self.check_image(ctx)
        with ctx.journal.activity("start-python-drivers") as act:
            python = [c for c in self.clients if c.python]
            with ThreadPoolExecutor(max_workers=max(1, len(python))) as pool:
                for client, status in zip(python, pool.map(self.start_driver, python), strict=True):
                    self.drivers[client.name] = status
            act.output = self.drivers
        broken = [f"{n} ({s.get('error')})" for n, s in self.drivers.items() if not s.get("ready")]
        if broken:
            raise ConfigError(f"toolchains: {', '.join(broken)} cannot run in the {IMAGE} image")
        with ctx.journal.activity("warm-up") as act:
            # Each client's allowed call once, not counted: the first phase would otherwise also pay the guest's
            # cold page cache (binaries and libraries read from the squashfs through TCG).
            with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
                warm = list(pool.map(self.warm_up, self.clients))
            act.output = dict(zip((c.name for c in self.clients), warm, strict=True))

    def warm_up(self, client: cl.Client) -> dict[str, Any]:
        sandbox = self.sandboxes[self.sandbox_id(client)]
        run = self.run_python if client.python else self.run_shell
        ran = run(sandbox, client, "allowed", f"{client.name}-warm-up")
        return {"exit": ran["exit"], "seconds": round(float(ran["seconds"]), 2)}

    def check_image(self, ctx: ScenarioContext) -> dict[str, Any]:
        """Every selected client's binaries and modules are in its sandbox; one line naming the missing else."""
        found: dict[str, Any] = {}
        missing_by_client: list[str] = []

        def probe(sandbox_id: str) -> str:
            mine = [c for c in self.clients if self.sandbox_id(c) == sandbox_id]
            commands = {x for c in mine for x in c.commands}
            modules = {x for c in mine for x in c.modules}
            return self.sandboxes[sandbox_id].exec(probe_command(commands, modules), timeout=60).text

        with ThreadPoolExecutor(max_workers=len(self.sandboxes)) as pool:
            outputs = dict(zip(self.sandboxes, pool.map(probe, self.sandboxes), strict=True))
        for sandbox_id, text in outputs.items():
            missing, versions = parse_probe(text)
            found[sandbox_id] = versions
            for client in (c for c in self.clients if self.sandbox_id(c) == sandbox_id):
                gone = [x for x in (*client.commands, *client.modules) if x in missing]
                if gone:
                    missing_by_client.append(f"{client.name} (no {', '.join(gone)})")
        ctx.data.setdefault("toolchains", {})["versions"] = found
        if missing_by_client:
            raise ConfigError(
                f"toolchains: missing inside the sandbox ({IMAGE} image, {ctx.backend.name} backend): "
                f"{'; '.join(missing_by_client)}; leave those clients out with --set clients=..."
            )
        return found

    def driver_dir(self, client: cl.Client) -> str:
        return f"{cl.GUEST_DIR}/driver-{client.name}"

    def start_driver(self, client: cl.Client) -> dict[str, Any]:
        """Start the client's driver in the background (its own session, so it outlives the command that started
        it) and wait for it to import its library."""
        sandbox = self.sandboxes[self.sandbox_id(client)]
        where = self.driver_dir(client)
        # A copy per driver: two drivers of one sandbox start at once; neither may read the other's half-written file.
        put = sandbox.exec(f"mkdir -p {where} && cat > {where}/driver.py", stdin=DRIVER.read_bytes(), timeout=30)
        if put.rc != 0:
            return {"ready": False, "error": f"copying driver.py failed: {put.stderr.decode(errors='replace')}"}
        started = time.monotonic()
        launch = (
            f"cd {where} && rm -f in out status.json && mkfifo in out && "
            f"setsid nohup python3 -u {where}/driver.py {client.name} {where} </dev/null >log 2>&1 & "
            f"i=0; while [ ! -s {where}/status.json ] && [ $i -lt {int(DRIVER_START_TIMEOUT_S * 2)} ]; "
            f"do sleep 0.5; i=$((i+1)); done; cat {where}/status.json"
        )
        result = sandbox.exec(launch, timeout=DRIVER_START_TIMEOUT_S + EXEC_SLACK_S)
        try:
            status = json.loads(result.text.strip().splitlines()[-1])
        except (IndexError, ValueError):
            log = sandbox.exec(f"tail -5 {where}/log", timeout=30).text.strip()
            status = {"ready": False, "error": f"the driver did not start (rc {result.rc}): {log}"}
        status["start_s"] = round(time.monotonic() - started, 2)
        return status

    def steady_state(self, ctx: ScenarioContext) -> None:
        """None: every phase measures the allowed destinations itself (the collateral column)."""
        return None

    # ---- run ---------------------------------------------------------------------------------------------
    def run(self, ctx: ScenarioContext) -> None:
        tail = AuditTail(self.gateway.audit_path)
        every_record: list[dict[str, Any]] = tail.new()  # setup's own records are no cell's
        threshold = self.options.threshold
        data: dict[str, Any] = ctx.data.setdefault("toolchains", {})
        data.update(
            {
                "clients": [c.name for c in self.clients],
                "families": {c.name: c.family for c in self.clients},
                "deny_modes": self.options.mode_list,
                "breakers": self.options.breaker_list,
                "threshold": threshold,
                "window_s": LOOP_WINDOW_S,
                "cell_timeout_s": self.options.cell_timeout_s,
                "requests_retry": cl.REQUESTS_RETRY,
                "drivers": self.drivers,
                "sandboxes": {c.name: self.sandbox_id(c) for c in self.clients},
                "cells": self.cells,
                "phases": [],
            }
        )
        started = time.monotonic()
        sampler = ctx.keep(DialSampler(self.gateway.pid))
        for mode in self.options.mode_list:
            for breaker in self.options.breaker_list:
                with ctx.journal.activity(f"phase:{mode}/breaker-{breaker}") as act:
                    self.gateway.set_deny(
                        deny_mode=mode,
                        loop_breaker=breaker != cl.BREAKER_OFF,
                        loop_threshold=threshold,
                        loop_window_s=LOOP_WINDOW_S,
                        loop_answer="429" if breaker == cl.BREAKER_OFF else breaker,
                    )
                    phase_started = time.monotonic()
                    n = len(self.clients)
                    with ThreadPoolExecutor(max_workers=n) as pool:
                        ran = list(pool.map(self.run_client, self.clients, [mode] * n, [breaker] * n))
                    time.sleep(AUDIT_SETTLE_S)
                    records = tail.new()
                    every_record += records
                    for client, (denied, allowed) in zip(self.clients, ran, strict=True):
                        sandbox = self.sandbox_id(client)
                        for destination, outcome in (("denied", denied), ("allowed", allowed)):
                            counts = cl.count_cell(records, client, sandbox, destination)
                            self.cells.append(
                                cl.make_cell(client, mode, breaker, destination, sandbox, counts, outcome)
                            )
                    phase = {
                        "deny_mode": mode,
                        "breaker": breaker,
                        "seconds": round(time.monotonic() - phase_started, 1),
                    }
                    data["phases"].append(phase)
                    act.output = phase
                ctx.save()
        data["matrix_s"] = round(time.monotonic() - started, 1)
        sampler.__exit__(None, None, None)
        data["gateway_peers"] = {
            "samples": sampler.samples,
            "peers": sorted({p.rsplit(":", 1)[0] for p in sampler.peers}),
        }
        rows = cl.matrix_rows(self.cells)
        data["matrix"] = rows
        data["recommendation"] = cl.recommend(rows)
        dialled = cl.dialled_addresses(every_record)
        data["dialled"] = dialled
        data["checks"] = self.checks = self.check(dialled, sampler)
        ctx.save()

    def run_client(self, client: cl.Client, mode: str, breaker: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The client's denied cell, then its allowed one (the collateral), one after the other."""
        sandbox = self.sandboxes[self.sandbox_id(client)]
        cell = f"{client.name}-{mode}-{breaker}"
        run = self.run_python if client.python else self.run_shell
        return run(sandbox, client, "denied", cell), run(sandbox, client, "allowed", cell)

    def run_shell(self, sandbox: Sandbox, client: cl.Client, destination: str, cell: str) -> dict[str, Any]:
        command = (client.denied if destination == "denied" else client.allowed).format(cell=cell)
        limit = self.options.cell_timeout_s
        # timeout(1) ends a client still retrying (124, or 137 if it ignored TERM); the clock is the guest's.
        script = (
            f"mkdir -p {cl.GUEST_DIR}; cd {cl.GUEST_DIR}; s=$(date +%s.%N); "
            f"timeout -k 5 {limit:g} sh -c {shlex.quote(command)} 2>&1; rc=$?; e=$(date +%s.%N); "
            'echo; echo "@@br rc=$rc s=$s e=$e"'
        )
        result = sandbox.exec(script, timeout=limit + EXEC_SLACK_S)
        text = result.text
        body, _, trailer = text.rpartition("@@br ")
        fields = dict(part.split("=", 1) for part in trailer.split() if "=" in part)
        if result.timed_out or "rc" not in fields:
            return {"exit": -1, "seconds": result.duration_s, "timed_out": True, "output": text, "command": command}
        rc = int(fields["rc"])
        return {
            "exit": rc,
            "seconds": float(fields["e"]) - float(fields["s"]),
            "timed_out": rc in (124, 137),
            "output": body.rstrip(),
            "command": command,
        }

    def run_python(self, sandbox: Sandbox, client: cl.Client, destination: str, cell: str) -> dict[str, Any]:
        where = self.driver_dir(client)
        limit = self.options.cell_timeout_s
        request = json.dumps({"destination": destination, "cell": cell, "timeout_s": limit})
        command = f"printf '%s\\n' {shlex.quote(request)} > {where}/in && cat {where}/out"
        result = sandbox.exec(
            f"timeout {limit + EXEC_SLACK_S / 2:g} sh -c {shlex.quote(command)}", timeout=limit + EXEC_SLACK_S
        )
        described = f"driver.py {client.name}: {destination} call"
        try:
            answer = json.loads(result.text.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return {
                "exit": "driver-gone",
                "seconds": result.duration_s,
                "timed_out": True,
                "output": result.text,
                "command": described,
            }
        return {**answer, "command": described}

    def check(self, dialled: list[str], sampler: DialSampler) -> list[str]:
        """What must hold for the matrix to mean anything; each failure is one line."""
        failures = [f"the gateway dialled {a}, which is not loopback" for a in dialled if not cl.is_loopback_address(a)]
        if not dialled:
            failures.append("the audit log names no address dialled: no allowed call reached a stand-in")
        failures += [
            f"the gateway process had a connection to {peer}, which is not loopback"
            for peer in sorted(sampler.peers)
            if not cl.is_loopback_address(peer)
        ]
        if not sampler.samples:
            failures.append("the gateway's connections were never sampled")
        for cell in self.cells:
            where = f"{cell['client']} {cell['deny_mode']}/breaker-{cell['breaker']} ({cell['destination']})"
            if cell["destination"] == "denied" and cell["requests"] == 0:
                failures.append(f"{where}: the gateway saw no request of the denied cell")
            if cell["breaker"] == cl.BREAKER_OFF and cell["loop_trips"]:
                failures.append(f"{where}: the breaker was off but tripped")
        return failures

    def rollback(self, ctx: ScenarioContext) -> None:
        """Nothing of its own: the fleet (drivers die with their guests) and the stand-ins are run resources."""

    def exit_code(self, ctx: ScenarioContext) -> int:
        return 1 if self.checks or not self.cells else 0


def terminal_summary(data: dict[str, Any]) -> str:
    """The recommendation, the matrix's time and the self-checks, from the saved data."""
    tc = data.get("toolchains") or {}
    rec = tc.get("recommendation") or {}
    lines = [f"recommendation: {f['text']}" for f in rec.get("families") or []]
    if rec.get("overall"):
        lines.append(rec["overall"]["text"])
    lines += rec.get("findings") or []
    if tc.get("matrix_s") is not None:
        lines.append(f"matrix: {len(tc.get('matrix') or [])} rows in {tc['matrix_s']} s")
    lines += [f"check failed: {c}" for c in tc.get("checks") or []] or ["all self-checks passed"]
    return "\n".join(lines)
