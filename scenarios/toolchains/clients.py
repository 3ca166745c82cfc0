"""The clients, what each cell counts from the gateway's audit log, and the recommendation the matrix leads to.

Pure: nothing here boots or dials (it reads audit records with the gateway's own audit helpers); the tests
drive it with recorded audit records.

Each client has a denied destination and an allowed one. Every client's denied destination is its own (a host,
or for the SDKs a path on their API host), so clients that share a sandbox never share a loop-breaker key (the
breaker keys on sandbox, method, scheme, host, port and path; a CONNECT has no path) nor each other's audit
records. The SDKs' denied destination is a path on their own API host (GET /v1/models, outside the policy's
POST rule), so their allowed call after it runs on the same client, and on the same keep-alive connection
unless the deny closed it: that is where the collateral can show.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from harness.gateway.audit import answer_counts

from .standins import FILES_HOST, GIT_HOST, GIT_REPO_PATH, INDEX_HOST, RAW_PATH

DENY_MODES = ("403", "403-explained", "reset")
BREAKER_OFF = "off"
BREAKERS = (BREAKER_OFF, "429", "200-terminal")
"""The loop breaker off, or on answering 429 (HTTP-correct) or 200-terminal once tripped."""
TIMEOUT_EXIT = "still retrying at timeout"

POLICY_TEXT = re.compile(
    r"(?i)blocked by network policy|blocked-by-allowlist|blocked_by_policy|retry_loop_detected|retry-loop-detected"
)
"""What the gateway's deny and loop answers say (harness/gateway/deny.py): the client's output names the policy
when one of these reached it."""

GUEST_DIR = "/tmp/br-tc"
PIP_PACKAGES = "six tomli"
REQUESTS_RETRY = "Retry(total=5, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504))"
"""The urllib3 Retry of the requests client (driver.py builds the same): the common recipe, with a 0.5 s
backoff factor (0, 1, 2, 4, 8 s between its attempts under urllib3 1.26)."""


@dataclass(frozen=True)
class Client:
    """One client of the matrix."""

    name: str
    """As given to --set clients=."""
    family: str
    """What the recommendation is made for: curl, wget, pip, git, requests, model SDKs."""
    group: str
    """The sandbox it runs in (clients of one group share a guest)."""
    denied_host: str
    denied_path: str | None
    """A path prefix the gateway sees (an intercepted request), or None for a CONNECT it denies."""
    allowed_host: str
    allowed_path: str
    """Path prefix of its allowed requests (all intercepted, so the audit log has their paths)."""
    commands: tuple[str, ...] = ()
    """Binaries it needs in the image (`command -v`)."""
    modules: tuple[str, ...] = ()
    """Python modules it needs in the image (importlib's find_spec, no import)."""
    denied: str = ""
    """Shell command for the denied cell ({cell} is the cell id); empty for a Python client (driver.py)."""
    allowed: str = ""
    """Shell command for the allowed cell."""

    @property
    def python(self) -> bool:
        """Run by a long-lived driver in the guest (driver.py), which imports its library once."""
        return not self.denied


def _raw(client: str) -> str:
    return f"https://{GIT_HOST}{RAW_PATH}/{client}.txt"


def _pip(index: str | None) -> str:
    chosen = f" --index-url {index}" if index else ""
    return f"python3 -m pip install --no-cache-dir --no-deps --target {GUEST_DIR}/pip-{{cell}}{chosen} {PIP_PACKAGES}"


CLIENTS: tuple[Client, ...] = (
    Client(
        "curl", "curl", "shell", "example.com", None, GIT_HOST, f"{RAW_PATH}/curl.txt", ("curl",),
        denied="curl -sS https://example.com/toolchains/{cell}", allowed=f"curl -sS {_raw('curl')}",
    ),
    Client(
        "curl-retry", "curl", "shell", "example.net", None, GIT_HOST, f"{RAW_PATH}/curl-retry.txt", ("curl",),
        denied="curl -sS --retry 5 https://example.net/toolchains/{cell}",
        allowed=f"curl -sS --retry 5 {_raw('curl-retry')}",
    ),
    Client(
        "curl-retry-all", "curl", "shell", "example.org", None, GIT_HOST, f"{RAW_PATH}/curl-retry-all.txt", ("curl",),
        denied="curl -sS --retry 5 --retry-all-errors https://example.org/toolchains/{cell}",
        allowed=f"curl -sS --retry 5 --retry-all-errors {_raw('curl-retry-all')}",
    ),
    Client(
        "wget", "wget", "shell", "www.example.com", None, GIT_HOST, f"{RAW_PATH}/wget.txt", ("wget",),
        denied="wget --tries=5 -O - https://www.example.com/toolchains/{cell}",
        allowed=f"wget --tries=5 -O - {_raw('wget')}",
    ),
    Client(
        "git", "git", "shell", "gitlab.com", None, GIT_HOST, GIT_REPO_PATH, ("git",),
        denied=f"GIT_TERMINAL_PROMPT=0 git clone https://gitlab.com{GIT_REPO_PATH} {GUEST_DIR}/git-{{cell}}",
        allowed=f"GIT_TERMINAL_PROMPT=0 git clone https://{GIT_HOST}{GIT_REPO_PATH} {GUEST_DIR}/git-{{cell}}",
    ),
    Client(
        "pip", "pip", "pip", "test.pypi.org", None, INDEX_HOST, "/simple/", ("python3",), ("pip",),
        denied=_pip("https://test.pypi.org/simple/"), allowed=_pip(None),
    ),
    Client("requests", "requests", "python", "httpbin.org", None, GIT_HOST, f"{RAW_PATH}/requests.txt",
           ("python3",), ("requests", "urllib3")),
    Client("anthropic", "model SDKs", "anthropic", "api.anthropic.com", "/v1/models", "api.anthropic.com",
           "/v1/messages", ("python3",), ("anthropic",)),
    Client("openai", "model SDKs", "python", "api.openai.com", "/v1/models", "api.openai.com",
           "/v1/chat/completions", ("python3",), ("openai",)),
)  # fmt: skip
BY_NAME = {c.name: c for c in CLIENTS}
ALSO_ALLOWED = {"pip": ((FILES_HOST, "/packages/"),)}
"""Further allowed destinations a client's allowed cell reaches (pip fetches the wheels the index links to)."""


def denied_url(client: Client, cell: str) -> str:
    """The URL a Python client's denied cell asks for (driver.py builds it the same way)."""
    return f"https://{client.denied_host}{client.denied_path or '/toolchains/' + cell}"


# ---- counting from the audit log ---------------------------------------------------------------------------
def _matches(record: dict[str, Any], host: str, path: str | None) -> bool:
    if record.get("host") != host:
        return False
    return path is None or (record.get("path") or "").startswith(path)


def count_cell(records: list[dict[str, Any]], client: Client, sandbox: str, destination: str) -> dict[str, Any]:
    """What the gateway saw of one cell: requests sent (a loop breaker's trip record is not a request), the
    answers they got (a status, or "reset"), loop trips, the 2xx answers, and the span from first to last."""
    mine = [r for r in records if r.get("sandbox") == sandbox]
    if destination == "denied":
        hits = [r for r in mine if _matches(r, client.denied_host, client.denied_path)]
        sent = [r for r in hits if r.get("decision") == "deny" and r.get("event") != "retry_loop_detected"]
    else:
        targets = ((client.allowed_host, client.allowed_path), *ALSO_ALLOWED.get(client.name, ()))
        hits = [r for r in mine if any(_matches(r, h, p) for h, p in targets)]
        # The allowed hosts are intercepted: the CONNECT is the tunnel, each request inside is a record.
        sent = [r for r in hits if r.get("event") == "request"]
    answers = answer_counts(sent)
    stamps = [float(r["ts"]) for r in sent]
    return {
        "requests": len(sent),
        "answers": answers,
        "loop_trips": sum(1 for r in hits if r.get("event") == "retry_loop_detected"),
        "ok_2xx": sum(1 for r in sent if r.get("decision") == "allow" and 200 <= int(r.get("status") or 0) < 300),
        "audit_span_s": round(max(stamps) - min(stamps), 3) if stamps else 0.0,
    }


def dialled_addresses(records: list[dict[str, Any]]) -> list[str]:
    """Every upstream address the gateway dialled, as its audit records name them."""
    return sorted({str(r["upstream_addr"]) for r in records if r.get("upstream_addr")})


def is_loopback_address(address: str) -> bool:
    """`address` is "ip:port" or "[ipv6]:port" (format_authority's form)."""
    import ipaddress

    host = address[1 : address.find("]")] if address.startswith("[") else address.rsplit(":", 1)[0]
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def make_cell(
    client: Client,
    mode: str,
    breaker: str,
    destination: str,
    sandbox: str,
    counts: dict[str, Any],
    ran: dict[str, Any],
) -> dict[str, Any]:
    """One cell as plain data: the audit's counts and what the client did (`ran`: exit, seconds, timed_out,
    output, command)."""
    timed_out = bool(ran.get("timed_out"))
    exit_ = TIMEOUT_EXIT if timed_out else ran["exit"]
    succeeded = exit_ in (0, "ok")
    output = str(ran.get("output") or "")
    return {
        "client": client.name,
        "family": client.family,
        "deny_mode": mode,
        "breaker": breaker,
        "destination": destination,
        "sandbox": sandbox,
        **counts,
        "seconds": round(float(ran.get("seconds") or 0.0), 2),
        "exit": exit_,
        "timed_out": timed_out,
        "succeeded": succeeded,
        # The user saw why: the gateway's words reached the client's output (or the exception it raised).
        "readable": bool(POLICY_TEXT.search(output)),
        # A denied destination that the client reports as a success: it took the gateway's answer for content.
        "false_success": destination == "denied" and succeeded,
        # The allowed destination worked: the client said so and the gateway saw a 2xx for it.
        "worked": destination == "allowed" and succeeded and counts["ok_2xx"] > 0,
        "command": ran.get("command", ""),
        "output": output[-OUTPUT_KEPT:],
    }


OUTPUT_KEPT = 1500
"""Characters of a client's output kept as a cell's evidence (its end: where the error is)."""


def matrix_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per client x deny mode x breaker: its denied cell's figures and whether its allowed call worked."""
    index = {(c["client"], c["deny_mode"], c["breaker"], c["destination"]): c for c in cells}
    rows = []
    for (client, mode, breaker, destination), cell in index.items():
        if destination != "denied":
            continue
        allowed = index.get((client, mode, breaker, "allowed"))
        rows.append(
            {
                "client": client,
                "family": cell["family"],
                "deny_mode": mode,
                "breaker": breaker,
                "requests": cell["requests"],
                "answers": cell["answers"],
                "seconds": cell["seconds"],
                "exit": cell["exit"],
                "timed_out": cell["timed_out"],
                "readable": cell["readable"],
                "false_success": cell["false_success"],
                "collateral_ok": None if allowed is None else allowed["worked"],
            }
        )
    order = {c.name: i for i, c in enumerate(CLIENTS)}
    modes = {m: i for i, m in enumerate(DENY_MODES)}
    breakers = {b: i for i, b in enumerate(BREAKERS)}
    return sorted(rows, key=lambda r: (order.get(r["client"], 99), modes[r["deny_mode"]], breakers[r["breaker"]]))


# ---- the recommendation ----------------------------------------------------------------------------------
SECONDS_NOISE_S = 5.0
SECONDS_NOISE_FRACTION = 0.25
"""Seconds closer than max(5 s per client summed, 25 %) are the same figure: under TCG on a shared 2-core host one
cell's time swung by up to 5 s between identical phases (curl's refused CONNECT: 2.4 to 8.0 s)."""
MODE_PREFERENCE = ("403-explained", "403", "reset")
"""Between settings the data cannot tell apart: the answer that says the most (a machine-readable reason) first."""


def _score(rows: list[dict[str, Any]]) -> tuple[int, int, int, int, int, float]:
    """Lower is better, in this order: clients still retrying at the timeout, allowed calls broken, denied
    requests taken for a success, clients that never saw why (the policy's words), requests, seconds."""
    return (
        sum(1 for r in rows if r["timed_out"]),
        sum(1 for r in rows if r["collateral_ok"] is False),
        sum(1 for r in rows if r["false_success"]),
        sum(1 for r in rows if not r["readable"]),
        sum(int(r["requests"]) for r in rows),
        round(sum(float(r["seconds"]) for r in rows), 2),
    )


def setting_label(mode: str, breaker: str) -> str:
    return f"deny mode {mode} with " + (
        "the loop breaker off" if breaker == BREAKER_OFF else f"the breaker on {breaker}"
    )


def _describe(rows: list[dict[str, Any]]) -> str:
    timed_out, broken, false_ok, unreadable, requests, seconds = _score(rows)
    n = len(rows)
    per_client = ""
    if n > 1:
        per_client = " (" + ", ".join(f"{r['client']} {r['requests']}" for r in rows) + ")"
    parts = [f"{requests} request{'s' if requests != 1 else ''}{per_client}", f"{seconds:g} s to give up"]
    parts.append(f"the policy's words reached {n - unreadable} of {n} client{'s' if n != 1 else ''}")
    if timed_out:
        parts.append(f"{timed_out} still retrying at the timeout")
    if false_ok:
        parts.append(f"{false_ok} took the deny for a success")
    if broken:
        parts.append(f"{broken} lost the allowed call after it")
    return ", ".join(parts)


Setting = tuple[str, str]


def _within_noise(a: float, b: float, clients: int) -> bool:
    return abs(a - b) <= max(SECONDS_NOISE_S * clients, SECONDS_NOISE_FRACTION * min(a, b))


def _preference(key: Setting) -> tuple[bool, bool, int]:
    """Ties go to the breaker being on (it also guards clients not measured here), then to 429 (no client can
    mistake it for content), then to the deny mode that says the most."""
    mode, breaker = key
    rank = MODE_PREFERENCE.index(mode) if mode in MODE_PREFERENCE else len(MODE_PREFERENCE)
    return (breaker == BREAKER_OFF, breaker == "200-terminal", rank)


def _best_and_worst(by_setting: dict[Setting, list[dict[str, Any]]]) -> tuple[Setting, Setting, bool]:
    """The best setting (the lowest score; seconds within the noise are equal, then `_preference`), the worst, and
    whether every setting had the same counts (then only seconds differ, and the worst is not worth naming)."""
    scores = {k: _score(v) for k, v in by_setting.items()}
    n = max(len(v) for v in by_setting.values())
    lowest = min(s[:5] for s in scores.values())
    tied = {k: s for k, s in scores.items() if s[:5] == lowest}
    fastest = min(s[5] for s in tied.values())
    best = min((k for k, s in tied.items() if _within_noise(s[5], fastest, n)), key=_preference)
    worst = max(scores, key=lambda k: scores[k])
    return best, worst, scores[worst][:5] == lowest


def findings(rows: list[dict[str, Any]]) -> list[str]:
    """What the matrix says across clients, each sentence computed from the rows."""
    out: list[str] = []
    readable = [r for r in rows if r["readable"]]
    if rows:
        reached: dict[str, list[str]] = {}
        for row in readable:
            reached.setdefault(row["client"], [])
            if row["deny_mode"] not in reached[row["client"]]:
                reached[row["client"]].append(row["deny_mode"])
        if reached:
            named = "; ".join(f"{c} (deny mode {', '.join(m)})" for c, m in reached.items())
            out.append(
                f"The policy's words reached the user from {len(reached)} of "
                f"{len({r['client'] for r in rows})} clients only: {named}."
            )
        else:
            out.append("The policy's words reached the user from no client, under any setting.")
    on = [r for r in rows if r["breaker"] != BREAKER_OFF]
    tripped = [r for r in on if r["answers"].get("429") or r["answers"].get("200")]
    terminal = [r for r in on if r["breaker"] == "200-terminal"]
    if terminal and not any(r["answers"].get("200") for r in terminal):
        out.append(
            "The breaker's 200-terminal answer was never sent: no client repeated a request the gateway can "
            "see (an intercepted one) past the threshold, and a looping CONNECT always gets 429, so "
            "200-terminal measured the same as 429 here."
        )
    if on:
        looping = sorted({r["client"] for r in tripped}, key=lambda n: list(BY_NAME).index(n))
        out.append(
            f"The breaker tripped for {', '.join(looping) or 'no client'}; every other client stopped "
            "before its threshold on its own."
        )
    hurt = sorted({r["client"] for r in rows if r["collateral_ok"] is False})
    if hurt:
        out.append(f"The allowed call after the deny failed for: {', '.join(hurt)}.")
    return out


def recommend(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per client family, the gateway setting (deny mode x breaker) that scored best on that family's cells, and
    the worst for contrast; the one setting best over every client (deny mode and breaker are gateway-wide); and
    the findings across clients. Every figure comes from the rows."""

    def settings(subset: list[dict[str, Any]]) -> dict[Setting, list[dict[str, Any]]]:
        out: dict[Setting, list[dict[str, Any]]] = {}
        for row in subset:
            out.setdefault((row["deny_mode"], row["breaker"]), []).append(row)
        return out

    families: list[dict[str, Any]] = []
    for family in dict.fromkeys(r["family"] for r in rows):
        by_setting = settings([r for r in rows if r["family"] == family])
        best, worst, alike = _best_and_worst(by_setting)
        clients = sorted({r["client"] for r in by_setting[best]}, key=lambda n: list(BY_NAME).index(n))
        line = f"{family} ({', '.join(clients)}): {setting_label(*best)}: {_describe(by_setting[best])}"
        if alike:
            spread = sorted(_score(v)[5] for v in by_setting.values())
            line += (
                f"; all {len(by_setting)} settings had the same counts, and their seconds ({spread[0]:g}-"
                f"{spread[-1]:g}) vary with the shared TCG host's load, so the choice is the tie-break"
            )
        else:
            line += f"; worst, {setting_label(*worst)}: {_describe(by_setting[worst])}"
        families.append(
            {
                "family": family,
                "best": list(best),
                "worst": list(worst),
                "alike": alike,
                "score": list(_score(by_setting[best])),
                "text": line + ".",
            }
        )
    overall: dict[str, Any] | None = None
    if rows:
        by_setting = settings(rows)
        best, _worst, _alike = _best_and_worst(by_setting)
        overall = {
            "best": list(best),
            "text": f"Over every client measured, {setting_label(*best)}: {_describe(by_setting[best])}.",
        }
    return {"families": families, "overall": overall, "findings": findings(rows)}
