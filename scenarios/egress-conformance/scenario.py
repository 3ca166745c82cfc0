"""egress-conformance: is this egress proxy configured safely? One corpus, any egress.

    invoke scenario egress-conformance --egress gateway,squid,tinyproxy,mitmproxy

Every egress (harness/egress) is started from one policy (conformance-policy.yaml beside this file) with
every name of the corpus resolved to a loopback canary (canaries.py). A host-side client sends each case
of the corpus (corpus.py: ports, names and IDN, IP literal forms, userinfo, target/Host/SNI mismatch,
smuggling, header abuse, credential binding, path rules, known-key exfiltration, bounded resource abuse,
DNS) and each case is scored by what reached the canaries, what the client saw, and where the model key
appeared (scoring.py). No sandbox is booted: the scenario runs on the host backend whatever --backend says.

FINDINGS' egress problems are cases here: a 403 instead of a reject is what `client` records; DNS outside
the policy is the dns family; CONNECT to :22 and :9999 on an allowed host are ports cases. Content
inspection beyond the known keys is out of scope. An egress whose module or binary is missing is
"skipped: <reason>", never a crash. Exit code: non-zero when the gateway fails a case that is not in
GATEWAY_EXPECTED_FAILURES (a CI gate); the peers' failures are findings, not failures.

Limits: cases run one after another and a canary connection belongs to the case that was running when it was
accepted (SETTLE_S after each case); a proxy that dials late or pools upstream connections across clients
would blur that. Names the table lacks fall to the gateway's catch-all canary, but to a peer's own resolver
(.test never resolves on the internet). Inside a blind tunnel no egress can see a key: exfiltration is tested
on plain http and inside TLS the egress terminates. A canary answers 200 to everything; redirects, large or
slow answers from upstream are not cases here.
"""

from __future__ import annotations

import secrets
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config import RunConfig
from harness.egress import EgressSetup, check_egress_names, start_egress
from harness.errors import ConfigError
from harness.scenario.base import Needs, ScenarioContext

from . import client
from .canaries import Canaries
from .corpus import CANARIES, CASES, FAMILIES, Case
from .scoring import Verdict, fill, not_applicable, score, summarize

NAME = "egress-conformance"
HERE = Path(__file__).resolve().parent
DEFAULT_POLICY = HERE / "conformance-policy.yaml"
KEY_ENV = "BR_CONFORMANCE_MODEL_KEY"
"""The env name the policy's credential reads its value from (given to the egress in EgressSetup.credentials)."""
SETTLE_S = 0.03
"""After a case, how long before the next starts, so a late dial is still the case's own."""
TAIL_S = 0.4
"""After the last case, how long the canaries get to finish recording (their idle read is 0.15 s)."""
SAMPLE_EVERY_S = 0.2
"""How often each egress process's connections are sampled for a non-loopback remote address."""
GATEWAY_EXPECTED_FAILURES: dict[str, str] = {}
"""Case id -> the gateway bug it shows. Listed here (never silently weakened) so CI still gates the rest."""


@dataclass(frozen=True)
class Options:
    """`invoke scenario egress-conformance --egress gateway,squid --set families=ports,names`."""

    egress: str = "gateway"
    """Egresses to judge, comma-separated: gateway, squid, tinyproxy, mitmproxy (a missing one is skipped)."""
    families: str = "all"
    """Case families to run, comma-separated, or all."""
    policy: Path = DEFAULT_POLICY
    """The gateway policy YAML every egress is configured from (the corpus expects the shipped one)."""

    @property
    def egresses(self) -> list[str]:
        return [name.strip() for name in self.egress.split(",") if name.strip()]

    @property
    def family_list(self) -> list[str]:
        if self.families.strip() == "all":
            return list(FAMILIES)
        return [name.strip() for name in self.families.split(",") if name.strip()]

    def validate(self) -> None:
        if not self.egresses:
            raise ConfigError("egress-conformance: --egress needs at least one egress name")
        check_egress_names(self.egresses)
        unknown = [f for f in self.family_list if f not in FAMILIES]
        if unknown or not self.family_list:
            raise ConfigError(
                f"egress-conformance: unknown family {', '.join(unknown) or '(none)'}; "
                f"choose from all, {', '.join(FAMILIES)}"
            )
        if not self.policy.is_file():
            raise ConfigError(f"egress-conformance: policy {self.policy} is not a file")


def needs(options: Options, config: RunConfig) -> Needs:
    """A host-side client against proxies: no sandbox, so no guest image or accelerator to prepare."""
    return Needs(no_sandboxes=True)


def create(options: Options) -> ConformanceScenario:
    return ConformanceScenario(options)


class ConnectionSampler:
    """Samples an egress's processes' connections; any remote address outside loopback is recorded."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.foreign: set[str] = set()
        self.samples = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="egress-connection-sampler")

    def _loop(self) -> None:
        import psutil

        while not self._stop.wait(SAMPLE_EVERY_S):
            for pid in self.pids:
                try:
                    proc = psutil.Process(pid)
                    procs = [proc, *proc.children(recursive=True)]
                except psutil.Error:
                    continue
                for each in procs:
                    try:
                        conns = each.net_connections(kind="inet")
                    except psutil.Error as exc:
                        if len(self.errors) < 5:
                            self.errors.append(f"{each.pid}: {exc}")
                        continue
                    self.samples += 1
                    for conn in conns:
                        if conn.raddr and not is_loopback(conn.raddr.ip):
                            self.foreign.add(f"{conn.raddr.ip}:{conn.raddr.port}")

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def is_loopback(address: str) -> bool:
    import ipaddress

    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def trust_for(canary_ca: Path, egress_ca: Path | None) -> ssl.SSLContext:
    """What the client trusts inside a tunnel: the canaries' CA, and the egress's own when it intercepts."""
    ctx = ssl.create_default_context(cafile=str(canary_ca))
    # Certificates are verified; the name is not: mismatch cases send an SNI other than the tunnel's host, and
    # some none at all. Which canary the bytes reached is what is scored.
    ctx.check_hostname = False
    if egress_ca is not None and egress_ca.exists():
        ctx.load_verify_locations(cafile=str(egress_ca))
    return ctx


def run_case(
    case: Case, proxy: tuple[str, int], trust: ssl.SSLContext, key: str, dns_port: int | None
) -> tuple[bytes, client.Seen]:
    sent = fill(case.send, key)
    if case.kind == "http":
        return sent, client.exchange(proxy, sent)
    if case.kind == "connect":
        inner = fill(case.inner, key)
        return sent + (b"\r\n--- then inside the tunnel ---\r\n" + inner if inner else b""), client.tunnel(
            proxy, sent, inner, case.sni, case.tls, trust
        )
    if case.kind == "dns":
        assert dns_port is not None
        return sent, client.dns_query(dns_port, sent)
    if case.kind == "concurrent":
        return sent, client.concurrent(proxy, sent, case.count)
    if case.kind == "slow":
        return sent, client.slow(proxy, sent, case.count, 0.2)
    raise ValueError(f"unknown case kind {case.kind}")


def applicability(case: Case, untranslatable: list[dict[str, Any]], dns_port: int | None) -> str | None:
    """None when the case applies to this egress; else why it does not."""
    if "dns" in case.requires and dns_port is None:
        return "this egress offers no DNS resolver (its clients get none through it)"
    for need in case.requires:
        for rule in untranslatable:
            if need in rule["cases"]:
                return f"untranslatable rule {rule['rule']!r}: {rule['why']}"
    return None


class ConformanceScenario:
    name = NAME

    def __init__(self, options: Options) -> None:
        self.options = options
        self.canaries: Canaries | None = None
        self.key = "sk-conf-" + secrets.token_hex(20)
        self.results: dict[str, dict[str, Any]] = {}

    def cases(self) -> list[Case]:
        wanted = set(self.options.family_list)
        return [c for c in CASES if c.family in wanted]

    def setup(self, ctx: ScenarioContext) -> None:
        with ctx.journal.activity("start-canaries") as act:
            self.canaries = ctx.keep(Canaries(CANARIES, ctx.run_dir / "canaries"))
            act.output = {
                "listeners": len(self.canaries.listeners),
                "moved": {f"{a}:{p}": b for (a, p), b in self.canaries.bound.items() if b != p},
            }

    def steady_state(self, ctx: ScenarioContext) -> None:
        return None

    def run(self, ctx: ScenarioContext) -> None:
        cases = self.cases()
        data: dict[str, Any] = {
            "egresses": self.options.egresses,
            "families": self.options.family_list,
            "cases": len(cases),
            "policy": str(self.options.policy),
            "results": self.results,
            "expected_failures": GATEWAY_EXPECTED_FAILURES,
            "out_of_scope": "Content inspection beyond the known keys (a secret the egress was not given, "
            "data in a blind TLS tunnel) is out of scope: a pass means the egress met these cases, not that "
            "nothing can leave through it.",
        }
        ctx.data["conformance"] = data
        for name in self.options.egresses:
            with ctx.journal.activity(f"egress:{name}") as act:
                self.results[name] = self.judge(ctx, name, cases)
                act.output = {k: self.results[name].get(k) for k in ("status", "totals", "wall_s")}
            ctx.save()

    def judge(self, ctx: ScenarioContext, name: str, cases: list[Case]) -> dict[str, Any]:
        assert self.canaries is not None
        names = self.canaries.names()
        if name == "gateway":
            # The gateway's catch-all override: a name the table lacks still lands on a canary (sink), never
            # the host's resolver. The peers get the plain table (their translation of "*" is theirs to add).
            names["*"] = "127.0.0.9"
        setup = EgressSetup(
            policy=self.options.policy,
            workdir=ctx.run_dir / "egress" / name,
            names=names,
            upstream_ca=self.canaries.ca_file,
            credentials={KEY_ENV: self.key},
        )
        setup.workdir.mkdir(parents=True, exist_ok=True)
        try:
            egress = start_egress(name, setup, ctx.supervisor)
        except ModuleNotFoundError as exc:
            return {"status": f"skipped: no module harness.egress.{name} yet ({exc.name})"}
        except Exception as exc:  # a missing binary (EnvironmentMissing) or a proxy that would not start
            return {"status": f"skipped: {type(exc).__name__}: {exc}"}
        started = time.monotonic()
        verdicts: list[Verdict] = []
        try:
            untranslatable = [{"rule": u.rule, "why": u.why, "cases": list(u.cases)} for u in egress.untranslatable]
            process = getattr(egress, "process", None)
            dns_port = process.dns_port("conformance") if process is not None else None
            trust = trust_for(self.canaries.ca_file, egress.ca_file)
            proxy = (egress.proxy.host, egress.proxy.port)
            spans: list[tuple[Case, bytes, client.Seen, int, int]] = []
            with ConnectionSampler(list(egress.pids)) as sampler:
                for case in cases:
                    reason = applicability(case, untranslatable, dns_port)
                    if reason:
                        verdicts.append(not_applicable(case, reason))
                        continue
                    first = len(self.canaries.connections)
                    sent, seen = run_case(case, proxy, trust, self.key, dns_port)
                    time.sleep(SETTLE_S)
                    spans.append((case, sent, seen, first, len(self.canaries.connections)))
                time.sleep(TAIL_S)
            for case, sent, seen, first, last in spans:
                verdicts.append(score(case, sent, seen, self.canaries.connections[first:last], self.key))
            describe = egress.describe()
        finally:
            egress.stop()
        order = {c.id: i for i, c in enumerate(cases)}
        verdicts.sort(key=lambda v: order[v.case])
        expected = GATEWAY_EXPECTED_FAILURES if name == "gateway" else {}
        run_failures = [f"{name} dialled a non-loopback address: {a}" for a in sorted(sampler.foreign)]
        return {
            "status": "ran",
            "describe": describe,
            "untranslatable": untranslatable,
            "dns": dns_port is not None,
            "wall_s": round(time.monotonic() - started, 2),
            "families": summarize(verdicts),
            "totals": {r: sum(1 for v in verdicts if v.result == r) for r in ("pass", "fail", "n/a")},
            "failures": [v.to_json() for v in verdicts if v.result == "fail"],
            # Every case in one line: what the client saw, which canaries it reached, where the key appeared.
            "outcomes": {v.case: {"result": v.result, **v.evidence.get("summary", {})} for v in verdicts},
            "not_applicable": [v.to_json() for v in verdicts if v.result == "n/a"],
            "unexpected_failures": [v.case for v in verdicts if v.result == "fail" and v.case not in expected],
            "expected_failures_passed": [v.case for v in verdicts if v.result == "pass" and v.case in expected],
            "run_failures": run_failures,
            "connection_samples": sampler.samples,
        }

    def rollback(self, ctx: ScenarioContext) -> None:
        """Each egress is stopped after its cases; the canaries are run resources the runner releases."""

    def exit_code(self, ctx: ScenarioContext) -> int:
        gateway = self.results.get("gateway")
        if "gateway" not in self.options.egresses:
            return 0
        if not gateway or gateway.get("status") != "ran":
            return 1
        return 1 if gateway["unexpected_failures"] or gateway["run_failures"] else 0


def terminal_summary(data: dict[str, Any]) -> str:
    """Per egress: pass / fail / n/a, or why it was skipped."""
    conf = data.get("conformance") or {}
    lines = [f"{conf.get('cases', 0)} cases per egress"]
    for name, result in (conf.get("results") or {}).items():
        if result.get("status") != "ran":
            lines.append(f"{name}: {result.get('status')}")
            continue
        t = result["totals"]
        lines.append(f"{name}: {t['pass']} pass, {t['fail']} fail, {t['n/a']} n/a ({result['wall_s']} s)")
        for failure in result["failures"][:8]:
            lines.append(f"  fail {failure['case']}: {'; '.join(failure['reasons'])}")
        if len(result["failures"]) > 8:
            lines.append(f"  ... and {len(result['failures']) - 8} more (see the report)")
        lines += [f"  {line}" for line in result["run_failures"]]
    return "\n".join(lines)
