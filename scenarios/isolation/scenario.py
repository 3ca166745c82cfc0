"""`invoke scenario isolation`: can an agent in the sandbox steal keys or reach what it must not?

Automates (and goes beyond) the seven hand-run probes of FINDINGS.md (issue 5).

Setup (host, undone on every exit path): a throw-away HOME with honeytokens -- fake ~/.ssh key,
~/.aws/credentials, a ~/.kube/config with three contexts, ~/.env files, ~/.docker/config.json, a
model-API key in the host environment -- each with a unique random marker; a decoy host process
carrying a marker; trap listeners that log every connection: a canary "cluster API" on
127.0.0.1:6443 (or a free port, recorded), a fake docker socket, a cloud-metadata stand-in and a
sink for non-443 ports. A local upstream stands in for api.anthropic.com, example.com and github.com
behind the real gateway (the balanced policy). Then N sandboxes boot behind it, each with the
project directory (only) copied into /work/project, holding a positive-control marker.

Run: the probes of probes.py, inside each sandbox through its agent (the busybox probes everywhere; the
field evaluation's own commands -- env grep, curl, dig, curl CONNECT -- as written, where `command -v`
finds their tools), one sandbox after the other so host-side trap hits can be attributed. Each yields
pass/fail plus evidence (command, redacted output excerpt, exit code) and host-side facts.

Results (results.json["scenario"]["data"]): `scenario`, `backend`, `leaky`, `weakenings`,
`honeytokens` (id, kind, where, sha256 -- never a value), `marker_regex`, `traps`, `policy`,
`scorecards` ([{sandbox, backend, probes: [{id, title, passed, reason, evidence, ...}], leaks}]; a probe that
runs one of the field evaluation's own commands also carries `field_evaluation` {command, outcome, source}, as
FINDINGS.md records it, and `observed`, what the same command gave here),
`leaks` (failed probes over all sandboxes), `summary` (per probe id), `detector` (self-test),
`evidence_clean` (raw markers found in the run directory after the run: must be none).

Exit code: 0 when every applicable probe passed, the detector self-test held and the run
directory holds no raw marker; 1 otherwise (CI gate).

`--leaky` weakens the set-up for real (see leaky.py) so the probes must turn red.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import platform
import re
import secrets
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import RenderableType

from harness.config import RunConfig
from harness.egress import Egress, EgressSetup, check_egress_names, start_egress
from harness.errors import ConfigError
from harness.fleet import Fleet
from harness.gateway.credentials import CredentialSpec
from harness.gateway.process import GatewayConfig
from harness.sandbox.base import Endpoint, Sandbox
from harness.scenario.base import Needs, ScenarioContext
from harness.standins.upstream import UpstreamServer

from . import honeytokens, probes
from . import leaky as leaky_mod

CANARY_PORT = 6443
"""Like a local cluster API (minikube) on the host (FINDINGS probe 2)."""
PROVISION_TIMEOUT_S = 20.0
CANARY_REPLY = "br-canary: host service reached\n"
DOCKER_REPLY = "OK br-fake-docker\n"
METADATA_REPLY_ID = "metadata"
SANDBOX_PREFIX = "iso"
MODEL_API = "api.anthropic.com"
MODEL_API_PLAIN_PORT = 80
"""The busybox probes speak HTTP with nc, which has no TLS, so they call the model-API stand-in over plain
http, which the reference policy allows for that one host (everything else stays as in `balanced`); the same
probes run unchanged on the debian image."""


@dataclass(frozen=True)
class Options:
    """`invoke scenario isolation --set key=value`."""

    sandboxes: int = 2
    """Sandboxes to probe (the peers probe needs two)."""
    leaky: bool = False
    """Weaken the set-up for real so the probes must turn red."""
    egress: str = "gateway"
    """The sandboxes' egress proxy: our gateway, or a peer (squid, tinyproxy, mitmproxy) configured from the
    same policy, which every sandbox then shares."""

    def validate(self) -> None:
        if self.sandboxes < 1:
            raise ConfigError(f"isolation needs at least one sandbox, not --sandboxes {self.sandboxes}")
        check_egress_names([self.egress])
        if self.leaky and self.egress != "gateway":
            raise ConfigError("--leaky weakens the gateway's own set-up; run it with --egress gateway")


def reference_policy() -> dict[str, Any]:
    """The balanced preset plus the model API on :80 (see MODEL_API_PLAIN_PORT)."""
    presets = Path(importlib.import_module("harness.gateway").__file__ or "").parent / "presets"
    policy = yaml.safe_load((presets / "balanced.yaml").read_text())
    policy["name"] = "balanced+model-api-http"
    policy["rules"].insert(
        0,
        {
            "allow": MODEL_API,
            "ports": [MODEL_API_PLAIN_PORT],
            "name": "model API stand-in over plain http (busybox has no usable TLS client)",
        },
    )
    return policy


def host_facts() -> Any:
    """The host's side of every comparison, read on the host."""
    import psutil

    try:
        pid1 = " ".join(psutil.Process(1).cmdline())
    except psutil.Error:
        pid1 = ""
    try:
        conf = Path("/etc/resolv.conf").read_text()
    except OSError:
        conf = ""
    return probes.HostFacts(
        boot_id=Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        kernel_release=platform.release(),
        process_count=len(psutil.pids()),
        proc_version=Path("/proc/version").read_text().strip(),
        pid1=pid1,
        resolvers=tuple(re.findall(r"^\s*nameserver\s+(\S+)", conf, re.M)),
    )


def peer_outside_address() -> str:
    """With a peer proxy as the egress: the loopback address that every outside name resolves to for the peer
    (it maps names, not ports), where the stand-ins listen on the real ports (80, 443, and 22 and 9999 for the
    ports probe). One of 127.9.0.0/16 at random, so two runs at once do not take each other's ports."""
    return f"127.9.{secrets.randbelow(256)}.{1 + secrets.randbelow(254)}"


class IsolationScenario:
    name = "isolation"

    def __init__(self, sandboxes: int, leaky: bool, egress: str = "gateway") -> None:
        self.sandboxes = sandboxes
        self.leaky = leaky
        self.egress_name = egress
        self.egress: Egress | None = None
        self.home = honeytokens.HoneyHome()
        self.traps: dict[str, Any] = {}
        self.upstream: UpstreamServer | None = None
        self.stack = ExitStack()
        self.fleet: Fleet | None = None
        self.booted: list[Sandbox] = []
        self.decoy_pid: int | None = None
        self.probed = False

    # ---- setup ---------------------------------------------------------------------------
    def setup(self, ctx: ScenarioContext) -> None:
        ctx.data.update(
            {
                "scenario": self.name,
                "backend": ctx.backend.name,
                "egress": self.egress_name,
                "leaky": self.leaky,
                "weakenings": list(leaky_mod.WEAKENINGS) if self.leaky else [],
                "probe_catalogue": [p.describe() for p in probes.PROBES],
                "scorecards": [],
                "leaks": None,
            }
        )
        with ctx.journal.activity("sweep-leftover-honeytokens") as step:
            step.output = honeytokens.sweep_leftovers()
        with ctx.journal.activity("plant-honeytokens") as step:
            self._plant(ctx)
            step.output = {"tokens": len(self.home.tokens), "traps": [t.describe() for t in self.traps.values()]}
        with ctx.journal.activity("start-gateway-and-boot") as step:
            self._boot(ctx)
            step.output = {"sandboxes": [vm.id for vm in self.booted]}
        with ctx.journal.activity("provision-sandboxes") as step:
            step.output = self._provision(ctx)
        ctx.save()

    def _plant(self, ctx: ScenarioContext) -> None:
        home = self.home
        home.plant()
        assert home.home is not None
        decoy = home.new_token("decoy", "process", "argv of a host process")
        # The marker sits in argv of a long-lived host shell: any guest that can list host
        # processes sees it. The supervisor owns it, so every exit path reaps it.
        proc = ctx.supervisor.spawn(["/bin/sh", "-c", "sleep 86400; :", decoy.value], name="isolation-decoy")
        self.decoy_pid = proc.pid
        metadata = home.new_token("imds", "service", "cloud metadata stand-in (IAM credentials)")
        self.traps = {
            "canary": honeytokens.Trap("canary", honeytokens.http_reply(CANARY_REPLY), port=CANARY_PORT).start(),
            "docker": honeytokens.Trap(
                "docker", honeytokens.http_reply(DOCKER_REPLY), unix_path=home.home / ".docker" / "run" / "docker.sock"
            ).start(),
            "metadata": honeytokens.Trap(
                "metadata",
                honeytokens.http_reply(
                    json.dumps(
                        {
                            "Code": "Success",
                            "AccessKeyId": "ASIAHONEY",
                            "SecretAccessKey": metadata.value,
                            "note": "br-metadata",
                        }
                    ),
                    "application/json",
                ),
            ).start(),
            "sink": honeytokens.Trap("sink", honeytokens.http_reply("br-sink: non-web port reached\n")).start(),
        }
        ctx.data["honeytokens"] = [t.public() for t in home.tokens.values()]
        ctx.data["marker_regex"] = home.regex
        ctx.data["traps"] = {name: trap.describe() for name, trap in self.traps.items()}

    def _gateway_config(self, ctx: ScenarioContext) -> GatewayConfig:
        assert self.upstream is not None
        policy_path = self._policy_file(ctx)
        overrides = self.upstream.overrides()
        sink = f"127.0.0.1:{self.traps['sink'].port}"
        for port in probes.SCANNED_PORTS:
            overrides[f"{probes.ALLOWED_HOST}:{port}"] = sink
        overrides[f"{probes.METADATA_IP}:80"] = f"127.0.0.1:{self.traps['metadata'].port}"
        env_name = honeytokens.ENV_KEY_NAME
        return GatewayConfig(
            policy=policy_path,
            audit_path=ctx.run_dir / "gateway-audit.jsonl",
            state_dir=ctx.run_dir / "gateway",
            credentials=[
                CredentialSpec("anthropic", MODEL_API, "x-api-key", env=env_name),
                CredentialSpec("anthropic-http", MODEL_API, "x-api-key", port=MODEL_API_PLAIN_PORT, env=env_name),
            ],
            upstream_overrides=overrides,
            upstream_ca_file=self.upstream.ca_file,
            extra_env={env_name: self.home.api_key},
        )

    def _policy_file(self, ctx: ScenarioContext) -> Path:
        policy_path = ctx.run_dir / "isolation-policy.yaml"
        text = leaky_mod.LEAKY_POLICY if self.leaky else yaml.safe_dump(reference_policy(), sort_keys=False)
        policy_path.write_text(text)
        ctx.data["policy"] = {"file": policy_path.name, "name": yaml.safe_load(text)["name"]}
        return policy_path

    def _start_peer(self, ctx: ScenarioContext) -> int:
        """A peer proxy as every sandbox's egress, from the same policy file; the outside names resolve, for the
        peer only, to peer_outside_address(), where the stand-ins listen on the real ports. Returns its port."""
        expected = {MODEL_API: ("x-api-key", self.home.api_key)}
        outside = peer_outside_address()
        self.upstream = UpstreamServer(expected=expected, host=outside, http_port=80, https_port=443)
        self.upstream.start()
        for port in probes.SCANNED_PORTS:
            name = f"sink-{port}"
            reply = honeytokens.http_reply("br-sink: non-web port reached\n")
            self.traps[name] = honeytokens.Trap(name, reply, port=port, host=outside).start()
        names = {name: outside for name in (*self.upstream.names, probes.ALLOWED_HOST, MODEL_API)}
        setup = EgressSetup(
            policy=self._policy_file(ctx),
            workdir=ctx.run_dir / "egress",
            names=names,
            upstream_ca=self.upstream.ca_file,
        )
        egress = self.egress = start_egress(self.egress_name, setup, ctx.supervisor)
        self.stack.callback(egress.stop)
        ctx.data["egress_setup"] = {
            **egress.describe(),
            "untranslatable": [{"rule": u.rule, "why": u.why} for u in egress.untranslatable],
            "outside_address": outside,
        }
        return egress.proxy.port

    def _boot(self, ctx: ScenarioContext) -> None:
        backend = ctx.backend.weaken(self.traps["docker"].unix_path) if self.leaky else ctx.backend
        # Only a backend without isolation lets these through; an isolating one never sees them.
        careless_user = {"user_home": self.home.home, "user_env": {honeytokens.ENV_KEY_NAME: self.home.api_key}}
        if self.egress_name == "gateway":
            self.upstream = UpstreamServer(expected={MODEL_API: ("x-api-key", self.home.api_key)}).start()
            fleet_context = ctx.fleet(self._gateway_config(ctx), backend=backend, **careless_user)
        else:
            fleet_context = ctx.fleet(None, backend=backend, egress_port=self._start_peer(ctx), **careless_user)
        fleet = self.fleet = self.stack.enter_context(fleet_context)
        errors: list[BaseException] = []
        booted: dict[int, Sandbox] = {}

        def boot(index: int) -> None:
            try:
                booted[index] = ctx.boot(fleet, f"{SANDBOX_PREFIX}-sb{index}")
            except BaseException as exc:
                errors.append(exc)

        # Boots in parallel: a TCG boot is ~2-3 s, and probes run one sandbox at a time anyway.
        threads = [threading.Thread(target=boot, args=(i,)) for i in range(self.sandboxes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.booted = [booted[i] for i in sorted(booted)]
        if errors:
            raise errors[0]

    def _provision(self, ctx: ScenarioContext) -> list[dict[str, Any]]:
        """The project (only) into the agent's working directory (/work in a guest); in leaky mode also the
        weakenings."""
        project_tar = leaky_mod.home_tarball(self.home.project)
        home_tar = leaky_mod.home_tarball(self.home.home) if self.leaky else b""
        assert self.fleet is not None
        dns = self.fleet.gateway  # --leaky runs only with the gateway (Options.validate)
        done = []
        for vm in self.booted:
            result = vm.exec("mkdir -p project && tar -x -C project", stdin=project_tar, timeout=PROVISION_TIMEOUT_S)
            steps = {"project": result.rc}
            if self.leaky:
                steps["home"] = vm.exec('tar -x -C "$HOME"', stdin=home_tar, timeout=PROVISION_TIMEOUT_S).rc
                assert dns is not None
                script = leaky_mod.guest_weakening_script(honeytokens.ENV_KEY_NAME, vm.network, dns.dns_port(vm.id))
                steps["env+resolver+engine"] = vm.exec(script, stdin=self.home.api_key.encode() + b"\n").rc
            if any(rc != 0 for rc in steps.values()):
                raise RuntimeError(f"provisioning {vm.id} failed: {steps}")
            done.append({"sandbox": vm.id, **steps})
        return done

    # ---- steady state, run ---------------------------------------------------------------
    def steady_state(self, ctx: ScenarioContext) -> dict[str, Any] | None:
        if not self.probed:
            # Before: is the detector armed? Every planted token is findable on the host and
            # every trap logs a connection made to it (then the counters are reset to zero).
            scan = self.home.host_scan()
            traps_ok = {}
            for name, trap in self.traps.items():
                before = trap.count()
                with contextlib.suppress(OSError), _connect(trap) as sock:
                    sock.sendall(b"GET /self-test HTTP/1.0\r\n\r\n")
                    sock.recv(64)
                time.sleep(0.1)
                traps_ok[name] = trap.count() > before
                trap.hits.clear()
            detector = {
                "host_scan": scan,
                "traps_log_connections": traps_ok,
                "sandboxes_up": len(self.booted) == self.sandboxes,
            }
            ctx.data["detector"] = detector
            return {"met": scan["ok"] and all(traps_ok.values()) and detector["sandboxes_up"], **detector}
        leaks = ctx.data.get("leaks") or 0
        return {"met": leaks == 0, "leaks": leaks}

    def run(self, ctx: ScenarioContext) -> None:
        facts = host_facts()
        peers_all = [probes.Peer(vm.id, self._endpoints(vm), self._paths(vm)) for vm in self.booted]
        assert self.upstream is not None
        for vm in self.booted:
            env = probes.ProbeEnv(
                target=vm,
                home=self.home,
                traps=self.traps,
                host=facts,
                peers=[p for p in peers_all if p.id != vm.id],
                upstream_received=self.upstream.received,
                upstream_http_port=self.upstream.http_port,
                upstream_host=self.upstream.host,
                egress=self.egress_name,
            )
            card: dict[str, Any] = {"sandbox": vm.id, "backend": ctx.backend.name, "probes": [], "leaks": 0}
            ctx.data["scorecards"].append(card)
            for probe in probes.PROBES:
                with ctx.journal.activity(f"probe:{probe.id}@{vm.id}", "probe") as step:
                    result = probes.run_probe(probe, env)
                    step.output = {"passed": result["passed"], "reason": result["reason"]}
                card["probes"].append(result)
                card["leaks"] = sum(1 for p in card["probes"] if p["passed"] is False)
            ctx.save()
        self.probed = True
        self._summarise(ctx)

    def _endpoints(self, sandbox: Sandbox) -> dict[str, Endpoint]:
        """Host-side addresses that lead into `sandbox`: its own, and its gateway listener."""
        assert self.fleet is not None
        listener = self.fleet.egress_listener(sandbox.id)
        return {**sandbox.host_endpoints(), **({"gateway listener": listener} if listener else {})}

    def _paths(self, sandbox: Sandbox) -> dict[str, str]:
        """Host paths that lead into `sandbox`: its directory on the host (every backend), and a jail's channel
        directory, sockets and workspace."""
        assert self.fleet is not None
        own = sandbox.host_paths() if isinstance(sandbox, probes.HasHostPaths) else {}
        return {"sandbox directory": str(self.fleet.workdir(sandbox.id)), **{k: str(v) for k, v in own.items()}}

    def _summarise(self, ctx: ScenarioContext) -> None:
        cards = ctx.data["scorecards"]
        ctx.data["leaks"] = sum(card["leaks"] for card in cards)
        summary: dict[str, dict[str, int]] = {}
        for card in cards:
            for probe in card["probes"]:
                counts = summary.setdefault(probe["id"], {"passed": 0, "failed": 0, "not_applicable": 0})
                key = {True: "passed", False: "failed", None: "not_applicable"}[probe["passed"]]
                counts[key] += 1
        ctx.data["summary"] = summary

    # ---- rollback, exit code -------------------------------------------------------------
    def rollback(self, ctx: ScenarioContext) -> None:
        with ctx.journal.activity("remove-honeytokens-and-stop", "rollback") as step:
            problems: list[str] = []
            for label, action in (
                ("fleet", self.stack.close),
                ("upstream", self._stop_upstream),
                ("traps", self._stop_traps),
                ("decoy", lambda: self._stop_decoy(ctx)),
            ):
                try:
                    action()
                except Exception as exc:  # keep undoing the rest; the honeytokens must go
                    problems.append(f"{label}: {type(exc).__name__}: {exc}")
            removed = self.home.remove()
            step.output = {**removed, "problems": problems}
        with ctx.journal.activity("check-evidence-is-clean", "rollback") as step:
            ctx.data["evidence_clean"] = step.output = scan_run_dir(ctx.run_dir, self.home)
        ctx.data["cleanup"] = {**removed, "problems": problems}

    def _stop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.stop()

    def _stop_traps(self) -> None:
        for trap in self.traps.values():
            trap.stop()

    def _stop_decoy(self, ctx: ScenarioContext) -> None:
        if self.decoy_pid is not None:
            ctx.supervisor.stop(self.decoy_pid)
            self.decoy_pid = None

    def exit_code(self, ctx: ScenarioContext) -> int:
        clean = ctx.data.get("evidence_clean", {}).get("clean", False)
        armed = (ctx.journal.steady_states.get("before") or {}).get("met", False)
        ok = ctx.journal.status == "completed" and ctx.data.get("leaks") == 0 and clean and armed
        return 0 if ok else 1


@contextlib.contextmanager
def _connect(trap: Any) -> Any:
    import socket

    if trap.unix_path is not None:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(2)
        sock.connect(str(trap.unix_path))
    else:
        sock = socket.create_connection((trap.host, trap.port), timeout=2)
    with sock:
        yield sock


def scan_run_dir(run_dir: Path, home: Any) -> dict[str, Any]:
    """The run's own files must not leak: no raw marker anywhere under the run directory."""
    values = {t.id: t.value for t in home.tokens.values() if t.secret}
    leaking: list[dict[str, Any]] = []
    scanned = 0
    for path in run_dir.rglob("*"):
        if not path.is_file():
            continue
        scanned += 1
        with contextlib.suppress(OSError):
            text = path.read_bytes().decode(errors="replace")
            found = [token_id for token_id, value in values.items() if value in text]
            if found:
                leaking.append({"file": str(path.relative_to(run_dir)), "tokens": found})
    return {"clean": not leaking, "files_scanned": scanned, "leaking_files": leaking}


def terminal_summary(data: dict[str, Any]) -> RenderableType:
    """The scorecard for the terminal, from the run's saved data (see harness.scenario)."""
    from rich.console import Group
    from rich.table import Table

    table = Table(title=f"isolation scorecard{' (LEAKY set-up)' if data.get('leaky') else ''}")
    table.add_column("probe")
    for card in data.get("scorecards", []):
        table.add_column(card["sandbox"])
    for index, probe in enumerate(probes.PROBES):
        cells = []
        for card in data.get("scorecards", []):
            passed = card["probes"][index]["passed"] if index < len(card["probes"]) else None
            cells.append({True: "[green]pass[/]", False: "[red]FAIL[/]", None: "n/a"}[passed])
        table.add_row(f"{probe.id}: {probe.title}", *cells)
    return Group(table, f"leaks: {data.get('leaks')}")


def needs(options: Options, config: RunConfig) -> Needs:
    """--leaky weakens the backend for real, which only a backend that can do so may be asked to."""
    return Needs(features=("weaken",)) if options.leaky else Needs()


def create(options: Options) -> IsolationScenario:
    return IsolationScenario(sandboxes=options.sandboxes, leaky=options.leaky, egress=options.egress)


def sweep_leftovers() -> list[str]:
    """For `invoke clean`: remove honeytoken homes that a SIGKILLed run could not roll back."""
    return honeytokens.sweep_leftovers()
