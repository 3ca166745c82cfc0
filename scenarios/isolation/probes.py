"""The isolation probes: small self-describing units, run inside a sandbox through its agent.

Each probe has an id, a title, what a pass proves, how it fails, and a check that runs shell
commands inside the target (anything with `exec(cmd, timeout) -> ExecResult`: a QEMU guest, or a
plain host shell to prove the probe goes red without isolation) and judges them, where possible
against host-side ground truth (trap listeners that log every connection, the upstream stand-in's
request log). Commands use only busybox applets (sh, nc, grep, nslookup, ps, timeout).

A probe's evidence is a list of {what, command, rc, timed_out, output} with every honeytoken
marker redacted to its id and hash; `passed` is True, False, or None (not applicable).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from harness.sandbox.base import Endpoint, ExecResult, GuestNetwork

from .honeytokens import HoneyHome, Trap

METADATA_IP = "169.254.169.254"
BLOCKED_HOST = "example.com"
"""A name the reference policy (balanced) blocks, as in FINDINGS probes 4 and 5."""
ALLOWED_HOST = "github.com"
"""A name the reference policy allows on :443 only (FINDINGS probe 6)."""
SCANNED_PORTS = (22, 9999)
SENTINEL = "proxy-managed"
KEY_VARS = (
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GITHUB_TOKEN",
    "KUBECONFIG",
    "DOCKER_AUTH_CONFIG",
)
NC_WAIT_S = 2
"""busybox nc -w: connect and idle timeout; a dropped SYN (restrict=on) costs this much."""
NSLOOKUP_TIMEOUT_S = 3
EXCERPT_CHARS = 700
"""Evidence output kept per command (after redaction)."""
SCAN_TIMEOUT_S = 60.0
PARALLEL_TIMEOUT_S = 30.0
SEPARATOR = "==BR-PART=="


class Target(Protocol):
    id: str
    network: GuestNetwork
    """Its egress, host alias and resolver as seen from inside: the addresses the probes aim at."""

    def exec(self, command: str, timeout: float = 30.0, stdin: bytes = b"") -> ExecResult: ...


@dataclass
class Peer:
    """Another sandbox of the same run, as the host knows it (the guest is never told)."""

    id: str
    endpoints: dict[str, Endpoint]
    """Host-side addresses that lead into the peer (its agent's forward, its gateway listener), by name."""


@dataclass
class HostFacts:
    boot_id: str
    kernel_release: str
    process_count: int


@dataclass
class ProbeEnv:
    """Everything a probe may use: the target, its peers, the planted secrets and the traps."""

    target: Target
    home: HoneyHome
    traps: dict[str, Trap]
    host: HostFacts
    peers: list[Peer] = field(default_factory=list)
    upstream_received: Callable[[], list[Any]] = list
    """The upstream stand-in's request log (Received records)."""
    upstream_http_port: int = 0
    evidence: list[dict[str, Any]] = field(default_factory=list)

    def redact(self, text: str) -> str:
        return self.home.redactor()(text)

    def record(self, what: str, command: str, result: ExecResult, **extra: Any) -> dict[str, Any]:
        output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
        item = {
            "what": what,
            "command": self.redact(command),
            "rc": result.rc,
            "timed_out": result.timed_out,
            "output": self.redact(output)[:EXCERPT_CHARS],
            **extra,
        }
        self.evidence.append(item)
        return item

    def run(self, what: str, command: str, timeout: float = 20.0) -> tuple[str, ExecResult]:
        result = self.target.exec(command, timeout=timeout)
        self.record(what, command, result)
        return result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace"), result

    def parallel(self, commands: dict[str, str], timeout: float = PARALLEL_TIMEOUT_S) -> dict[str, tuple[int, str]]:
        """Run named commands concurrently in the target; {name: (rc, stdout+stderr)}.

        Each part is recorded as its own evidence item with its own command and exit code.
        """
        scratch = f"/tmp/.br-probe-{secrets.token_hex(4)}"
        lines = [f"mkdir -p {scratch}"]
        for i, command in enumerate(commands.values()):
            lines.append(f"( {command} ) >{scratch}/{i}.out 2>&1 </dev/null; echo $? >{scratch}/{i}.rc &")
        lines.append("wait")
        for i in range(len(commands)):
            lines.append(f"echo '{SEPARATOR} {i}' $(cat {scratch}/{i}.rc); cat {scratch}/{i}.out")
        lines.append(f"rm -rf {scratch}")
        result = self.target.exec("\n".join(lines), timeout=timeout)
        text = result.stdout.decode(errors="replace")
        parts: dict[int, tuple[int, str]] = {}
        for chunk in text.split(SEPARATOR + " ")[1:]:
            head, _, body = chunk.partition("\n")
            index, _, rc = head.partition(" ")
            parts[int(index)] = (int(rc) if rc.strip().lstrip("-").isdigit() else -1, body)
        out: dict[str, tuple[int, str]] = {}
        for i, (name, command) in enumerate(commands.items()):
            rc, body = parts.get(i, (-1, "(no output: the probe command timed out)" if result.timed_out else ""))
            out[name] = (rc, body)
            self.evidence.append(
                {
                    "what": name,
                    "command": self.redact(command),
                    "rc": rc,
                    "timed_out": result.timed_out and i not in parts,
                    "output": self.redact(body)[:EXCERPT_CHARS],
                }
            )
        return out


@dataclass(frozen=True)
class Verdict:
    passed: bool | None
    reason: str
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Probe:
    """One isolation claim, checked inside one sandbox."""

    id: str
    title: str
    proves: str
    """What a pass shows."""
    fails_when: str
    """What turns it red (and what the --leaky configuration does to get there)."""
    finding: str
    """The FINDINGS.md / issue probe it automates."""
    check: Callable[[ProbeEnv], Verdict]

    def describe(self) -> dict[str, str]:
        return {
            "id": self.id,
            "title": self.title,
            "proves": self.proves,
            "fails_when": self.fails_when,
            "finding": self.finding,
        }


def run_probe(probe: Probe, env: ProbeEnv) -> dict[str, Any]:
    env.evidence = []
    started = time.monotonic()
    try:
        verdict = probe.check(env)
    except Exception as exc:  # a probe that cannot run cannot vouch for isolation: it is red
        verdict = Verdict(False, f"probe error: {type(exc).__name__}: {exc}")
    result = {
        **probe.describe(),
        "passed": verdict.passed,
        "reason": verdict.reason,
        "facts": verdict.facts,
        "evidence": env.evidence,
        "duration_s": round(time.monotonic() - started, 2),
    }
    # Facts quote guest output too (response bodies): redact the whole record, not just evidence.
    # Markers are [a-z0-9-] only, so JSON escaping cannot split one.
    redacted: dict[str, Any] = json.loads(env.redact(json.dumps(result, default=str)))
    return redacted


# ---- shell snippets ----------------------------------------------------------------------
def crlf(*lines: str) -> str:
    """A printf format for an HTTP head (literal \\r\\n escapes, % escaped)."""
    return "".join(line.replace("%", "%%") + "\\r\\n" for line in lines) + "\\r\\n"


def send(payload_fmt: str, host: str, port: int, wait_s: int = NC_WAIT_S) -> str:
    return f"printf '{payload_fmt}' | nc -w {wait_s} {host} {port}"


def via_gateway_connect(env: ProbeEnv, authority: str, inner_fmt: str = "") -> str:
    """CONNECT through the target's gateway, then send `inner_fmt` inside the tunnel if it opens."""
    egress = env.target.network.egress
    return send(crlf(f"CONNECT {authority} HTTP/1.1", f"Host: {authority}") + inner_fmt, egress.host, egress.port)


def via_gateway_get(env: ProbeEnv, url: str, *headers: str) -> str:
    host = url.split("/")[2]
    egress = env.target.network.egress
    return send(crlf(f"GET {url} HTTP/1.1", f"Host: {host}", *headers, "Connection: close"), egress.host, egress.port)


@dataclass(frozen=True)
class HttpAnswer:
    status: int | None
    headers: dict[str, str]
    body: str

    @property
    def tunnel_open(self) -> bool:
        return self.status == 200


def parse_http(text: str) -> HttpAnswer:
    match = re.search(r"HTTP/1\.[01] (\d{3})[^\n]*\n", text)
    if not match:
        return HttpAnswer(None, {}, text)
    head, _, body = text[match.end() :].partition("\r\n\r\n")
    headers = {}
    for line in head.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return HttpAnswer(int(match.group(1)), headers, body)


def refusal(rc: int, text: str, connect: bool) -> dict[str, Any]:
    """How a request was refused, and the exit code curl would have given (FINDINGS probe 4)."""
    answer = parse_http(text)
    if answer.status is not None:
        level = "none (allowed)" if answer.status < 400 and answer.status != 0 else "http"
        curl_rc = 56 if connect and answer.status != 200 else 0
    elif "refused" in text.lower():
        level, curl_rc = "tcp (connection refused)", 7
    elif rc != 0 and "timed out" in text.lower():
        level, curl_rc = "tcp (timed out)", 28
    else:
        level, curl_rc = "tcp (reset or empty reply)", 52 if not connect else 56
    return {
        "status": answer.status,
        "level": level,
        "curl_exit": curl_rc,
        "headers": {
            k: v
            for k, v in answer.headers.items()
            if k in ("x-proxy-error", "x-blastradius-decision", "content-type", "server")
        },
        "body": answer.body[:160],
    }


def markers_in(env: ProbeEnv, text: str) -> list[dict[str, Any]]:
    return [m for m in env.home.redactor().find(text) if m["secret"]]


# ---- the probes --------------------------------------------------------------------------
def check_env(env: ProbeEnv) -> Verdict:
    parts = env.parallel(
        {
            "env": "env",
            "process environments": "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' <$f; echo; done | sort -u",
        }
    )
    text = parts["env"][1] + parts["process environments"][1]
    found = markers_in(env, text)
    keys = sorted(
        {
            m.group(1)
            for m in re.finditer(rf"^({'|'.join(KEY_VARS)})=(.+)$", text, re.M)
            if m.group(2).strip() not in ("", SENTINEL)
        }
    )
    facts = {"markers": found, "key_variables_with_values": keys}
    if found or keys:
        return Verdict(False, f"secrets in the environment: {len(found)} honeytoken(s), variables {keys}", facts)
    return Verdict(True, "no key or honeytoken in env or any /proc/*/environ", facts)


def check_fs_scan(env: ProbeEnv) -> Verdict:
    # Regular files only (a FIFO would block grep forever), skipping the pseudo filesystems;
    # busybox grep has no --exclude-dir, so find does the walking. HOME and the working directory go
    # first, and a secret found there ends the scan: where / is a whole host's disk, walking it all
    # would only spend the time budget on a verdict already reached.
    regex = env.home.regex
    walk = "\\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -type f"
    command = (
        f"dmesg | grep -oE '{regex}' | sed 's/^/dmesg:/'; "
        f'near=$(find "$HOME" "$PWD" {walk} -exec grep -soHE \'{regex}\' {{}} +); '
        'echo "$near"; '
        f"echo \"$near\" | grep -v -- '-control-' | grep -q . || find / {walk} -exec grep -soHE '{regex}' {{}} +; "
        "true"
    )
    text, _ = env.run("scan the whole filesystem and the kernel log for markers", command, timeout=SCAN_TIMEOUT_S)
    pattern = re.compile(regex)
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for line in text.splitlines():
        match = pattern.search(line)
        if match:
            path = line[: match.start()].rstrip(":")
            found.setdefault((path, match.group(0)), {"path": path, **env.home.redactor().identify(match.group(0))})
    hits = list(found.values())
    control = [h for h in hits if h["id"] == "control"]
    leaked = [h for h in hits if h["secret"]]
    facts = {"hits": hits, "control_found_at": [h["path"] for h in control]}
    if leaked:
        return Verdict(False, f"{len(leaked)} honeytoken(s) readable in the guest", facts)
    if not control:
        return Verdict(
            False,
            "the scan did not find the positive control in the mounted project: it cannot vouch for anything",
            facts,
        )
    return Verdict(True, "only the positive control (in the mounted project) matched", facts)


def check_processes(env: ProbeEnv) -> Verdict:
    parts = env.parallel(
        {
            "process list": "ps -o pid,args",
            "command lines": "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' <$f; echo; done",
        }
    )
    listing = parts["process list"][1]
    count = max(0, len([line for line in listing.splitlines() if line.strip()]) - 1)
    decoy = [m for m in markers_in(env, listing + parts["command lines"][1]) if m["id"] == "decoy"]
    facts = {"guest_processes": count, "host_processes": env.host.process_count, "decoy_seen": bool(decoy)}
    if decoy:
        return Verdict(False, f"a host process (the decoy) is visible: {count} processes listed", facts)
    return Verdict(True, f"{count} processes, none of the host's {env.host.process_count} (decoy absent)", facts)


def check_kernel(env: ProbeEnv) -> Verdict:
    text, _ = env.run("boot id and kernel", "cat /proc/sys/kernel/random/boot_id; uname -r; uname -v")
    lines = [*text.splitlines(), "", ""]
    facts = {
        "guest_boot_id": lines[0].strip(),
        "host_boot_id": env.host.boot_id,
        "guest_kernel": lines[1].strip(),
        "host_kernel": env.host.kernel_release,
    }
    if not facts["guest_boot_id"] or facts["guest_boot_id"] == env.host.boot_id:
        return Verdict(False, "same boot id as the host: the host's own kernel", facts)
    return Verdict(True, f"own kernel ({facts['guest_kernel']}; host {facts['host_kernel']})", facts)


def check_home(env: ProbeEnv) -> Verdict:
    assert env.home.home is not None
    rels = [
        t.where.split(" ")[0]
        for t in env.home.tokens.values()
        if t.kind == "file" and t.secret and not t.where.startswith("env:")
    ]
    rels = sorted(set(rels))
    bases = ["$HOME", "/root", "/home/*", str(env.home.home)]
    candidates = " ".join(f"{base}/{rel}" for base in bases for rel in rels)
    command = (
        f'for p in {candidates}; do [ -e "$p" ] && echo "visible $p"; done; '
        "echo \"work: $(ls -A . | tr '\\n' ' ')\"; "
        "grep -E ' (9p|virtiofs|nfs|fuse|cifs) ' /proc/mounts | sed 's/^/mount: /'; true"
    )
    text, _ = env.run("look for the host home's secret files and foreign mounts", command)
    visible = sorted({line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("visible ")})
    work = next((line[6:].split() for line in text.splitlines() if line.startswith("work: ")), [])
    mounts = [line[7:] for line in text.splitlines() if line.startswith("mount: ")]
    facts = {"visible": visible, "work": work, "shared_mounts": mounts}
    extra = [name for name in work if name != "project"]
    if visible or extra:
        return Verdict(False, f"host home files visible: {visible}; unexpected at work: {extra}", facts)
    return Verdict(True, "only the project directory; no ~/.ssh, ~/.aws, ~/.kube, ~/.env", facts)


def _trap_window(env: ProbeEnv, name: str) -> int:
    return env.traps[name].count()


def check_host_loopback(env: ProbeEnv) -> Verdict:
    trap = env.traps["canary"]
    start = trap.count()
    port = trap.port
    request = crlf("GET /version HTTP/1.0", "Host: localhost")
    commands = {
        f"guest 127.0.0.1:{port} (must be the guest's own loopback)": send(request, "127.0.0.1", port),
        f"guest localhost:{port}": send(request, "localhost", port),
        f"gateway CONNECT 127.0.0.1:{port}": via_gateway_connect(env, f"127.0.0.1:{port}", request),
        f"gateway CONNECT localhost:{port}": via_gateway_connect(env, f"localhost:{port}", request),
        f"gateway GET http://127.0.0.1:{port}/": via_gateway_get(env, f"http://127.0.0.1:{port}/version"),
    }
    if (alias := env.target.network.host_alias) is not None:
        commands[f"host alias {alias}:{port}"] = send(request, alias, port)
    parts = env.parallel(commands)
    time.sleep(0.2)  # let the trap's accept thread log a connection that just landed
    hits = trap.hits_since(start)
    reached = [name for name, (_, out) in parts.items() if "br-canary" in out]
    facts = {
        "canary": f"127.0.0.1:{port}",
        "canary_connections": len(hits),
        "reached_by": reached,
        "paths": {name: refusal(rc, out, "CONNECT" in name) for name, (rc, out) in parts.items()},
    }
    if hits or reached:
        return Verdict(False, f"the host canary got {len(hits)} connection(s); reached by {reached}", facts)
    return Verdict(True, "canary untouched: localhost inside is the guest's own, the host is unreachable", facts)


def check_engine_socket(env: ProbeEnv) -> Verdict:
    trap = env.traps["docker"]
    start = trap.count()
    sockets = [
        "/var/run/docker.sock",
        "/run/docker.sock",
        "/run/containerd/containerd.sock",
        "/run/podman/podman.sock",
        "$HOME/.docker/run/docker.sock",
        str(trap.unix_path),
    ]
    ping = crlf("GET /_ping HTTP/1.0", "Host: docker")
    command = (
        f'for s in {" ".join(sockets)}; do [ -S "$s" ] && echo "socket $s"; done; '
        'echo "DOCKER_HOST=$DOCKER_HOST"; '
        'case "$DOCKER_HOST" in tcp://*) hp=${DOCKER_HOST#tcp://}; '
        f"printf '{ping}' | nc -w {NC_WAIT_S} ${{hp%:*}} ${{hp##*:}};; esac; "
        + (f"printf '{ping}' | nc -w {NC_WAIT_S} {alias} 2375; " if (alias := env.target.network.host_alias) else "")
        + "true"
    )
    text, _ = env.run("look for a container-engine socket and talk to it", command)
    time.sleep(0.2)
    hits = trap.hits_since(start)
    present = [line[7:] for line in text.splitlines() if line.startswith("socket ")]
    answered = "br-fake-docker" in text
    facts = {"sockets": present, "engine_answered": answered, "engine_connections": len(hits)}
    if present or answered or hits:
        return Verdict(
            False,
            f"host engine reachable: sockets {present}, answered {answered}, "
            f"{len(hits)} connection(s) to the host socket",
            facts,
        )
    return Verdict(True, "no engine socket, no DOCKER_HOST, the host socket saw nothing", facts)


def check_blocked_domain(env: ProbeEnv) -> Verdict:
    head = crlf("GET / HTTP/1.1", f"Host: {BLOCKED_HOST}", "Connection: close")
    commands = {
        f"gateway CONNECT {BLOCKED_HOST}:443": via_gateway_connect(env, f"{BLOCKED_HOST}:443"),
        f"gateway GET http://{BLOCKED_HOST}/": via_gateway_get(env, f"http://{BLOCKED_HOST}/"),
    }
    if (alias := env.target.network.host_alias) is not None:
        where = f"{alias}:{env.upstream_http_port}"
        commands[f"direct to the {BLOCKED_HOST} stand-in ({where})"] = send(head, alias, env.upstream_http_port)
    parts = env.parallel(commands)
    facts: dict[str, Any] = {}
    allowed = []
    for name, (rc, out) in parts.items():
        how = refusal(rc, out, "CONNECT" in name)
        facts[name] = how
        answer = parse_http(out)
        if name.startswith("direct"):
            if answer.status is not None:
                allowed.append(name)
        elif answer.status is not None and answer.status < 400:
            allowed.append(name)
    if allowed:
        return Verdict(False, f"{BLOCKED_HOST} reachable via {allowed}", facts)
    proxied = facts[f"gateway GET http://{BLOCKED_HOST}/"]
    return Verdict(
        True,
        f"denied by the gateway ({proxied['level']} {proxied['status']}, curl exit "
        f"{proxied['curl_exit']}); direct egress fails",
        facts,
    )


NAME_ANSWER_RE = re.compile(r"Name:\s*(\S+)\s*\n\s*Address:?\s*(\S+)")


def check_dns(env: ProbeEnv) -> Verdict:
    lookup = f"timeout -s KILL {NSLOOKUP_TIMEOUT_S} nslookup {BLOCKED_HOST}"
    commands = {"system resolver": lookup}
    if (resolver := env.target.network.resolver) is not None:
        commands[f"the network's own resolver {resolver}"] = f"{lookup} {resolver}"
    parts = env.parallel(commands)
    resolved = {}
    for name, (_, out) in parts.items():
        answers = [addr for host, addr in NAME_ANSWER_RE.findall(out) if host.rstrip(".") == BLOCKED_HOST]
        if answers:
            resolved[name] = answers
    facts = {"resolved": resolved}
    if resolved:
        return Verdict(False, f"blocked name {BLOCKED_HOST} resolves: {resolved}", facts)
    return Verdict(True, f"{BLOCKED_HOST} does not resolve through any resolver the guest can reach", facts)


def check_ports(env: ProbeEnv) -> Verdict:
    hello = crlf("GET / HTTP/1.0", f"Host: {ALLOWED_HOST}")
    commands = {
        f"gateway CONNECT {ALLOWED_HOST}:{port}": via_gateway_connect(env, f"{ALLOWED_HOST}:{port}", hello)
        for port in SCANNED_PORTS
    }
    control = f"control: gateway CONNECT {ALLOWED_HOST}:443 (must open)"
    commands[control] = via_gateway_connect(env, f"{ALLOWED_HOST}:443")
    parts = env.parallel(commands)
    facts = {name: refusal(rc, out, True) for name, (rc, out) in parts.items()}
    opened = [name for name, (_, out) in parts.items() if name != control and parse_http(out).tunnel_open]
    if opened:
        return Verdict(False, f"policy is not port-scoped: {opened} opened", facts)
    if not parse_http(parts[control][1]).tunnel_open:
        return Verdict(False, f"control {ALLOWED_HOST}:443 did not open, so the denials prove nothing", facts)
    return Verdict(True, f"{ALLOWED_HOST}:443 opens, :{' and :'.join(map(str, SCANNED_PORTS))} are denied", facts)


def check_credential(env: ProbeEnv) -> Verdict:
    nonce = secrets.token_hex(6)
    parts = env.parallel(
        {
            "model API request with the sentinel": via_gateway_get(
                env, "http://api.anthropic.com/v1/messages", f"x-api-key: {SENTINEL}", f"x-br-probe: {nonce}"
            ),
            "the key as the guest sees it": 'echo "ANTHROPIC_API_KEY=$ANTHROPIC_API_KEY"',
        }
    )
    _, out = parts["model API request with the sentinel"]
    answer = parse_http(out)
    mine = [r for r in env.upstream_received() if r.headers.get("x-br-probe") == nonce]
    upstream = mine[-1].credential if mine else "no request arrived"
    seen = parts["the key as the guest sees it"][1].strip().partition("=")[2]
    leaked = markers_in(env, out + seen)
    facts = {
        "status": answer.status,
        "upstream_credential_check": upstream,
        "guest_key_value": "empty" if not seen else (SENTINEL if seen == SENTINEL else "a real-looking key"),
        "markers_seen_by_guest": leaked,
    }
    if leaked or (seen and seen != SENTINEL):
        return Verdict(False, "the guest holds the real key", facts)
    if answer.status != 200 or upstream != "ok":
        return Verdict(
            False,
            f"the model API call did not succeed with an injected key "
            f"(status {answer.status}, upstream saw {upstream})",
            facts,
        )
    return Verdict(
        True, "200 from the model API with the key injected on the host; the guest saw only the sentinel", facts
    )


def check_metadata(env: ProbeEnv) -> Verdict:
    trap = env.traps["metadata"]
    start = trap.count()
    path = "/latest/meta-data/iam/security-credentials/"
    parts = env.parallel(
        {
            f"direct {METADATA_IP}:80": send(crlf(f"GET {path} HTTP/1.0", f"Host: {METADATA_IP}"), METADATA_IP, 80),
            f"gateway GET http://{METADATA_IP}{path}": via_gateway_get(env, f"http://{METADATA_IP}{path}"),
            f"gateway CONNECT {METADATA_IP}:80": via_gateway_connect(
                env, f"{METADATA_IP}:80", crlf(f"GET {path} HTTP/1.0", f"Host: {METADATA_IP}")
            ),
        }
    )
    time.sleep(0.2)
    hits = trap.hits_since(start)
    reached = [name for name, (_, out) in parts.items() if "br-metadata" in out or markers_in(env, out)]
    facts = {
        "metadata_connections": len(hits),
        "reached_by": reached,
        "paths": {name: refusal(rc, out, "CONNECT" in name) for name, (rc, out) in parts.items()},
    }
    if hits or reached:
        return Verdict(False, f"cloud metadata reachable ({len(hits)} connection(s)) via {reached}", facts)
    return Verdict(True, f"{METADATA_IP} unreachable directly and through the gateway", facts)


def agent_request(command: str) -> str:
    """A guest-agent request (harness/image/guest/br-agent protocol) as a printf format."""
    return f"BR1 5 {base64.b64encode(command.encode()).decode()}\\n"


def check_peers(env: ProbeEnv) -> Verdict:
    if not env.peers:
        return Verdict(None, "not applicable: needs at least two sandboxes")
    ask = agent_request("hostname")
    connect = crlf(f"CONNECT {ALLOWED_HOST}:443 HTTP/1.1", f"Host: {ALLOWED_HOST}:443")
    network = env.target.network
    own_path = f"{network.own_address}:{network.agent_port} (the sandbox's own address)"
    commands: dict[str, str] = {own_path: send(ask, network.own_address, network.agent_port)}
    for peer in env.peers:
        for kind, endpoint in peer.endpoints.items():
            # What the host forwards to the peer's agent speaks the agent protocol; anything else, HTTP.
            payload = ask if kind == "agent" else connect
            if network.host_alias is not None:
                where = f"{network.host_alias}:{endpoint.port}"
                commands[f"{peer.id} {kind} via host alias {where}"] = send(payload, network.host_alias, endpoint.port)
            if kind == "agent":
                commands[f"{peer.id} {kind} via gateway CONNECT {endpoint}"] = via_gateway_connect(
                    env, str(endpoint), ask
                )
    parts = env.parallel(commands)
    reached = []
    for name, (_, out) in parts.items():
        peer_id, _, path = name.partition(" ")
        if not any(p.id == peer_id for p in env.peers):
            continue
        # Any agent answer on a peer's forward is the peer's agent; a peer's gateway listener answers HTTP at all.
        # (The own gateway's 403 for CONNECT 127.0.0.1:<port> is a refusal, not the peer.)
        agent_answered = path.startswith("agent ") and re.search(r"BR1 0 \d+ \d+ \d+", out) is not None
        listener_answered = not path.startswith("agent ") and parse_http(out).status is not None
        if agent_answered or listener_answered:
            reached.append(name)
    own = parts[own_path][1]
    facts = {"peers": [p.id for p in env.peers], "reached": reached, "own_address_answers": "BR1 0 " in own}
    if reached:
        return Verdict(False, f"another sandbox is reachable: {reached}", facts)
    return Verdict(True, f"no path to {len(env.peers)} other sandbox(es)' agent or gateway listener", facts)


PROBES: tuple[Probe, ...] = (
    Probe(
        "env",
        "No key in the environment",
        "env and every process environment hold no API key and no honeytoken marker",
        "a key variable with a real value or any marker (leaky: the host key is exported in the guest)",
        "issue probe 1, FINDINGS 'credential-less agents'",
        check_env,
    ),
    Probe(
        "fs-scan",
        "No honeytoken readable anywhere",
        "a grep of the whole guest filesystem and kernel log finds only the positive control",
        "any secret marker is found, or the positive control is not (leaky: the planted home is copied in)",
        "issue probes 1 and 10",
        check_fs_scan,
    ),
    Probe(
        "processes",
        "Process isolation",
        "the guest's process list holds none of the host's processes (a decoy host process carries a marker)",
        "the decoy host process is visible (the host shell target shows it)",
        "issue probe 2, FINDINGS 13 processes",
        check_processes,
    ),
    Probe(
        "kernel",
        "Separate kernel",
        "the guest's boot id differs from the host's",
        "same boot id (the host shell target)",
        "issue probe 3, FINDINGS 'own Linux kernel'",
        check_kernel,
    ),
    Probe(
        "home",
        "Only the project directory",
        "none of the host home's ~/.ssh, ~/.aws, ~/.kube, ~/.env files exist; /work holds only the project",
        "a planted path exists in the guest (leaky: home copied into /root)",
        "issue probe 4, FINDINGS 1",
        check_home,
    ),
    Probe(
        "host-loopback",
        "Host loopback services unreachable",
        "the canary on host 127.0.0.1 got no connection by any path; the guest's localhost is its own",
        "the canary logs a connection (leaky: slirp restrict=off, policy allows loopback)",
        "issue probe 5, FINDINGS 2",
        check_host_loopback,
    ),
    Probe(
        "engine-socket",
        "No host container-engine socket",
        "no docker/containerd socket in the guest, no DOCKER_HOST, the host's socket saw nothing",
        "the fake host engine answers or logs a connection (leaky: forwarded into the guest)",
        "issue probe 6, FINDINGS 7",
        check_engine_socket,
    ),
    Probe(
        "blocked-domain",
        "Blocked domain is denied",
        "through the gateway example.com gets the configured deny; direct egress fails",
        "any path gets a 2xx/3xx answer (leaky: open policy, unrestricted network)",
        "issue probe 7, FINDINGS 4",
        check_blocked_domain,
    ),
    Probe(
        "dns",
        "Blocked name does not resolve",
        "example.com gets no address from any resolver the guest can reach",
        "an address comes back (leaky: the guest gets the gateway's resolver under an allow-all policy)",
        "issue probe 8, FINDINGS 5",
        check_dns,
    ),
    Probe(
        "ports",
        "Allowed host is port-scoped",
        "CONNECT github.com:443 opens while :22 and :9999 are denied",
        "a non-443 port opens (leaky: every port allowed)",
        "issue probe 9, FINDINGS 6",
        check_ports,
    ),
    Probe(
        "credential",
        "Credential sentinel",
        "a model-API call with only the sentinel succeeds (key injected on the host); the guest never holds the key",
        "the guest holds the key, or the call fails (leaky: the key is in the guest env)",
        "issue probe 10, FINDINGS 'credential-less agents'",
        check_credential,
    ),
    Probe(
        "metadata",
        "Cloud metadata unreachable",
        "169.254.169.254 is unreachable directly and through the gateway",
        "the metadata stand-in logs a connection (leaky: policy allows link-local)",
        "issue probe 11",
        check_metadata,
    ),
    Probe(
        "peers",
        "Sandbox-to-sandbox",
        "no sandbox reaches another's agent or gateway listener",
        "a peer's agent answers (leaky: slirp restrict=off reaches its host port)",
        "issue probe 12",
        check_peers,
    ),
)

PROBES_BY_ID = {p.id: p for p in PROBES}
