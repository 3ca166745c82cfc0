"""The latency a sandboxed agent actually sees: timed requests from inside a booted guest.

Guests are busybox-only (busybox wget segfaults there), so each request is `nc` to the gateway
with an absolute-form plain-http request, and time comes from `adjtimex` (microseconds; busybox
`date` has no %N). Where adjtimex is refused (gVisor's sentry does not allow it), time comes from the
nanosecond mtime of a file touched inside instead; on a Linux kernel that clock is coarse (one tick), so
it is only the fallback, and the results name the clock used. Taking a timestamp forks processes, which is
slow under TCG and ptrace, so the script also times back-to-back timestamps and the median of those is
subtracted from each request.
"""

from __future__ import annotations

import statistics
from typing import Any, Protocol
from urllib.parse import urlsplit

from harness.load.analyse import latency
from harness.sandbox.base import ExecResult, GuestNetwork

DEFAULT_SAMPLES = 10
MAX_SAMPLES = 200
PER_REQUEST_BUDGET_S = 3.0
"""Exec timeout per request under TCG, generous: a timed-out exec loses all samples."""
NOTE = "Measured inside the sandbox with busybox nc; the median cost of taking a timestamp there is subtracted."

SCRIPT = """\
req=/tmp/.br-req.$$; out=/tmp/.br-out.$$
cat > $req
if adjtimex >/dev/null 2>&1; then
  echo "K adjtimex"
  now() { adjtimex | awk '/tv_sec/ {s=$2} /tv_usec/ {u=$2} END {print s, u}'; }
else
  echo "K file-mtime"
  clk=/tmp/.br-clk.$$
  now() { touch $clk; stat -c %y $clk | awk '{split($1,d,"-"); split($2,t,":"); \
    s=d[3]*86400+t[1]*3600+t[2]*60+int(t[3]); printf "%d %d\\n", s, (t[3]-int(t[3]))*1000000}'; }
fi
i=0
while [ $i -lt {n} ]; do a=$(now); b=$(now); echo "C $a $b"; i=$((i+1)); done
i=0
while [ $i -lt {n} ]; do
  a=$(now); nc {host} {port} < $req > $out 2>/dev/null; rc=$?; b=$(now)
  st=$(head -n 1 $out | awk '{print $2}'); echo "R $a $b $rc ${st:-none} $(wc -c < $out)"
  i=$((i+1))
done
rm -f $req $out $clk
"""


class Guest(Protocol):
    """What sampling needs of a sandbox: a shell, and where its egress is."""

    network: GuestNetwork

    def exec(self, command: str, timeout: float = 30.0, stdin: bytes = b"") -> ExecResult: ...


def _us(sec: str, usec: str) -> int:
    return int(sec) * 1_000_000 + int(usec)


def request_bytes(url: str) -> bytes:
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"in-guest sampling speaks plain http through the proxy only, not {url!r}")
    return f"GET {url} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode()


def parse(output: str, expect_status: tuple[int, ...]) -> dict[str, Any]:
    clock: list[float] = []
    raw: list[float] = []
    statuses: dict[str, int] = {}
    failures: dict[str, int] = {}
    clock_name = None
    for line in output.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == "K":
            clock_name = fields[1]
        elif len(fields) == 5 and fields[0] == "C":
            clock.append((_us(fields[3], fields[4]) - _us(fields[1], fields[2])) / 1000.0)
        elif len(fields) == 8 and fields[0] == "R":
            elapsed = (_us(fields[3], fields[4]) - _us(fields[1], fields[2])) / 1000.0
            rc, status = fields[5], fields[6]
            statuses[status] = statuses.get(status, 0) + 1
            if rc != "0" and status == "none":
                failures[f"nc_rc_{rc}"] = failures.get(f"nc_rc_{rc}", 0) + 1
            elif not status.isdigit() or int(status) not in expect_status:
                failures[f"http_{status}"] = failures.get(f"http_{status}", 0) + 1
            else:
                raw.append(elapsed)
    overhead = statistics.median(clock) if clock else 0.0
    corrected = [max(0.0, v - overhead) for v in raw]
    return {
        "n": len(raw) + sum(failures.values()),
        "ok": len(raw),
        "failures": failures,
        "statuses": statuses,
        "latency_ms": latency(corrected),
        "raw_latency_ms": latency(raw),
        "clock_overhead_ms": round(overhead, 3),
        "clock": clock_name,
    }


def sample_in_guest(
    sandbox: Guest,
    url: str,
    n: int = DEFAULT_SAMPLES,
    proxy: str | None = None,
    expect_status: tuple[int, ...] = (200,),
) -> dict[str, Any]:
    """n timed plain-http requests for `url` through the gateway (the sandbox's egress address unless
    `proxy` says otherwise), from inside `sandbox`.

    Returns n, ok, failures (by kind), statuses, latency_ms (p50..max, clock overhead
    subtracted), raw_latency_ms, clock_overhead_ms, url, proxy, note. Never raises for a failed
    request; an exec that fails or times out is reported under failures["exec"].
    """
    n = max(1, min(int(n), MAX_SAMPLES))
    proxy = proxy or str(sandbox.network.egress)
    host, _, port = proxy.rpartition(":")
    script = SCRIPT.replace("{n}", str(n)).replace("{host}", host).replace("{port}", port)
    result = sandbox.exec(script, timeout=n * PER_REQUEST_BUDGET_S + 10.0, stdin=request_bytes(url))
    figures = parse(result.text, expect_status)
    if result.timed_out or figures["n"] == 0:
        # Nothing parsed is a failure with its reason, never an empty success (n=0).
        figures["failures"]["exec"] = 1
        figures["exec_error"] = result.stderr.decode(errors="replace")[-300:] or f"rc {result.rc}, no samples parsed"
    figures.update(url=url, proxy=proxy, exec_s=round(result.duration_s, 3), note=NOTE)
    return figures
