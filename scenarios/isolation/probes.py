"""The isolation probes: small self-describing units, run inside a sandbox through its agent.

Each probe has an id, a title, what a pass proves, how it fails, and a check that runs shell
commands inside the target (anything with `exec(cmd, timeout) -> ExecResult`: a QEMU guest, or a
plain host shell to prove the probe goes red without isolation) and judges them, where possible
against host-side ground truth (trap listeners that log every connection, the upstream stand-in's
request log). Commands use only busybox applets (sh, nc, grep, nslookup, ps, timeout), except the
field evaluation's own commands (curl, dig), which run where the sandbox has those tools and are n/a where
it does not.

A probe's evidence is a list of {what, command, rc, timed_out, output} with every honeytoken
marker redacted to its id and hash; `passed` is True, False, or None (not applicable, with the reason).

Every probe means the same on every backend (a QEMU microVM, a bwrap or gVisor jail, the plain host
process, a user's command stack). Where a backend lacks what a path needs (a host alias, a resolver
of its own, an agent port), the probe says what it aims at instead -- 127.0.0.1 inside is the host's
loopback exactly when the sandbox shares the host's network, so it is always tried -- and it never
passes because a check was skipped.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import re
import secrets
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from harness.sandbox.base import Endpoint, ExecResult, GuestNetwork
from harness.supervisor import OWNER_ENV

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
LOOPBACK = "127.0.0.1"
"""Inside: the sandbox's own loopback, or the host's when the sandbox shares the host's network."""
ENGINE_TCP_PORT = 2375
"""Docker's plain-TCP API port: where a forwarded engine usually answers."""
SUPERVISORS = (
    "bwrap",
    "runsc",
    "qemu-system",
    "firecracker",
    "containerd-shim",
    "conmon",
    "crun",
    "runc",
    "dockerd",
    "sbx",
)
"""Executables that run sandboxes from the host: one visible inside is the sandbox's supervisor showing
through (bwrap is PID 1 of its own jail), or the host's process table."""
PROCESS_LIST_MAX = 60
"""Processes kept in the processes probe's facts (the host backend lists all of the host's)."""
COMMAND_CHARS = 160
"""Characters kept of each listed process's command line."""
UPTIME_SLACK_S = 1.0
"""How far the uptime read inside may lie outside the host's readings taken around the same exec and
still count as the host's own clock (the exec's own latency is inside the window already)."""
PEER_SOCKET_TIMEOUT_S = 5
"""socat's wait on a unix socket (an agent's answer) inside a jail."""
FIND_SOCAT = "S=$(command -v socat || command -v /usr/bin/socat)"
"""Sets $S to socat inside, if there is one (a jail's rootfs has it in /usr/bin, off the agent's PATH)."""


class Target(Protocol):
    id: str
    network: GuestNetwork
    """Its egress, host alias and resolver as seen from inside: the addresses the probes aim at."""

    def exec(self, command: str, timeout: float = 30.0, stdin: bytes = b"") -> ExecResult: ...


@runtime_checkable
class HasHostPaths(Protocol):
    """A sandbox whose doors on the host are files, not ports (a jail's channel directory and sockets)."""

    def host_paths(self) -> dict[str, Path]: ...


@dataclass
class Peer:
    """Another sandbox of the same run, as the host knows it (the guest is never told)."""

    id: str
    endpoints: dict[str, Endpoint]
    """Host-side addresses that lead into the peer (its agent's forward, its gateway listener), by name."""
    paths: dict[str, str] = field(default_factory=dict)
    """Host paths that lead into the peer (a jail's channel directory and sockets, its workspace, its
    directory on the host), by name: what must not be visible inside another sandbox."""


def host_boot_clock() -> float:
    """The host kernel's uptime now (CLOCK_BOOTTIME: the clock /proc/uptime shows)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass
class HostFacts:
    """Host-side ground truth the probes compare against, read on the host (never from a sandbox)."""

    boot_id: str
    kernel_release: str
    process_count: int
    proc_version: str = ""
    """The host's /proc/version, whole."""
    pid1: str = ""
    """The host's PID 1 command line (to tell whether a sandbox sees the host's own init)."""
    resolvers: tuple[str, ...] = ()
    """The host's own nameservers (its /etc/resolv.conf): a sandbox must not reach them either."""
    clock: Callable[[], float] = host_boot_clock
    """The host's uptime now; read around each kernel probe, so its window brackets the reading inside."""


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
    upstream_host: str = "127.0.0.1"
    """Where the upstream stand-in listens on the host (another loopback address when a peer is the egress)."""
    egress: str = "gateway"
    """The sandboxes' egress: the gateway, or a peer proxy that injects no credentials."""
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
    observed: str = ""
    """For a field-evaluation probe: what the evaluation's command gave here, in the evaluation's terms
    (exit code, HTTP code, addresses), to stand beside the evaluation's own outcome."""


@dataclass(frozen=True)
class FieldEvaluation:
    """A hand-run probe of the field evaluation (FINDINGS.md), as it was run and what it saw."""

    command: str
    """The evaluation's command, as written."""
    outcome: str
    """What it gave there."""
    source: str
    """Where FINDINGS.md records it."""

    def describe(self) -> dict[str, str]:
        return {"command": self.command, "outcome": self.outcome, "source": self.source}


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
    method: str = ""
    """How it judges, the same on every backend, and what it aims at where a backend lacks an address."""
    tools: tuple[str, ...] = ()
    """Programs it needs beyond busybox's applets, looked for inside (`command -v`), never assumed from the
    image's name: a user's own stack or the host has them or not the same way. Missing: n/a."""
    covered_by: str = ""
    """The busybox probe that covers the same path where the tools are missing."""
    field_evaluation: FieldEvaluation | None = None
    """The field evaluation's hand-run command this probe runs as written, and its outcome there."""

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "id": self.id,
            "title": self.title,
            "proves": self.proves,
            "fails_when": self.fails_when,
            "finding": self.finding,
            "method": self.method,
        }
        if self.tools:
            described["tools"] = list(self.tools)
        if self.field_evaluation is not None:
            described["field_evaluation"] = self.field_evaluation.describe()
        return described


def tools_command(tools: tuple[str, ...]) -> str:
    # One name per `command -v`: busybox's shell looks up only the first of several.
    return f'for t in {" ".join(tools)}; do command -v "$t"; done; true'


def tools_found(text: str) -> set[str]:
    """The programs `command -v` printed: a path for a program, the bare name for a shell builtin."""
    return {line.strip().rsplit("/", 1)[-1] for line in text.splitlines() if line.strip()}


def missing_tools(env: ProbeEnv, probe: Probe) -> list[str]:
    """The probe's tools that the sandbox lacks, checked inside (recorded as evidence)."""
    text, _ = env.run("the tools this probe needs, looked for inside", tools_command(probe.tools), timeout=10.0)
    found = tools_found(text)
    return [tool for tool in probe.tools if tool not in found]


def run_probe(probe: Probe, env: ProbeEnv) -> dict[str, Any]:
    env.evidence = []
    started = time.monotonic()
    try:
        missing = missing_tools(env, probe) if probe.tools else []
        if missing:
            # Never a pass: a command that cannot run vouches for nothing.
            covered = f": the busybox probe {probe.covered_by} above covers the same path" if probe.covered_by else ""
            verdict = Verdict(None, f"not applicable: the sandbox has no {'/'.join(missing)}{covered}")
        else:
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
    if probe.field_evaluation is not None:
        result["observed"] = verdict.observed or verdict.reason
    # Facts quote guest output too (response bodies): redact the whole record, not just evidence.
    # Markers are [a-z0-9-] only, so JSON escaping cannot split one.
    redacted: dict[str, Any] = json.loads(env.redact(json.dumps(result, default=str)))
    return redacted


# ---- shell snippets ----------------------------------------------------------------------
def crlf(*lines: str) -> str:
    """A printf format for an HTTP head (literal \\r\\n escapes, % escaped)."""
    return "".join(line.replace("%", "%%") + "\\r\\n" for line in lines) + "\\r\\n"


def send(payload_fmt: str, host: str, port: int, wait_s: int = NC_WAIT_S, hold_s: float = 0) -> str:
    """A shell command that sends `payload_fmt` (a printf format) with nc and prints the answer; with `hold_s`,
    the sending side stays open that long before its end reaches the server."""
    payload = f"printf '{payload_fmt}'"
    if hold_s:
        payload = f"{{ {payload}; sleep {hold_s:g}; }}"
    return f"{payload} | nc -w {wait_s} {host} {port}"


CONNECT_HOLD_S = 1.0
"""A CONNECT's client keeps its side open this long, as a real client does while it waits for the tunnel: a
proxy may drop a client that half-closes before its upstream connection is up (mitmproxy does)."""


def via_egress_connect(env: ProbeEnv, authority: str, inner_fmt: str = "") -> str:
    """CONNECT through the target's egress, then send `inner_fmt` inside the tunnel if it opens."""
    egress = env.target.network.egress
    request = crlf(f"CONNECT {authority} HTTP/1.1", f"Host: {authority}") + inner_fmt
    return send(request, egress.host, egress.port, hold_s=CONNECT_HOLD_S)


def via_egress_get(env: ProbeEnv, url: str, *headers: str) -> str:
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
    elif "unreachable" in text.lower() or "no route" in text.lower():
        level, curl_rc = "tcp (no route: network or host unreachable)", 7
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


def host_addresses(network: GuestNetwork) -> dict[str, str]:
    """Addresses inside that would reach the host's loopback if isolation were broken, with what each means.

    127.0.0.1 is always tried: it is the sandbox's own loopback, unless the sandbox shares the host's
    network (the host backend, a jail without a network namespace), when it is the host's. The host
    alias, where a backend has one (QEMU's 10.0.2.2), is the host itself."""
    found = {LOOPBACK: "loopback inside: the host's only if the sandbox shares the host's network"}
    alias = network.host_alias
    if alias == LOOPBACK:
        found[LOOPBACK] = "the host alias is 127.0.0.1: the sandbox shares the host's network"
    elif alias is not None:
        found[alias] = "the host alias"
    return found


def http_statuses(text: str) -> list[int]:
    """Every HTTP status line in a reply, in order (a proxy's answer, then what a tunnel carried)."""
    return [int(code) for code in re.findall(r"HTTP/1\.[01] (\d{3})", text)]


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
    # Every process the harness starts on the host carries OWNER_ENV: seeing it inside means the environment
    # of a host-side process is readable (bwrap's PID 1 is the bwrap process itself; the host backend sees all).
    host_side = re.search(rf"^{OWNER_ENV}=", parts["process environments"][1], re.M) is not None
    facts = {
        "markers": found,
        "key_variables_with_values": keys,
        "host_started_environment_visible": host_side,
    }
    if found or keys:
        return Verdict(False, f"secrets in the environment: {len(found)} honeytoken(s), variables {keys}", facts)
    note = "; the (scrubbed) environment of a process started on the host is readable inside" if host_side else ""
    return Verdict(True, f"no key or honeytoken in env or any /proc/*/environ{note}", facts)


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


PS_LINE_RE = re.compile(r"^\s*(\d+)\s+(.*)$")


def parse_process_list(listing: str) -> list[tuple[int, str]]:
    """(pid, command) for each line of busybox `ps -o pid,args` (its header skipped)."""
    rows = []
    for line in listing.splitlines():
        match = PS_LINE_RE.match(line)
        if match:
            rows.append((int(match.group(1)), match.group(2).strip()))
    return rows


def executable_name(command: str) -> str:
    """The program a ps line runs: busybox shows `{comm} argv...` when they differ, so take argv[0]."""
    words = re.sub(r"^\{[^}]*\}\s*", "", command).split()
    return words[0].rsplit("/", 1)[-1] if words else ""


def supervisors_in(rows: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """Sandbox runtimes (SUPERVISORS) among the processes listed inside."""
    found = []
    for pid, command in rows:
        name = executable_name(command)
        if any(name.startswith(known) for known in SUPERVISORS):
            found.append({"pid": pid, "name": name})
    return found


def check_processes(env: ProbeEnv) -> Verdict:
    parts = env.parallel(
        {
            "process list": "ps -o pid,args",
            "command lines": "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' <$f; echo; done",
        }
    )
    listing = parts["process list"][1]
    rows = parse_process_list(listing)
    count = len(rows)
    decoy = [m for m in markers_in(env, listing + parts["command lines"][1]) if m["id"] == "decoy"]
    pid1 = next((command for pid, command in rows if pid == 1), "")
    supervisors = supervisors_in(rows)
    host_pid1 = bool(env.host.pid1) and pid1.strip() == env.host.pid1.strip()
    shown = [f"{pid} {command[:COMMAND_CHARS]}" for pid, command in rows[:PROCESS_LIST_MAX]]
    facts = {
        "guest_processes": count,
        "host_processes": env.host.process_count,
        "decoy_seen": bool(decoy),
        "pid1": pid1[:COMMAND_CHARS],
        "pid1_is_hosts": host_pid1,
        "supervisor_visible": supervisors,
        "kernel_threads": sum(1 for _, command in rows if command.startswith("[")),
        "process_list": shown,
        "process_list_omitted": max(0, count - PROCESS_LIST_MAX),
    }
    pid1_words = executable_name(pid1) or "unknown"
    if host_pid1:
        pid1_words += " (the host's own init)"
    elif any(s["pid"] == 1 for s in supervisors):
        pid1_words += " (the sandbox's supervisor)"
    seen = ", ".join(f"{s['name']} (PID {s['pid']})" for s in supervisors) or "none"
    threads = facts["kernel_threads"]
    shows = (
        f"{threads} of them kernel threads; " if threads else ""
    ) + f"PID 1 is {pid1_words}; sandbox supervisor visible inside: {seen}"
    if decoy:
        return Verdict(
            False,
            f"a host process (the decoy) is visible: {count} processes listed, the host has "
            f"{env.host.process_count}; {shows}",
            facts,
        )
    return Verdict(
        True, f"{count} processes, none of the host's {env.host.process_count} (decoy absent); {shows}", facts
    )


# ---- the kernel probe: several independent signs, judged without booting anything ----------------
KERNEL_MARK = "==BR-K"
KERNEL_PARTS = {
    "boot_id": "cat /proc/sys/kernel/random/boot_id 2>&1",
    "release": "uname -r 2>&1",
    "version": "cat /proc/version 2>&1",
    "uptime": "cat /proc/uptime 2>&1",
    "log": "dmesg 2>&1 | grep -m 3 -iE 'linux version|gvisor|klogctl|not permitted|denied'",
}
"""What the kernel probe reads inside, one section each: the kernel's boot id, release, full version
string, boot clock and what its log (dmesg) says it is, or why there is no log to read."""
KERNEL_COMMAND = "; ".join(f'echo "{KERNEL_MARK} {name}"; {command}' for name, command in KERNEL_PARTS.items())
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
GVISOR_LOG_RE = re.compile(r"Starting gVisor", re.I)
LINUX_LOG_RE = re.compile(r"(Linux version .+)")


@dataclass(frozen=True)
class KernelView:
    """What one side shows of the kernel it runs on."""

    boot_id: str | None
    """/proc/sys/kernel/random/boot_id: random per boot of a Linux kernel; None when absent (gVisor has none)."""
    release: str | None
    """uname -r."""
    version: str | None
    """/proc/version whole: release, builder, compiler and build date; None when unreadable."""
    uptime_s: float | None = None
    """/proc/uptime's first field: the kernel's own boot clock."""
    log: str = ""
    """What dmesg says the kernel is (its 'Linux version' line, gVisor's 'Starting gVisor...'), or why it
    says nothing (klogctl: Operation not permitted)."""


def parse_kernel_view(text: str) -> KernelView:
    """The sections KERNEL_COMMAND printed, into a KernelView (a missing or unreadable part is None)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(KERNEL_MARK + " "):
            current = sections.setdefault(line[len(KERNEL_MARK) + 1 :].strip(), [])
        elif current is not None:
            current.append(line.rstrip())

    def first(name: str) -> str:
        return next((line.strip() for line in sections.get(name, []) if line.strip()), "")

    boot_id = first("boot_id")
    release = first("release")
    version = first("version")
    uptime = first("uptime").split()
    return KernelView(
        boot_id=boot_id if UUID_RE.match(boot_id) else None,
        release=release if release and " " not in release else None,
        version=version if version.startswith("Linux version") else None,
        uptime_s=float(uptime[0]) if uptime and re.fullmatch(r"\d+(\.\d+)?", uptime[0]) else None,
        log="\n".join(line for line in sections.get("log", []) if line.strip()),
    )


def _compare(inside: str | None, host: str | None) -> str:
    if inside is None:
        return "absent"
    return "same" if inside == host else "different"


def judge_kernel(inside: KernelView, host: KernelView, host_uptime: tuple[float, float] | None = None) -> Verdict:
    """Whose kernel answers inside: the host's (red), one of its own (green), or no telling (red).

    A container sharing the host's kernel shows the host's boot id and the host's exact /proc/version
    (and, where it may read the log, the host's 'Linux version' line). gVisor's sentry shows neither:
    it has no boot_id file, reports release 4.4.0 with a /proc/version of its own, keeps its own uptime,
    and its dmesg says 'Starting gVisor...'. A microVM has its own boot id, version, uptime and log.

    Red on any sign of the host's kernel: the host's boot id; the host's exact /proc/version (unless the
    boot id and uptime show a separate boot of the same build); a log naming the host's kernel; the
    host's uptime; or no boot id with the host's release (the host's kernel with the file hidden -- a
    separate kernel gains nothing by hiding its boot id and copying the host's release, so it is not
    given the benefit of the doubt). Green needs no such sign and at least two signs of its own, so no
    single spoofable file (a bind-mounted boot_id, a time namespace's uptime) decides. `host_uptime`
    brackets the inside reading: the host's uptime read just before and just after the exec."""
    boot = _compare(inside.boot_id, host.boot_id)
    release = _compare(inside.release, host.release)
    version = _compare(inside.version, host.version)
    if inside.uptime_s is None or host_uptime is None:
        clock = "unknown"
    else:
        low, high = host_uptime
        same = low - UPTIME_SLACK_S <= inside.uptime_s <= high + UPTIME_SLACK_S
        clock = "the host's" if same else "its own"
    separate_boot = boot == "different" and clock == "its own"

    if GVISOR_LOG_RE.search(inside.log):
        log = "gVisor"
    elif match := LINUX_LOG_RE.search(inside.log):
        line = match.group(1).strip()
        if line == host.version and (line != inside.version or not separate_boot):
            log = "the host's kernel"
        elif line == inside.version:
            log = "its own Linux kernel"
        else:
            log = "another Linux kernel"
    else:
        log = "nothing (" + (inside.log.splitlines()[0][:80] if inside.log else "no kernel log readable") + ")"

    shared: list[str] = []
    own: list[str] = []
    if boot == "same":
        shared.append("the host's boot id")
    elif boot == "different":
        own.append("a boot id of its own")
    if version == "same" and not separate_boot:
        shared.append("the host's exact /proc/version")
    elif version == "different":
        own.append("a /proc/version of its own")
    if boot == "absent" and release == "same":
        shared.append("no boot id but the host's release (the host's kernel with the file hidden)")
    if clock == "the host's":
        shared.append("the host's uptime")
    elif clock == "its own":
        own.append("an uptime of its own")
    if log == "the host's kernel":
        shared.append("a kernel log naming the host's kernel")
    elif log in ("gVisor", "its own Linux kernel"):
        own.append(f"a kernel log naming {'gVisor' if log == 'gVisor' else 'its own boot'}")

    name = "gVisor's sentry" if log == "gVisor" else f"Linux {inside.release}" if inside.release else "unknown"
    # The judgement and its signs first: the report shows the head of the facts.
    facts: dict[str, Any] = {
        "judgement": "the host's kernel" if shared else "a kernel of its own" if len(own) >= 2 else "unproven",
        "signs": {"boot_id": boot, "release": release, "proc_version": version, "uptime": clock, "log": log},
        "host_signs": shared,
        "own_signs": own,
        "same_build_booted_separately": version == "same" and separate_boot,
        "guest_boot_id": inside.boot_id or "",
        "host_boot_id": host.boot_id or "",
        "guest_kernel": inside.release or "",
        "host_kernel": host.release or "",
        "guest_uptime_s": inside.uptime_s,
        "host_uptime_s": list(host_uptime) if host_uptime else None,
        "kernel_log": inside.log[:300],
        "guest_proc_version": inside.version or "",
        "host_proc_version": host.version or "",
    }
    if shared:
        return Verdict(False, f"the host's own kernel: {'; '.join(shared)}", facts)
    if len(own) >= 2:
        return Verdict(True, f"a kernel of its own ({name}; host {host.release}): {'; '.join(own)}", facts)
    return Verdict(
        False,
        f"cannot tell it from the host's kernel: {len(own)} sign(s) of its own ({'; '.join(own) or 'none'}), "
        "two are needed",
        facts,
    )


def check_kernel(env: ProbeEnv) -> Verdict:
    before = env.host.clock()
    text, _ = env.run("boot id, release, /proc/version, uptime and kernel log", KERNEL_COMMAND)
    after = env.host.clock()
    host = KernelView(env.host.boot_id, env.host.kernel_release, env.host.proc_version or None)
    return judge_kernel(parse_kernel_view(text), host, (before, after))


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
        "grep -E ' (9p|virtiofs|nfs|fuse|cifs) ' /proc/mounts | sed 's/^/mount: /'; "
        "grep -vE ' /(proc|sys|dev)(/| )' /proc/mounts | awk '{print \"point: \" $2 \" \" $3}'; true"
    )
    text, _ = env.run("look for the host home's secret files and foreign mounts", command)
    visible = sorted({line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("visible ")})
    work = next((line[6:].split() for line in text.splitlines() if line.startswith("work: ")), [])
    mounts = [line[7:] for line in text.splitlines() if line.startswith("mount: ")]
    points = [line[7:] for line in text.splitlines() if line.startswith("point: ")]
    facts = {
        "visible": visible,
        "work": work,
        "shared_mounts": mounts,
        "mount_points": points,
        "homes_checked": bases,
    }
    extra = [name for name in work if name != "project"]
    if visible or extra:
        return Verdict(False, f"host home files visible: {visible}; unexpected at work: {extra}", facts)
    return Verdict(
        True,
        f"only the project directory; none of {len(rels)} planted files under $HOME, /root, /home/* or the "
        "host home's own path",
        facts,
    )


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
        f"{env.egress} CONNECT 127.0.0.1:{port}": via_egress_connect(env, f"127.0.0.1:{port}", request),
        f"{env.egress} CONNECT localhost:{port}": via_egress_connect(env, f"localhost:{port}", request),
        f"{env.egress} GET http://127.0.0.1:{port}/": via_egress_get(env, f"http://127.0.0.1:{port}/version"),
    }
    alias = env.target.network.host_alias
    if alias is not None and alias != LOOPBACK:
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
        "host_addresses": host_addresses(env.target.network),
    }
    if hits or reached:
        return Verdict(False, f"the host canary got {len(hits)} connection(s); reached by {reached}", facts)
    return Verdict(
        True,
        f"canary untouched by {len(parts)} paths: localhost inside is the sandbox's own"
        + ("" if alias is not None else " (it has no host alias)")
        + f", {env.egress} refuses host loopback",
        facts,
    )


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
    tcp = [f"{address}:{ENGINE_TCP_PORT}" for address in host_addresses(env.target.network)]
    command = (
        f'for s in {" ".join(sockets)}; do [ -S "$s" ] && echo "socket $s"; done; '
        'echo "DOCKER_HOST=$DOCKER_HOST"; '
        'case "$DOCKER_HOST" in tcp://*) hp=${DOCKER_HOST#tcp://}; '
        f"printf '{ping}' | nc -w {NC_WAIT_S} ${{hp%:*}} ${{hp##*:}};; esac; "
        + "".join(f"printf '{ping}' | nc -w {NC_WAIT_S} {where.replace(':', ' ')}; " for where in tcp)
        + "true"
    )
    text, _ = env.run("look for a container-engine socket and talk to it", command)
    time.sleep(0.2)
    hits = trap.hits_since(start)
    present = list(dict.fromkeys(line[7:] for line in text.splitlines() if line.startswith("socket ")))
    answered = "br-fake-docker" in text
    docker_host = next((line[12:] for line in text.splitlines() if line.startswith("DOCKER_HOST=")), "")
    facts = {
        "sockets": present,
        "engine_answered": answered,
        "engine_connections": len(hits),
        "sockets_checked": sockets,
        "tcp_checked": tcp,
        "docker_host": docker_host,
    }
    if present or answered or hits:
        return Verdict(
            False,
            f"host engine reachable: sockets {present}, answered {answered}, "
            f"{len(hits)} connection(s) to the host socket",
            facts,
        )
    return Verdict(
        True,
        f"none of {len(sockets)} engine socket paths (the host's own among them), no DOCKER_HOST, nothing on "
        f"{' or '.join(tcp)}; the host socket saw nothing",
        facts,
    )


def check_blocked_domain(env: ProbeEnv) -> Verdict:
    nonce = secrets.token_hex(6)
    head = crlf("GET / HTTP/1.1", f"Host: {BLOCKED_HOST}", f"x-br-probe: {nonce}", "Connection: close")
    commands = {
        f"{env.egress} CONNECT {BLOCKED_HOST}:443": via_egress_connect(env, f"{BLOCKED_HOST}:443"),
        f"{env.egress} GET http://{BLOCKED_HOST}/": via_egress_get(env, f"http://{BLOCKED_HOST}/"),
    }
    # Direct egress is aimed at the stand-in on host loopback, which answers as example.com: the same
    # target on every backend (127.0.0.1 inside, and the host alias where there is one).
    port = env.upstream_http_port
    # The stand-in's own loopback address stands in for 127.0.0.1 (they differ when a peer is the egress).
    addresses = {
        (env.upstream_host if address == "127.0.0.1" else address): meaning
        for address, meaning in host_addresses(env.target.network).items()
    }
    direct = {
        f"direct to the {BLOCKED_HOST} stand-in ({address}:{port}, {meaning})": send(head, address, port)
        for address, meaning in addresses.items()
    }
    parts = env.parallel({**commands, **direct})
    arrived = [r for r in env.upstream_received() if r.headers.get("x-br-probe") == nonce]
    facts: dict[str, Any] = {}
    allowed = []
    for name, (rc, out) in parts.items():
        how = refusal(rc, out, "CONNECT" in name)
        facts[name] = how
        answer = parse_http(out)
        if name in direct:
            if answer.status is not None:
                allowed.append(name)
        elif answer.status is not None and answer.status < 400:
            allowed.append(name)
    facts["direct_requests_at_the_stand_in"] = len(arrived)
    if allowed or arrived:
        where = allowed or "a direct path"
        return Verdict(False, f"{BLOCKED_HOST} reachable via {where} ({len(arrived)} direct arrival(s))", facts)
    proxied = facts[f"{env.egress} GET http://{BLOCKED_HOST}/"]
    tried = ", ".join(addresses)
    return Verdict(
        True,
        f"denied by {env.egress} ({proxied['level']} {proxied['status']}, curl exit "
        f"{proxied['curl_exit']}); direct to the stand-in via {tried} fails and it logged nothing",
        facts,
    )


NAME_ANSWER_RE = re.compile(r"Name:\s*(\S+)\s*\n\s*Address:?\s*(\S+)")
DNS_CODE_RE = re.compile(r"can't find [^:]+: (\w+)")


def lookup_outcome(rc: int, text: str, answers: list[str]) -> str:
    """How one nslookup ended, in words: an address, a resolver's refusal code, or no resolver at all."""
    if answers:
        return "resolved to " + ", ".join(answers)
    if match := DNS_CODE_RE.search(text):
        return f"a resolver answered {match.group(1)} (a DNS channel exists, the name got no address)"
    if rc == 137:
        return f"no resolver answered within {NSLOOKUP_TIMEOUT_S} s"
    return "no resolver reachable"


def check_dns(env: ProbeEnv) -> Verdict:
    lookup = f"timeout -s KILL {NSLOOKUP_TIMEOUT_S} nslookup {BLOCKED_HOST}"
    commands = {
        "resolv.conf": "cat /etc/resolv.conf 2>&1",
        "system resolver": lookup,
    }
    if (resolver := env.target.network.resolver) is not None:
        commands[f"the network's own resolver {resolver}"] = f"{lookup} {resolver}"
    # Not every backend's network offers a resolver; the host's own is the same target on every one.
    for server in env.host.resolvers:
        if server != resolver:
            commands[f"the host's resolver {server}"] = f"{lookup} {server}"
    parts = env.parallel(commands)
    conf = parts.pop("resolv.conf")[1]
    resolved = {}
    outcomes = {}
    for name, (rc, out) in parts.items():
        answers = [addr for host, addr in NAME_ANSWER_RE.findall(out) if host.rstrip(".") == BLOCKED_HOST]
        if answers:
            resolved[name] = answers
        outcomes[name] = lookup_outcome(rc, out, answers)
    nameservers = re.findall(r"^\s*nameserver\s+(\S+)", conf, re.M)
    facts = {"resolved": resolved, "outcomes": outcomes, "resolv_conf_nameservers": nameservers}
    if resolved:
        return Verdict(False, f"blocked name {BLOCKED_HOST} resolves: {resolved}", facts)
    system = "system resolver" + (f" ({', '.join(nameservers)})" if nameservers else " (resolv.conf names none)")
    said = "; ".join(f"{system if name == 'system resolver' else name}: {how}" for name, how in outcomes.items())
    return Verdict(True, f"{BLOCKED_HOST} gets no address: {said}", facts)


def check_ports(env: ProbeEnv) -> Verdict:
    hello = crlf("GET / HTTP/1.0", f"Host: {ALLOWED_HOST}")
    commands = {
        f"{env.egress} CONNECT {ALLOWED_HOST}:{port}": via_egress_connect(env, f"{ALLOWED_HOST}:{port}", hello)
        for port in SCANNED_PORTS
    }
    control = f"control: {env.egress} CONNECT {ALLOWED_HOST}:443 (must open)"
    commands[control] = via_egress_connect(env, f"{ALLOWED_HOST}:443")
    parts = env.parallel(commands)
    facts = {name: refusal(rc, out, True) for name, (rc, out) in parts.items()}
    opened = [name for name, (_, out) in parts.items() if name != control and parse_http(out).tunnel_open]
    if opened:
        return Verdict(False, f"policy is not port-scoped: {opened} opened", facts)
    if not parse_http(parts[control][1]).tunnel_open:
        return Verdict(False, f"control {ALLOWED_HOST}:443 did not open, so the denials prove nothing", facts)
    return Verdict(True, f"{ALLOWED_HOST}:443 opens, :{' and :'.join(map(str, SCANNED_PORTS))} are denied", facts)


def check_credential(env: ProbeEnv) -> Verdict:
    if env.egress != "gateway":
        seen = env.run("the key as the guest sees it", 'echo "ANTHROPIC_API_KEY=$ANTHROPIC_API_KEY"')[0]
        value = seen.strip().partition("=")[2]
        if markers_in(env, seen) or (value and value != SENTINEL):
            return Verdict(False, "the guest holds the real key", {"guest_key_value": "a real-looking key"})
        return Verdict(
            None,
            f"not applicable: {env.egress} injects no credentials, so a sandbox without the key cannot call the "
            "model API at all (the guest holds no key)",
            {"guest_key_value": value or "empty"},
        )
    nonce = secrets.token_hex(6)
    parts = env.parallel(
        {
            "model API request with the sentinel": via_egress_get(
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
    direct = f"direct {METADATA_IP}:80"
    parts = env.parallel(
        {
            # A TCP connect and nothing more: where a real metadata service answers (the host backend on a
            # cloud machine), asking it for credentials would copy the operator's own into the results.
            direct: f"nc -w {NC_WAIT_S} {METADATA_IP} 80 -e true && echo connected",
            f"{env.egress} GET http://{METADATA_IP}{path}": via_egress_get(env, f"http://{METADATA_IP}{path}"),
            f"{env.egress} CONNECT {METADATA_IP}:80": via_egress_connect(
                env, f"{METADATA_IP}:80", crlf(f"GET {path} HTTP/1.0", f"Host: {METADATA_IP}")
            ),
        }
    )
    time.sleep(0.2)
    hits = trap.hits_since(start)
    connected = parts[direct][0] == 0 and "connected" in parts[direct][1]
    reached = [
        name
        for name, (_, out) in parts.items()
        if "br-metadata" in out or markers_in(env, out) or (name == direct and connected)
    ]
    paths = {name: refusal(rc, out, "CONNECT" in name) for name, (rc, out) in parts.items()}
    if connected:
        paths[direct]["level"] = "none (TCP connection opened; no request sent)"
    facts = {"metadata_connections": len(hits), "reached_by": reached, "paths": paths}
    if hits or reached:
        return Verdict(False, f"cloud metadata reachable ({len(hits)} connection(s)) via {reached}", facts)
    return Verdict(
        True,
        f"{METADATA_IP} unreachable: no TCP connection directly ({paths[direct]['level']}), denied by {env.egress}",
        facts,
    )


def agent_request(command: str) -> str:
    """A guest-agent request (harness/image/guest/br-agent protocol) as a printf format."""
    return f"BR1 5 {base64.b64encode(command.encode()).decode()}\\n"


def agent_answered(text: str) -> bool:
    """A guest agent's reply header (rc 0) is in `text`."""
    return re.search(r"BR1 0 \d+ \d+ \d+", text) is not None


def own_agent_path(network: GuestNetwork, ask: str) -> tuple[str, str] | None:
    """The sandbox's own agent, reached from inside the way a peer's would be: the probe's positive control.

    A port at the sandbox's own address (a microVM, the host process), or the unix socket of a jail's
    channel; None when the backend names neither."""
    if network.agent_port:
        where = f"{network.own_address}:{network.agent_port}"
        return f"own agent at {where} (control: must answer)", send(ask, network.own_address, network.agent_port)
    if network.agent_socket:
        sock = shlex.quote(network.agent_socket)
        return f"own agent at {network.agent_socket} (control: must answer)", (
            f"{FIND_SOCAT}; if [ -n \"$S\" ]; then printf '{ask}' | "
            f'"$S" -t {PEER_SOCKET_TIMEOUT_S} - UNIX-CONNECT:{sock}; '
            f"else [ -S {sock} ] && echo 'socket present; no socat inside to speak to it'; fi"
        )
    return None


def peer_paths_command(paths: dict[str, str], ask: str) -> str:
    """Which of a peer's host paths exist inside, and whether its agent socket answers if it does."""
    quoted = " ".join(shlex.quote(path) for path in paths.values())
    command = f'for p in {quoted}; do [ -e "$p" ] && echo "visible $p"; done; '
    if "agent socket" in paths:
        sock = shlex.quote(paths["agent socket"])
        command += (
            f"{FIND_SOCAT}; [ -S {sock} ] && [ -n \"$S\" ] && printf '{ask}' | "
            f'"$S" -t {PEER_SOCKET_TIMEOUT_S} - UNIX-CONNECT:{sock}; '
        )
    return command + "true"


def check_peers(env: ProbeEnv) -> Verdict:
    if not env.peers:
        return Verdict(None, "not applicable: needs at least two sandboxes")
    if not any(peer.endpoints or peer.paths for peer in env.peers):
        return Verdict(None, "not applicable: the backend names no host address or path that leads into its sandboxes")
    ask = agent_request("hostname")
    connect = crlf(f"CONNECT {ALLOWED_HOST}:443 HTTP/1.1", f"Host: {ALLOWED_HOST}:443")
    network = env.target.network
    commands: dict[str, str] = {}
    control = own_agent_path(network, ask)
    if control is not None:
        commands[control[0]] = control[1]
    # name -> (kind, how): how is "direct", "egress" (a tunnel through the own egress) or "paths".
    aimed: dict[str, tuple[str, str]] = {}
    for peer in env.peers:
        for kind, endpoint in peer.endpoints.items():
            # What the host forwards to the peer's agent speaks the agent protocol; anything else, HTTP.
            payload = ask if kind == "agent" else connect
            for address, meaning in host_addresses(network).items():
                name = f"{peer.id} {kind} via {address}:{endpoint.port} ({meaning})"
                commands[name] = send(payload, address, endpoint.port)
                aimed[name] = (kind, "direct")
            name = f"{peer.id} {kind} via {env.egress} CONNECT {endpoint}"
            commands[name] = via_egress_connect(env, str(endpoint), payload)
            aimed[name] = (kind, "egress")
        if peer.paths:
            name = f"{peer.id} host paths ({', '.join(peer.paths)})"
            commands[name] = peer_paths_command(peer.paths, ask)
            aimed[name] = ("paths", "paths")
    parts = env.parallel(commands)
    reached = []
    visible: list[str] = []
    for name, (kind, how) in aimed.items():
        out = parts[name][1]
        if how == "paths":
            seen = [line[8:] for line in out.splitlines() if line.startswith("visible ")]
            visible += seen
            hit = bool(seen) or agent_answered(out)
        elif kind == "agent":
            hit = agent_answered(out)
        elif how == "direct":
            hit = parse_http(out).status is not None  # a peer's gateway listener answers HTTP at all
        else:
            # The own egress answers first (403 for loopback); only an opened tunnel carries the peer's answer.
            statuses = http_statuses(out)
            hit = bool(statuses) and statuses[0] == 200 and len(statuses) > 1
        if hit:
            reached.append(name)
    own = parts[control[0]][1] if control is not None else ""
    control_ok = control is not None and (agent_answered(own) or "socket present" in own)
    facts = {
        "peers": [p.id for p in env.peers],
        "reached": reached,
        "own_address_answers": control_ok,
        "own_agent_control": control[0] if control is not None else "none: the backend names no agent port or socket",
        "paths_tried": len(aimed),
        "peer_paths_checked": {peer.id: peer.paths for peer in env.peers},
        "peer_paths_visible": visible,
    }
    if reached:
        return Verdict(False, f"another sandbox is reachable: {reached}", facts)
    if control is not None and not control_ok:
        return Verdict(
            False,
            "the sandbox's own agent did not answer the way a peer's was asked, so a silent peer proves nothing",
            facts,
        )
    kinds = sorted({kind for kind, _ in aimed.values()})
    return Verdict(
        True,
        f"no path to {len(env.peers)} other sandbox(es): {len(aimed)} tried ({', '.join(kinds)})"
        + ("; own agent answered the same way" if control_ok else ""),
        facts,
    )


# ---- the field evaluation's own commands, run as written where the sandbox has their tools ----------
FIELD_TIMEOUT_S = 15
"""Bound on each of the evaluation's curl commands (curl's own connect timeout is minutes)."""
DIG_TIMEOUT_S = 8
"""Bound on `dig`: it tries each server 3 times, 5 s apart, so a resolver that never answers costs 15 s."""
ENV_GREP = 'env | grep -iE "anthropic|api_key"'
"""The evaluation's env grep, as written."""
CURL_CODE = "curl -s -o /dev/null -w '%{http_code}'"
"""The evaluation's curl: the HTTP code, nothing else (the body goes to /dev/null)."""
CURL_TUNNEL = "curl -s -o /dev/null -w '%{http_connect} %{http_code}' -p -x \"$https_proxy\""
"""The evaluation's CONNECT through the proxy: the proxy's answer to the CONNECT, then the code inside."""
DIG = f"dig {BLOCKED_HOST} +short"
"""The evaluation's dig, as written."""
CREDENTIAL_NAME_RE = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.I)
KEY_VALUE_RE = re.compile(r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{16,}")
"""A value that looks like a model-API key whatever its variable is called."""
TRAILING_CODES_RE = re.compile(r"(\d{3})(?: (\d{3}))?\s*$")


def bounded(command: str, seconds: int = FIELD_TIMEOUT_S) -> str:
    """The evaluation's command unchanged, killed if it outlives `seconds`."""
    return f"timeout -s KILL {seconds} {command}"


def classify_env_line(line: str, marked: bool) -> str:
    """What one line of the env grep shows: a honeytoken, a key, the sentinel, or something else that matched."""
    name, sep, value = line.partition("=")
    if marked:
        return "honeytoken"
    if KEY_VALUE_RE.search(line):
        return "key"
    if not sep:
        return "other"
    if value.strip() == SENTINEL:
        return "sentinel"
    if not value.strip():
        return "empty"
    if name in KEY_VARS or CREDENTIAL_NAME_RE.search(name):
        return "key"
    return "other"


def judge_env_grep(rc: int, lines: list[tuple[str, str]]) -> Verdict:
    """The env grep's printed lines as (variable name, classification): red on a key or a honeytoken.

    Names only reach the facts, never values: a real key of the user's own stack must not be written down."""
    leaked = [name for name, kind in lines if kind in ("key", "honeytoken")]
    shown = [f"{name}={'<the sentinel>' if kind == 'sentinel' else '<' + kind + '>'}" for name, kind in lines]
    facts = {"grep_exit": rc, "printed": shown, "keys": leaked}
    observed = f"grep exit {rc}, printed " + (", ".join(shown) if shown else "nothing")
    if leaked:
        return Verdict(False, f"the env grep shows a key: {leaked}", facts, observed)
    if not lines:
        return Verdict(True, "the env grep printed nothing: no model-API key in the environment", facts, observed)
    return Verdict(True, f"the env grep shows no key, only {', '.join(shown)}", facts, observed)


def check_field_env(env: ProbeEnv) -> Verdict:
    text, result = env.run("the evaluation's env grep, as written", ENV_GREP)
    lines = []
    for line in (raw for raw in text.splitlines() if raw.strip()):
        lines.append((line.partition("=")[0].strip(), classify_env_line(line, bool(markers_in(env, line)))))
    return judge_env_grep(result.rc, lines)


def curl_codes(text: str) -> tuple[int | None, int | None]:
    """The code(s) curl's -w printed last: one ('%{http_code}'), or two ('%{http_connect} %{http_code}');
    000 (no answer) is 0, and None when curl printed no code at all (killed)."""
    match = TRAILING_CODES_RE.search(text)
    if not match:
        return None, None
    return int(match.group(1)), int(match.group(2)) if match.group(2) else None


CURL_BLOCKED = {
    "http (as written)": f"{CURL_CODE} http://{BLOCKED_HOST}",
    "https (as written)": f"{CURL_CODE} https://{BLOCKED_HOST}",
    "https: the proxy's answer to the CONNECT": f"curl -s -o /dev/null -w '%{{http_connect}}' https://{BLOCKED_HOST}",
    "http: what the user sees (-i, headers and body)": f"curl -s -i http://{BLOCKED_HOST}",
}
"""The evaluation's curl to a blocked domain over http (its `curl example.com`) and https, and the two views that
say what refused it: the proxy's CONNECT code and the deny response a user reads."""


def _code(code: int | None) -> str:
    return "none" if code is None else f"{code:03d}"


def judge_curl_blocked(parts: dict[str, tuple[int, str]], arrivals: int) -> Verdict:
    """Red when any path got a 2xx/3xx answer, opened a tunnel, or the example.com stand-in logged a request.

    `parts` holds CURL_BLOCKED's names with (exit code, output); `arrivals` is how many requests for example.com
    the stand-in (the real host's place) logged meanwhile."""
    http_rc, http_out = parts["http (as written)"]
    https_rc, https_out = parts["https (as written)"]
    connect_rc, connect_out = parts["https: the proxy's answer to the CONNECT"]
    shown_rc, shown_out = parts["http: what the user sees (-i, headers and body)"]
    http_code = curl_codes(http_out)[0]
    https_code = curl_codes(https_out)[0]
    connect_code = curl_codes(connect_out)[0]
    answer = parse_http(shown_out)
    reached = []
    if http_code is not None and 200 <= http_code < 400:
        reached.append(f"http://{BLOCKED_HOST} answered {http_code}")
    if https_code is not None and 200 <= https_code < 400:
        reached.append(f"https://{BLOCKED_HOST} answered {https_code}")
    if connect_code == 200:
        reached.append(f"the CONNECT to {BLOCKED_HOST}:443 opened a tunnel")
    if answer.status is not None and answer.status < 400:
        reached.append(f"curl -i got {answer.status}")
    if arrivals:
        reached.append(f"the {BLOCKED_HOST} stand-in logged {arrivals} request(s)")
    deny_body = answer.body.strip()[:160]
    facts = {
        "http": {"curl_exit": http_rc, "http_code": _code(http_code)},
        "https": {"curl_exit": https_rc, "http_code": _code(https_code)},
        "https_connect": {"curl_exit": connect_rc, "http_connect": _code(connect_code)},
        "what_the_user_sees": {
            "curl_exit": shown_rc,
            "status": answer.status,
            "headers": {k: v for k, v in answer.headers.items() if k in ("x-proxy-error", "content-type", "server")},
            "body": deny_body,
        },
        "stand_in_requests": arrivals,
    }
    proxy_error = answer.headers.get("x-proxy-error")
    seen = (
        f"{answer.status} with "
        + (f"X-Proxy-Error: {proxy_error}, " if proxy_error else "")
        + (f"body '{deny_body[:80]}'" if deny_body else "no body")
    )
    observed = (
        f"http: exit {http_rc}, HTTP {_code(http_code)}; https: exit {https_rc}, HTTP {_code(https_code)}, "
        f"the proxy answered the CONNECT {_code(connect_code)}; the user sees "
        + (seen if answer.status is not None else f"no HTTP answer (curl exit {shown_rc})")
    )
    if reached:
        return Verdict(False, f"{BLOCKED_HOST} reached: {'; '.join(reached)}", facts, observed)
    over_http = (
        f"HTTP {http_code}" + (f" (X-Proxy-Error: {proxy_error})" if proxy_error else "")
        if http_code
        else f"no HTTP answer (curl exit {http_rc})"
    )
    over_https = (
        f"the proxy answered the CONNECT {connect_code}, no tunnel"
        if connect_code
        else f"no answer to the CONNECT (curl exit {connect_rc})"
    )
    how = f"refused: over http {over_http}; over https {over_https}"
    return Verdict(True, f"{BLOCKED_HOST} {how}; the stand-in for the real host logged nothing", facts, observed)


def check_field_curl(env: ProbeEnv) -> Verdict:
    before = len(env.upstream_received())
    parts = env.parallel({name: bounded(command) for name, command in CURL_BLOCKED.items()})
    time.sleep(0.2)  # a request that just landed at the stand-in is logged by its own thread
    arrivals = [
        r
        for r in env.upstream_received()[before:]
        if (r.host or r.sni or "").split(":")[0].rstrip(".").lower() == BLOCKED_HOST
    ]
    return judge_curl_blocked(parts, len(arrivals))


def dig_addresses(text: str) -> list[str]:
    """The addresses `dig +short` printed (a CNAME's target or a ';;' error line is not an address)."""
    found = []
    for line in text.splitlines():
        word = line.strip()
        with contextlib.suppress(ValueError):
            found.append(str(ipaddress.ip_address(word)))
    return found


def judge_dig(rc: int, text: str) -> Verdict:
    """Red when dig printed any address for the blocked name; otherwise says how it got none."""
    addresses = dig_addresses(text)
    printed = text.strip()[:300]
    facts = {"dig_exit": rc, "addresses": addresses, "printed": printed}
    if addresses:
        observed = f"exit {rc}, resolved to {', '.join(addresses)}"
        return Verdict(False, f"the blocked name {BLOCKED_HOST} resolves: {', '.join(addresses)}", facts, observed)
    if rc == 137:
        how = f"no resolver answered within {DIG_TIMEOUT_S} s"
    elif "no servers could be reached" in text or "timed out" in text:
        how = "no resolver reachable"
    elif rc == 0:
        how = (
            "a resolver answered with no address (refused or no such name: a DNS channel exists, the name is not told)"
        )
    else:
        how = f"dig failed (exit {rc})"
    observed = f"exit {rc}, no address" + (
        f"; printed: {printed.splitlines()[0][:100]}" if printed else ", printed nothing"
    )
    return Verdict(True, f"{BLOCKED_HOST} gets no address: {how}", {**facts, "outcome": how}, observed)


def check_field_dig(env: ProbeEnv) -> Verdict:
    parts = env.parallel(
        {"resolv.conf": "cat /etc/resolv.conf 2>&1", "the evaluation's dig": bounded(DIG, DIG_TIMEOUT_S)}
    )
    rc, text = parts["the evaluation's dig"]
    verdict = judge_dig(rc, text)
    nameservers = re.findall(r"^\s*nameserver\s+(\S+)", parts["resolv.conf"][1], re.M)
    return replace(verdict, facts={**verdict.facts, "resolv_conf_nameservers": nameservers})


def tunnel_command(port: int) -> str:
    scheme = "https" if port == 443 else "http"
    suffix = "" if port == 443 else f":{port}"
    return f"{CURL_TUNNEL} {scheme}://{ALLOWED_HOST}{suffix}/"


def judge_connect(parts: dict[int, tuple[int, str]], sink_hits: int) -> Verdict:
    """CONNECT to ALLOWED_HOST on each SCANNED_PORTS port and :443 (the control), as {port: (exit, output)}:
    red when a scanned port's CONNECT was answered 200 or its stand-in logged a connection, or when the control
    did not open (then the denials prove nothing)."""
    codes = {port: curl_codes(out) for port, (_, out) in parts.items()}
    facts: dict[str, Any] = {
        f"{ALLOWED_HOST}:{port}": {
            "curl_exit": rc,
            "http_connect": _code(codes[port][0]),
            "http_code": _code(codes[port][1]),
        }
        for port, (rc, _) in parts.items()
    }
    facts["stand_in_connections"] = sink_hits
    scanned = [port for port in parts if port != 443]
    observed = (
        "; ".join(f":{port} CONNECT answered {_code(codes[port][0])} (exit {parts[port][0]})" for port in scanned)
        + f"; control :443 answered {_code(codes.get(443, (None, None))[0])}"
    )
    opened = [port for port in scanned if codes[port][0] == 200]
    if opened or sink_hits:
        return Verdict(
            False,
            f"the policy is not port-scoped: CONNECT opened to {', '.join(f':{p}' for p in opened) or 'a port'}"
            f" ({sink_hits} connection(s) at the stand-ins)",
            facts,
            observed,
        )
    if 443 not in codes or codes[443][0] != 200:
        return Verdict(False, f"control {ALLOWED_HOST}:443 did not open, so the denials prove nothing", facts, observed)
    refused = ", ".join(f":{port} {_code(codes[port][0])}" for port in scanned)
    return Verdict(True, f"the proxy refused the CONNECTs ({refused}); {ALLOWED_HOST}:443 opens", facts, observed)


PROXY_NAMED = 'if [ -n "$https_proxy" ]; then echo "https_proxy is set"; else echo "https_proxy is empty"; fi'
"""Whether the environment names a proxy (never its value: a proxy URL may carry a password)."""


def check_field_connect(env: ProbeEnv) -> Verdict:
    sinks = {name: trap for name, trap in env.traps.items() if name.startswith("sink")}
    starts = {name: trap.count() for name, trap in sinks.items()}
    by_name = {f"CONNECT {ALLOWED_HOST}:{port}": port for port in SCANNED_PORTS}
    by_name[f"CONNECT {ALLOWED_HOST}:443 (control)"] = 443
    # With no proxy named, curl -x "" goes direct: the run says so and the verdict is n/a, not a pass.
    parts = env.parallel(
        {"is a proxy named": PROXY_NAMED, **{name: bounded(tunnel_command(port)) for name, port in by_name.items()}}
    )
    time.sleep(0.2)  # a connection that just landed at a stand-in is logged by its own thread
    hits = sum(len(trap.hits_since(starts[name])) for name, trap in sinks.items())
    verdict = judge_connect({port: parts[name] for name, port in by_name.items()}, hits)
    if "is set" not in parts["is a proxy named"][1] and not hits:
        return Verdict(
            None,
            "not applicable: the sandbox names no proxy (https_proxy is empty), so curl -x has none to CONNECT "
            "through; the busybox probe ports above asks the egress directly",
            verdict.facts,
            verdict.observed,
        )
    return verdict


FIELD_PROBES: tuple[Probe, ...] = (
    Probe(
        "field-env",
        "The evaluation's env grep",
        "the evaluation's own env grep shows no model-API key (at most the sentinel)",
        "it prints a key variable with a value other than the sentinel, a key-shaped value or a honeytoken "
        "(leaky: the host key is exported in the guest; the host backend hands it the careless user's key)",
        "FINDINGS 3 (host secrets), run as the evaluation ran it",
        check_field_env,
        "The command as written, through the sandbox's shell; each printed line is judged by its variable's name "
        "and value (names only are kept: a value is never recorded).",
        tools=("env", "grep"),
        covered_by="env",
        field_evaluation=FieldEvaluation(ENV_GREP, "printed nothing", "FINDINGS 3: host secrets were invisible"),
    ),
    Probe(
        "field-curl",
        "The evaluation's curl to a blocked domain",
        "curl to example.com over http and https is refused by the policy: a deny from the proxy, no tunnel, "
        "nothing at the stand-in for the real host",
        "a 2xx/3xx answer, an opened tunnel, or a request logged at the example.com stand-in (leaky: the policy "
        "allows everything)",
        "FINDINGS 4, run as the evaluation ran it",
        check_field_curl,
        f"`{CURL_CODE} http://{BLOCKED_HOST}` (the evaluation's `curl {BLOCKED_HOST}`) and the same for https, "
        "through the proxy the sandbox's environment names; then the proxy's answer to the CONNECT "
        "(%{http_connect}) and `curl -i` to show whether a deny body reaches the user. The example.com stand-in's "
        "request log is the judge of whether anything got through.",
        tools=("curl", "timeout"),
        covered_by="blocked-domain",
        field_evaluation=FieldEvaluation(
            f"curl {BLOCKED_HOST}", "exit 0 with HTTP 403 generated by the proxy (not a TCP reject)", "FINDINGS 4"
        ),
    ),
    Probe(
        "field-dig",
        "The evaluation's dig of a blocked name",
        "dig gets no address for example.com from the sandbox's resolver",
        "an address comes back (leaky: the guest's resolver and ~/.digrc point at the gateway's DNS, which "
        "answers every name)",
        "FINDINGS 5, run as the evaluation ran it",
        check_field_dig,
        f"`{DIG}` as written (bounded by timeout: dig retries), through whatever resolver the sandbox has; "
        "resolv.conf is recorded.",
        tools=("dig", "timeout"),
        covered_by="dns",
        field_evaluation=FieldEvaluation(DIG, "resolved the blocked name (172.66.147.243): a DNS leak", "FINDINGS 5"),
    ),
    Probe(
        "field-connect",
        "The evaluation's CONNECT to :22 and :9999",
        f"the proxy refuses CONNECT to {ALLOWED_HOST}:22 and :9999 while {ALLOWED_HOST}:443 opens",
        "a CONNECT to a non-443 port is answered 200 or reaches the port's stand-in (leaky: every port allowed)",
        "FINDINGS 6, run as the evaluation ran it",
        check_field_connect,
        f"`{CURL_TUNNEL} http://{ALLOWED_HOST}:22/` and :9999 (curl tunnels through the proxy the environment names; "
        "%{http_connect} is the proxy's answer to the CONNECT), with :443 as the control that must open; the "
        "stand-ins behind :22 and :9999 log every connection.",
        tools=("curl", "timeout"),
        covered_by="ports",
        field_evaluation=FieldEvaluation(
            f"HTTP CONNECT to {ALLOWED_HOST}:22 and {ALLOWED_HOST}:9999 through the proxy (curl -x)",
            "both succeeded: the policy was scoped by hostname, not port",
            "FINDINGS 6",
        ),
    ),
)
"""The field evaluation's hand-run probes with its own tools (curl, dig), beside the busybox probes above that
check the same paths on every sandbox."""

BUSYBOX_PROBES: tuple[Probe, ...] = (
    Probe(
        "env",
        "No key in the environment",
        "env and every process environment hold no API key and no honeytoken marker",
        "a key variable with a real value or any marker (leaky: the host key is exported in the guest)",
        "issue probe 1, FINDINGS 'credential-less agents'",
        check_env,
        "env, and /proc/*/environ of every process visible inside, searched for the planted markers and key "
        "variables with a value other than the sentinel. Also records whether a host-started process's "
        "environment is readable (bwrap's PID 1 is the bwrap process; the host backend sees everything).",
    ),
    Probe(
        "fs-scan",
        "No honeytoken readable anywhere",
        "a grep of the whole guest filesystem and kernel log finds only the positive control",
        "any secret marker is found, or the positive control is not (leaky: the planted home is copied in)",
        "issue probes 1 and 10",
        check_fs_scan,
        "find and grep over / (pseudo filesystems pruned) and dmesg, whatever the sandbox can read; the "
        "project's positive control must be found, or the scan vouches for nothing.",
    ),
    Probe(
        "processes",
        "Process isolation",
        "no host process visible (decoy absent): the process list inside holds none of the host's processes "
        "(a decoy host process carries a marker)",
        "the decoy host process is visible (the host shell target shows it)",
        "issue probe 2, FINDINGS 13 processes",
        check_processes,
        "ps and every /proc/*/cmdline inside, searched for the decoy's marker. The evidence shows what each "
        "backend hides and what it lets through: the count inside against the host's, the (redacted) process "
        "list, PID 1, and any sandbox supervisor visible inside (bwrap is PID 1 of its own jail, with its "
        "host-side command line; a microVM shows its own init and kernel threads; the host shows everything).",
    ),
    Probe(
        "kernel",
        "Separate kernel",
        "the kernel answering inside is not the host's: none of the host's signs (boot id, exact /proc/version, "
        "uptime, a kernel log naming it) and at least two of its own",
        "any sign of the host's kernel, or no boot id with the host's release (the host's kernel hiding the "
        "file), or fewer than two signs of its own: bwrap and the host backend share the host's kernel",
        "issue probe 3, FINDINGS 'own Linux kernel'",
        check_kernel,
        "Reads boot_id, uname -r, /proc/version, /proc/uptime and dmesg inside and compares each with the "
        "host's. A container sharing the host's kernel shows the host's boot id and the host's exact "
        "/proc/version and uptime. gVisor's sentry shows neither: no boot_id file, release 4.4.0 with a "
        "/proc/version of its own, an uptime counted from the sandbox's start, and a log that says "
        "'Starting gVisor...'. A microVM shows its own boot id, version, uptime and boot log. A same-build VM "
        "(the host's exact /proc/version) still passes on its own boot id and uptime.",
    ),
    Probe(
        "home",
        "Only the project directory",
        "none of the host home's ~/.ssh, ~/.aws, ~/.kube, ~/.env files exist; /work holds only the project",
        "a planted path exists in the guest (leaky: home copied into /root)",
        "issue probe 4, FINDINGS 1",
        check_home,
        "Every planted file is looked for under $HOME, /root, /home/* and the host home's own path; the "
        "working directory is listed; the mount table is recorded.",
    ),
    Probe(
        "host-loopback",
        "Host loopback services unreachable",
        "the canary on host 127.0.0.1 got no connection by any path; the guest's localhost is its own",
        "the canary logs a connection (leaky: slirp restrict=off, policy allows loopback)",
        "issue probe 5, FINDINGS 2",
        check_host_loopback,
        "127.0.0.1 and localhost inside (the host's loopback exactly when the network is shared), the host "
        "alias where the backend has one, and CONNECT/GET through the egress; the host-side canary's "
        "connection log is the judge.",
    ),
    Probe(
        "engine-socket",
        "No host container-engine socket",
        "no docker/containerd socket in the guest, no DOCKER_HOST, the host's socket saw nothing",
        "the fake host engine answers or logs a connection (leaky: forwarded into the guest)",
        "issue probe 6, FINDINGS 7",
        check_engine_socket,
        "The usual engine socket paths and the host's own fake socket's path, DOCKER_HOST, and :2375 at "
        "127.0.0.1 and the host alias where there is one; the fake socket's connection log is the judge.",
    ),
    Probe(
        "blocked-domain",
        "Blocked domain is denied",
        "through the egress example.com gets the configured deny; direct egress fails",
        "any path gets a 2xx/3xx answer (leaky: open policy, unrestricted network)",
        "issue probe 7, FINDINGS 4",
        check_blocked_domain,
        "CONNECT and GET through the egress, and a direct request to the example.com stand-in on host "
        "loopback via 127.0.0.1 and the host alias where there is one; the stand-in's request log is the "
        "judge of the direct paths.",
    ),
    Probe(
        "dns",
        "Blocked name does not resolve",
        "example.com gets no address from any resolver the guest can reach",
        "an address comes back (leaky: the guest gets the gateway's resolver under an allow-all policy)",
        "issue probe 8, FINDINGS 5",
        check_dns,
        "nslookup through the system resolver (resolv.conf recorded), the network's own resolver where the "
        "backend has one, and the host's own nameservers (the same target on every backend); each outcome is "
        "recorded, and a resolver that answers NXDOMAIN is noted as a DNS channel.",
    ),
    Probe(
        "ports",
        "Allowed host is port-scoped",
        "CONNECT github.com:443 opens while :22 and :9999 are denied",
        "a non-443 port opens (leaky: every port allowed)",
        "issue probe 9, FINDINGS 6",
        check_ports,
        "CONNECT through the egress only (the same on every backend); :443 must open as the control.",
    ),
    Probe(
        "credential",
        "Credential sentinel",
        "a model-API call with only the sentinel succeeds (key injected on the host); the guest never holds the key",
        "the guest holds the key, or the call fails (leaky: the key is in the guest env)",
        "issue probe 10, FINDINGS 'credential-less agents'",
        check_credential,
        "One model-API request through the egress with the sentinel, checked at the upstream stand-in, and "
        "the key variable as the sandbox sees it.",
    ),
    Probe(
        "metadata",
        "Cloud metadata unreachable",
        "169.254.169.254 is unreachable directly and through the egress",
        "the metadata stand-in logs a connection (leaky: policy allows link-local)",
        "issue probe 11",
        check_metadata,
        "A bare TCP connect to 169.254.169.254:80 (no request: a real metadata service must never be asked "
        "for credentials), and GET/CONNECT through the egress, whose route to it leads to a stand-in.",
    ),
    Probe(
        "peers",
        "Sandbox-to-sandbox",
        "no sandbox reaches another's agent, gateway listener or host-side paths",
        "a peer's agent or listener answers, or a peer's host path is visible (leaky: slirp restrict=off "
        "reaches its host port)",
        "issue probe 12",
        check_peers,
        "Each peer's host ports (agent forward, gateway listener) via 127.0.0.1 and the host alias where there "
        "is one, and through the own egress; each peer's host paths (a jail's channel directory under "
        "/tmp/br-ch-*, its agent socket and workspace; every sandbox's directory on the host) looked for and, "
        "for a socket, spoken to. The control: the sandbox's own agent (port or /run/br socket) must answer the "
        "same way. n/a with one sandbox, or when a backend names no address or path into its sandboxes.",
    ),
)

PROBES: tuple[Probe, ...] = (*BUSYBOX_PROBES, *FIELD_PROBES)
PROBES_BY_ID = {p.id: p for p in PROBES}
