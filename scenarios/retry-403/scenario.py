"""retry-403: how long do agents keep hammering a blocked domain, and which gateway answer ends it?

FINDINGS probe 4: a proxy that answers a blocked domain with HTTP 403 (not a TCP reject) can keep
an agent that retries on 403 looping for ever, burning time and model tokens. This scenario runs
four reference clients against a host the policy denies, under every deny mode (403,
403-explained, reset) with the loop breaker off, on answering 429 (HTTP-correct) and on answering
200-terminal (200 + the same permanent-block explanation, the only answer that ends a loop which
stops on nothing but a 2xx), and counts -- from the gateway's audit log, never from the client's
word -- the requests sent to the blocked host, the model calls wasted, and how each client ended:

    naive       retries every non-2xx (and every reset) at once, up to a cap
    backoff     the same with exponential backoff and jitter
    reads-body  stops when the answer says it is a policy decision (header or body text)
    llm-loop    asks the stand-in model once per failure (a counted model call), and stops only
                on a machine-readable signal (X-Proxy-Error, "retryable": false)

The clients run inside each sandbox (busybox sh + nc + awk, agent.sh) and, at scale, as plain
Python clients on the host, each behind its own gateway listener (one "sandbox" per client).
`--agent CMD` adds a user's own agent, run inside each sandbox with the gateway as its only way
out (env: BLOCKED_URL, MODEL_URL, HTTP_PROXY).
"""

from __future__ import annotations

import random
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.fleet import Fleet
from harness.gateway.audit import AuditTail, answer_counts
from harness.gateway.process import CredentialSpec, GatewayConfig, GatewayProcess
from harness.sandbox import Sandbox
from harness.scenario.base import ScenarioContext
from harness.standins.upstream import UpstreamServer

NAME = "retry-403"
HERE = Path(__file__).resolve().parent
AGENT_SCRIPT = HERE / "agent.sh"
GUEST_SCRIPT = "/tmp/br-retry-agent.sh"

CLIENTS = ("naive", "backoff", "reads-body", "llm-loop")
DENY_MODES = ("403", "403-explained", "reset")
# Loop breaker settings: off, or on with its answer once tripped (harness/gateway/loopbreaker.py).
BREAKER_OFF = "off"
BREAKER_429 = "429"
BREAKER_TERMINAL = "200-terminal"
BREAKER = (BREAKER_OFF, BREAKER_429, BREAKER_TERMINAL)
BLOCKED_HOST = "example.com"
MODEL_HOST = "api.anthropic.com"
MODEL_KEY_ENV = "BR_RETRY403_MODEL_KEY"
MODEL_KEY = "sk-ant-retry403-standin-0123456789abcdef"  # a stand-in's key: the upstream checks it arrived


@dataclass(frozen=True)
class Options:
    """`invoke scenario retry-403 --set key=value`."""

    sandboxes: int = 1
    """Guests running the in-guest clients (0: host clients only)."""
    scale: int = 16
    """Host-side clients per cell, each behind its own gateway listener."""
    threshold: int = 5
    """Loop breaker: identical denied requests before it answers 429 / 200-terminal."""
    agent: str | None = None
    """Your own agent command, run in each sandbox per deny mode and breaker setting."""

    def validate(self) -> None:
        if self.sandboxes < 0 or self.scale < 1 or self.threshold < 1:
            raise ConfigError("retry-403 needs sandboxes >= 0, scale >= 1 and threshold >= 1")
        if self.agent and not self.sandboxes:
            raise ConfigError("retry-403: --agent runs inside the sandboxes; give --sandboxes 1 or more")


LOOP_WINDOW_S = 60.0
# Attempt caps. The guest is a TCG VM where each nc round trip costs tens of ms: keep its loops short.
GUEST_CAP = 20
HOST_CAP = 50
BACKOFF_CAP = 8  # with 20 ms base doubling to 500 ms, 8 attempts wait about 2.5 s in all
BACKOFF_BASE_MS = 20
BACKOFF_MAX_MS = 500
CLIENT_SOCKET_TIMEOUT_S = 10.0
GUEST_SLACK_S = 60.0
GUEST_ITERATION_BUDGET_S = 2.0  # generous per-attempt budget for the exec timeout
AGENT_TIMEOUT_S = 120.0
POLICY = """\
name: retry-403
deny_mode: 403
loop_breaker: {threshold: 5, window_s: 60}
rules:
  - allow: api.anthropic.com   # the stand-in model API, plain http on :80 so busybox can speak it
    ports: [80, 443]
"""
RESULT_LINE = re.compile(r"attempts=(\d+) reason=(\w+)")
PERMANENT_ANY = re.compile(
    rb"(?im)^x-proxy-error:|^x-blastradius-decision:|blocked by network policy|retry_loop_detected"
)
PERMANENT_MACHINE = re.compile(rb'(?im)^x-proxy-error:|"retryable": *false')


def create(options: Options) -> RetryScenario:
    return RetryScenario(options)


# ---- host-side reference clients (the same logic as agent.sh, over raw sockets) -----------------
def http_exchange(port: int, raw: bytes) -> bytes:
    """One request on a fresh connection to the gateway; b"" when it was reset or closed silently."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_SOCKET_TIMEOUT_S) as sock:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)
    except OSError:
        return b""


def status_of(answer: bytes) -> int:
    parts = answer.split(b"\r\n", 1)[0].split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def blocked_request(cell: str, client: str) -> bytes:
    return (
        f"GET http://{BLOCKED_HOST}/retry403/{cell} HTTP/1.1\r\nHost: {BLOCKED_HOST}\r\n"
        f"User-Agent: br-{client}\r\nConnection: close\r\n\r\n"
    ).encode()


def model_request(cell: str) -> bytes:
    body = b'{"model":"stand-in","max_tokens":64,"messages":[{"role":"user","content":"the request failed, retry?"}]}'
    head = (
        f"POST http://{MODEL_HOST}/v1/messages/{cell} HTTP/1.1\r\nHost: {MODEL_HOST}\r\n"
        f"x-api-key: proxy-managed\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def run_host_client(client: str, port: int, cell: str, cap: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    started = time.monotonic()
    attempts, reason, delay = 0, "cap", BACKOFF_BASE_MS
    while attempts < cap:
        attempts += 1
        answer = http_exchange(port, blocked_request(cell, client))
        if 200 <= status_of(answer) < 300:
            reason = "ok"
            break
        if client == "reads-body" and PERMANENT_ANY.search(answer):
            reason = "policy"
            break
        if client == "llm-loop":
            http_exchange(port, model_request(cell))
            if PERMANENT_MACHINE.search(answer):
                reason = "policy"
                break
        if client == "backoff":
            time.sleep(delay * (0.5 + rng.random() / 2) / 1000)
            delay = min(delay * 2, BACKOFF_MAX_MS)
    return {"attempts": attempts, "reason": reason, "wall_s": round(time.monotonic() - started, 3)}


def cap_for(client: str, where: str) -> int:
    if client == "backoff":
        return BACKOFF_CAP
    return GUEST_CAP if where == "guest" else HOST_CAP


# ---- counting from the audit log ---------------------------------------------------------------
def count_cell(records: list[dict[str, Any]], cell: str | None, sandboxes: set[str]) -> dict[str, Any]:
    """Blocked-host requests, the answers they got, model calls and loop trips, per the gateway."""
    blocked = [
        r
        for r in records
        if r.get("sandbox") in sandboxes
        and r.get("host") == BLOCKED_HOST
        and (cell is None or r.get("path") == f"/retry403/{cell}")
    ]
    model = [
        r
        for r in records
        if r.get("sandbox") in sandboxes
        and r.get("host") == MODEL_HOST
        and (cell is None or r.get("path") == f"/v1/messages/{cell}")
    ]
    decisions = [r for r in blocked if r.get("event") != "retry_loop_detected"]
    answers = answer_counts(decisions)
    stamps = [float(r["ts"]) for r in decisions]
    return {
        "blocked_requests": len(decisions),
        "answers": answers,
        "loop_trips": sum(1 for r in blocked if r.get("event") == "retry_loop_detected"),
        "model_calls": len(model),
        "model_ok": sum(1 for r in model if r.get("decision") == "allow" and 200 <= int(r.get("status") or 0) < 300),
        "audit_span_s": round(max(stamps) - min(stamps), 3) if stamps else 0.0,
    }


# ---- the scenario ------------------------------------------------------------------------------
class RetryScenario:
    name = NAME

    def __init__(self, options: Options) -> None:
        self.options = options
        self.upstream: UpstreamServer | None = None
        self.fleet: Fleet | None = None
        self.guests: list[Sandbox] = []
        self.host_ports: dict[str, int] = {}
        self.cells: list[dict[str, Any]] = []
        self.checks: list[str] = []

    @property
    def gateway(self) -> GatewayProcess:
        assert self.fleet is not None and self.fleet.gateway is not None
        return self.fleet.gateway

    def setup(self, ctx: ScenarioContext) -> None:
        with ctx.journal.activity("start-model-api-stand-in") as act:
            self.upstream = ctx.keep(UpstreamServer(expected={MODEL_HOST: ("x-api-key", MODEL_KEY)}))
            act.output = {"http_port": self.upstream.http_port}
        policy = ctx.run_dir / "retry-403-policy.yaml"
        policy.write_text(POLICY)
        config = GatewayConfig(
            policy=policy,
            deny_mode="403",
            loop_threshold=self.options.threshold,
            loop_window_s=LOOP_WINDOW_S,
            audit_path=ctx.run_dir / "gateway-audit.jsonl",
            state_dir=ctx.run_dir / "gateway",
            credentials=[
                CredentialSpec("anthropic", MODEL_HOST, "x-api-key", port=80, env=MODEL_KEY_ENV),
                CredentialSpec("anthropic-tls", MODEL_HOST, "x-api-key", port=443, env=MODEL_KEY_ENV),
            ],
            upstream_overrides=self.upstream.overrides((MODEL_HOST, BLOCKED_HOST)),
            upstream_ca_file=self.upstream.ca_file,
            extra_env={MODEL_KEY_ENV: MODEL_KEY},
        )
        self.fleet = ctx.keep(ctx.fleet(config))
        with ctx.journal.activity("open-host-client-listeners") as act:
            for i in range(self.options.scale):
                self.host_ports[f"host-{i}"] = self.gateway.add_sandbox(f"host-{i}")
            act.output = {"listeners": len(self.host_ports)}
        n_guests = self.options.sandboxes
        if n_guests:
            with ctx.journal.activity("boot-sandboxes") as act:
                with ThreadPoolExecutor(max_workers=n_guests) as pool:
                    self.guests = list(pool.map(lambda i: ctx.boot(self.fleet, f"sb{i}"), range(n_guests)))
                for guest in self.guests:
                    put = guest.exec(f"cat > {GUEST_SCRIPT}", stdin=AGENT_SCRIPT.read_bytes(), timeout=10)
                    if put.rc != 0:
                        raise RuntimeError(f"copying agent.sh into {guest.id} failed: {put.stderr!r}")
                act.output = {"sandboxes": [g.id for g in self.guests]}

    def steady_state(self, ctx: ScenarioContext) -> dict[str, Any]:
        """Hypothesis: legitimate traffic (a model API call) gets through, under whatever deny mode."""
        with ctx.journal.activity("probe:model-api-answers-200", "probe") as act:
            port = next(iter(self.host_ports.values()))
            status = status_of(http_exchange(port, model_request("steady-state")))
            act.output = {"status": status}
        return {
            "met": status == 200,
            "probes": [{"name": "model-api-answers-200", "value": status, "tolerance": 200, "met": status == 200}],
        }

    def run(self, ctx: ScenarioContext) -> None:
        tail = AuditTail(self.gateway.audit_path)
        tail.new()  # setup's records are not any cell's
        threshold = self.options.threshold
        data: dict[str, Any] = {
            "threshold": threshold,
            "window_s": LOOP_WINDOW_S,
            "caps": {"guest": GUEST_CAP, "host": HOST_CAP, "backoff": BACKOFF_CAP},
            "clients": list(CLIENTS),
            "deny_modes": list(DENY_MODES),
            "breakers": list(BREAKER),
            "cells": self.cells,
            "collateral": {},
            "breaker_ends_naive": [],
            "agent": None,
        }
        ctx.data["retry403"] = data
        for mode in DENY_MODES:
            data["collateral"][mode] = {}
            for breaker in BREAKER:
                # Off keeps the answer at 429 so the next "on" setting starts from the default.
                self.gateway.set_deny(
                    deny_mode=mode,
                    loop_breaker=breaker != BREAKER_OFF,
                    loop_threshold=threshold,
                    loop_window_s=LOOP_WINDOW_S,
                    loop_answer=BREAKER_429 if breaker == BREAKER_OFF else breaker,
                )
                setting = f"{mode}/breaker-{breaker}"
                for client in CLIENTS:
                    for where in ("guest", "host") if self.guests else ("host",):
                        with ctx.journal.activity(f"{where}:{client}@{setting}") as act:
                            cell = self.run_cell(where, client, mode, breaker, tail)
                            act.output = {k: cell[k] for k in ("blocked_requests", "model_calls", "gave_up")}
                        ctx.save()
                if self.options.agent:
                    self.run_agent(ctx, mode, breaker, tail)
                with ctx.journal.activity(f"probe:collateral@{setting}", "probe") as act:
                    data["collateral"][mode][breaker] = act.output = self.collateral(mode, breaker, threshold)
        data["breaker_ends_naive"] = breaker_ends_naive(self.cells, threshold)
        data["checks"] = self.checks = self.check(threshold)
        data["recommendation"] = recommend(self.cells, data["collateral"])
        ctx.save()

    def run_cell(self, where: str, client: str, mode: str, breaker: str, tail: AuditTail) -> dict[str, Any]:
        cell_id = f"{where}-{client}-{mode}-{breaker}"
        cap = cap_for(client, where)
        started = time.monotonic()
        if where == "guest":
            runs = self._guest_runs(client, cell_id, cap)
            sandboxes = {g.id for g in self.guests}
        else:
            with ThreadPoolExecutor(max_workers=len(self.host_ports)) as pool:
                runs = list(
                    pool.map(
                        lambda item: run_host_client(client, item[1][1], cell_id, cap, item[0]),
                        enumerate(self.host_ports.items()),
                    )
                )
            sandboxes = set(self.host_ports)
        wall = time.monotonic() - started
        counts = count_cell(tail.new(), cell_id, sandboxes)
        instances = len(runs)
        gave_up: dict[str, int] = {}
        for run in runs:
            gave_up[run["reason"]] = gave_up.get(run["reason"], 0) + 1
        cell = {
            "where": where,
            "client": client,
            "deny_mode": mode,
            "breaker": breaker,
            "cell": cell_id,
            "cap": cap,
            "instances": instances,
            **counts,
            "blocked_per_client": round(counts["blocked_requests"] / max(1, instances), 2),
            "model_calls_per_client": round(counts["model_calls"] / max(1, instances), 2),
            "client_attempts": sum(r["attempts"] for r in runs),
            "wall_s": round(max((r["wall_s"] for r in runs), default=wall), 3),
            "gave_up": gave_up,
            "stopped_before_cap": all(r["reason"] != "cap" for r in runs),
            # The blocked host never answers 2xx on its own: a client that stopped on "ok" took the
            # breaker's 200-terminal answer (the audit log's "200" answers confirm it was sent).
            "ended_by_breaker": gave_up.get("ok", 0) if counts["answers"].get("200") else 0,
        }
        self.cells.append(cell)
        return cell

    def _guest_runs(self, client: str, cell_id: str, cap: int) -> list[dict[str, Any]]:
        env = (
            f"CLIENT={client} CAP={cap} CELL={cell_id} BLOCKED={BLOCKED_HOST} MODEL={MODEL_HOST} "
            f"BASE_MS={BACKOFF_BASE_MS} MAX_MS={BACKOFF_MAX_MS}"
        )

        def one(guest: Sandbox) -> dict[str, Any]:
            proxy = f"PROXY='{guest.network.egress.host} {guest.network.egress.port}'"
            budget = cap * GUEST_ITERATION_BUDGET_S + GUEST_SLACK_S
            res = guest.exec(f"{env} {proxy} sh {GUEST_SCRIPT}", timeout=budget)
            found = RESULT_LINE.search(res.text)
            if res.timed_out or not found:
                return {"attempts": 0, "reason": "timeout" if res.timed_out else "error", "wall_s": res.duration_s}
            return {"attempts": int(found.group(1)), "reason": found.group(2), "wall_s": round(res.duration_s, 3)}

        with ThreadPoolExecutor(max_workers=len(self.guests)) as pool:
            return list(pool.map(one, self.guests))

    def run_agent(self, ctx: ScenarioContext, mode: str, breaker: str, tail: AuditTail) -> None:
        """The user's own agent, inside each sandbox; counted per sandbox from the audit log."""
        cell_id = f"agent-{mode}-{breaker}"
        command = str(self.options.agent)
        env = (
            f"BLOCKED_URL=http://{BLOCKED_HOST}/retry403/{cell_id} MODEL_URL=http://{MODEL_HOST}/v1/messages/{cell_id}"
        )

        def proxied(guest: Sandbox) -> str:
            return f"HTTP_PROXY=http://{guest.network.egress} http_proxy=http://{guest.network.egress}"

        with ctx.journal.activity(f"agent@{mode}/breaker-{breaker}") as act:
            started = time.monotonic()
            results = [
                g.exec(f"{env} {proxied(g)} sh -c {shell_quote(command)}", timeout=AGENT_TIMEOUT_S) for g in self.guests
            ]
            counts = count_cell(tail.new(), None, {g.id for g in self.guests})
            cell = {
                "where": "guest",
                "client": "custom-agent",
                "deny_mode": mode,
                "breaker": breaker,
                "cell": cell_id,
                "cap": None,
                "instances": len(results),
                **counts,
                "blocked_per_client": round(counts["blocked_requests"] / max(1, len(results)), 2),
                "model_calls_per_client": round(counts["model_calls"] / max(1, len(results)), 2),
                "client_attempts": None,
                "wall_s": round(time.monotonic() - started, 3),
                "gave_up": {
                    "exited": sum(1 for r in results if not r.timed_out),
                    "timeout": sum(1 for r in results if r.timed_out),
                },
                "stopped_before_cap": all(not r.timed_out for r in results),
                "ended_by_breaker": None,
                "exit_codes": [r.rc for r in results],
            }
            self.cells.append(cell)
            act.output = {k: cell[k] for k in ("blocked_requests", "model_calls", "gave_up")}

    def collateral(self, mode: str, breaker: str, threshold: int) -> dict[str, Any]:
        """Allowed, the same denied request threshold+1 times (so the breaker's answer is among them when
        it is on), allowed, all on one keep-alive connection: does the deny or the loop answer take the
        allowed call after it down with it? (Legitimate traffic hurt by the setting.)"""
        port = next(iter(self.host_ports.values()))
        allowed = (f"GET http://{MODEL_HOST}/v1/models HTTP/1.1\r\nHost: {MODEL_HOST}\r\n\r\n").encode()
        denied = (
            f"GET http://{BLOCKED_HOST}/collateral-{mode}-{breaker} HTTP/1.1\r\nHost: {BLOCKED_HOST}\r\n\r\n"
        ).encode()
        sequence = [allowed, *[denied] * (threshold + 1), allowed]
        statuses: list[int] = []
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_SOCKET_TIMEOUT_S) as sock:
                reader = sock.makefile("rb")
                for raw in sequence:
                    sock.sendall(raw)
                    statuses.append(read_one_response(reader))
        except OSError:
            pass
        statuses += [0] * (len(sequence) - len(statuses))
        return {
            "statuses": statuses,
            "allowed_ok": sum(1 for s in (statuses[0], statuses[-1]) if s == 200),
            "allowed_sent": 2,
        }

    def check(self, threshold: int) -> list[str]:
        """What must hold for the gateway to behave as designed; each failure is one line."""
        failures = []
        for cell in self.cells:
            if cell["client"] == "custom-agent":
                continue
            looped = cell["blocked_requests"] > threshold * cell["instances"]
            if cell["breaker"] != BREAKER_OFF and looped and cell["loop_trips"] < cell["instances"]:
                failures.append(
                    f"{cell['cell']}: looped past the threshold but the breaker tripped "
                    f"{cell['loop_trips']} times for {cell['instances']} clients"
                )
            if cell["breaker"] == BREAKER_OFF and cell["loop_trips"]:
                failures.append(f"{cell['cell']}: the breaker was off but tripped")
            if cell["client"] == "reads-body" and cell["deny_mode"] != "reset" and cell["blocked_per_client"] != 1:
                failures.append(f"{cell['cell']}: reads-body should stop after one explained deny")
        for row in breaker_ends_naive(self.cells, threshold):
            if row["breaker"] == BREAKER_TERMINAL and row["expected"] and not row["ended"]:
                failures.append(
                    f"{row['where']}-naive-{row['deny_mode']}-{BREAKER_TERMINAL}: the breaker did not end "
                    f"the naive loop ({row['blocked_per_client']} requests per client, expected "
                    f"{threshold + 1}; gave up: {row['gave_up']})"
                )
        return failures

    def rollback(self, ctx: ScenarioContext) -> None:
        """Nothing of its own: the fleet and the stand-in upstream are run resources the runner releases."""

    def exit_code(self, ctx: ScenarioContext) -> int:
        return 1 if self.checks or not self.cells else 0


def read_one_response(reader: Any) -> int:
    """Status of one Content-Length-framed response on a keep-alive connection; 0 if it broke."""
    line = reader.readline()
    status = status_of(line)
    length = 0
    while True:
        header = reader.readline()
        if not header or header in (b"\r\n", b"\n"):
            break
        key, _, value = header.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        reader.read(length)
    return status


def shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def breaker_ends_naive(cells: list[dict[str, Any]], threshold: int) -> list[dict[str, Any]]:
    """The naive client per breaker setting: did the breaker end its loop? "Ended" means every client
    stopped before its cap, on the breaker's answer, after exactly threshold+1 requests (threshold
    plain denies, then one loop answer). Expected only for 200-terminal: the naive client retries any
    non-2xx, 429 included, so 429 cannot end it. `expected` is False when the cap is too small for
    the breaker to trip at all."""
    rows = []
    for cell in cells:
        if cell["client"] != "naive":
            continue
        ended = (
            cell["stopped_before_cap"]
            and cell["ended_by_breaker"] == cell["instances"]
            and cell["blocked_per_client"] == threshold + 1
        )
        rows.append(
            {
                "where": cell["where"],
                "deny_mode": cell["deny_mode"],
                "breaker": cell["breaker"],
                "blocked_per_client": cell["blocked_per_client"],
                "cap": cell["cap"],
                "gave_up": cell["gave_up"],
                "stopped_before_cap": cell["stopped_before_cap"],
                "ended": ended,
                "expected": cell["breaker"] == BREAKER_TERMINAL and threshold + 1 <= cell["cap"],
            }
        )
    return rows


def breaker_label(breaker: str) -> str:
    return "the loop breaker off" if breaker == BREAKER_OFF else f"the loop breaker answering {breaker}"


def recommend(cells: list[dict[str, Any]], collateral: dict[str, Any]) -> str:
    """One line from the data: the setting with the fewest wasted requests + model calls (then time), among
    those that did not break an allowed call on the same keep-alive connection."""
    totals: dict[tuple[str, str], list[float]] = {}
    for cell in cells:
        if cell["client"] == "custom-agent":
            continue
        key = (cell["deny_mode"], cell["breaker"])
        acc = totals.setdefault(key, [0.0, 0.0, 0.0])
        acc[0] += cell["blocked_per_client"]
        acc[1] += cell["model_calls_per_client"]
        acc[2] += cell["wall_s"]
    if not totals:
        return "no data"

    def unhurt(key: tuple[str, str]) -> bool:
        return bool(collateral.get(key[0], {}).get(key[1], {}).get("allowed_ok", 2) == 2)

    safe = {k: v for k, v in totals.items() if unhurt(k)} or totals
    # Ties go to a breaker being on (it also guards clients that were not in this run), then to 429
    # (HTTP-correct: no client can mistake it for content).
    best = min(safe, key=lambda k: (safe[k][0] + safe[k][1], k[1] == BREAKER_OFF, k[1] == BREAKER_TERMINAL, safe[k][2]))
    worst = max(totals, key=lambda k: (totals[k][0] + totals[k][1], totals[k][2]))
    hurt = sorted(f"{m} (breaker {b})" for m, b in totals if not unhurt((m, b)))

    def label(k: tuple[str, str]) -> str:
        return f"deny mode {k[0]} with {breaker_label(k[1])}"

    line = (
        f"Use {label(best)}: summed over the four reference clients it cost "
        f"{safe[best][0]:.0f} blocked requests, {safe[best][1]:.0f} model calls per client and "
        f"{safe[best][2]:.1f} s, against {totals[worst][0]:.0f}, {totals[worst][1]:.0f} and "
        f"{totals[worst][2]:.1f} s for {label(worst)}"
    )
    if hurt:
        line += f"; {', '.join(hurt)} also broke an allowed request on the same connection"
    return line + "."


def terminal_summary(data: dict[str, Any]) -> str:
    """The recommendation and the self-checks, from the run's saved data."""
    retry = data.get("retry403") or {}
    checks = retry.get("checks") or []
    lines = [f"recommendation: {retry.get('recommendation', '—')}"]
    lines += [f"check failed: {failure}" for failure in checks] or ["all self-checks passed"]
    return "\n".join(lines)
