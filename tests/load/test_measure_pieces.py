"""The pieces of a trustworthy proxy measurement: interleaved schedules, windows, bootstrap intervals, the
verdicts of the checks, and hey and nginx for real (a fraction of a second of hey each)."""

from __future__ import annotations

import itertools
import socket
import ssl
from pathlib import Path

import psutil
import pytest

from harness import cli
from harness.errors import EnvironmentMissing
from harness.load import capacity, nginx
from harness.load.analyse import Sample
from harness.load.bench import ProxyBenchConfig
from harness.load.capacity import Cell, limit_of, rate, run_cell
from harness.load.checks import FAIL, NOISE, PASS, _verdict, describe_added
from harness.load.intervals import bootstrap, contains_zero, median_of
from harness.load.rounds import assign, make_schedule
from harness.load.targets import GATEWAY_INTERCEPT, Upstream, start_target
from harness.supervisor import Supervisor


def test_schedule_gives_every_target_one_window_per_round_in_a_seeded_shuffled_order() -> None:
    names = ["direct", "gateway", "squid", "tinyproxy"]
    orders, schedule = make_schedule(names, rounds=5, window_s=2.0, start=100.0, seed=11)
    assert all(sorted(order) == names for order in orders)
    assert len({tuple(o) for o in orders}) > 1  # shuffled per round, not one order repeated
    assert (orders, schedule) == make_schedule(names, 5, 2.0, 100.0, 11)
    assert [w[2] for w in schedule] == [n for order in orders for n in order]
    assert all(b[0] == a[1] for a, b in itertools.pairwise(schedule))  # back to back
    assert schedule[0][0] == 100.0 and schedule[-1][1] == 100.0 + 5 * 4 * 2.0


def test_samples_land_in_the_window_they_started_in_after_the_settle_time() -> None:
    schedule = [(0.0, 2.0, "a"), (2.0, 4.0, "b"), (4.0, 6.0, "a"), (6.0, 8.0, "b")]

    def sample(started: float, target: str) -> Sample:
        return Sample(t=started + 0.01, name="page", ms=10.0, length=1, failure="", target=target)

    samples = [sample(0.1, "a"), sample(0.7, "a"), sample(2.6, "b"), sample(2.6, "a"), sample(4.9, "a")]
    windows = assign(samples, schedule, per_round=2, settle_s=0.5)
    assert [(w.round, w.target, len(w.samples)) for w in windows] == [
        (0, "a", 1),
        (0, "b", 1),
        (1, "a", 1),
        (1, "b", 0),
    ]
    # 0.1 s is inside the settle time; a request to "a" that started in "b"'s window belongs to no window.


def test_bootstrap_is_seeded_and_tells_noise_from_a_shift() -> None:
    direct = [1.0, 1.2, 0.9, 1.1, 1.0, 1.05]
    same = [1.1, 1.0, 1.0, 0.95, 1.15, 1.0]
    slower = [3.0, 3.1, 2.9, 3.2, 3.05, 2.95]

    def diff(a: list[float]) -> object:
        return lambda idx: median_of(a, idx) - median_of(direct, idx)  # type: ignore[operator]

    est, ci = bootstrap(6, diff(same), seed=3)
    assert ci is not None and contains_zero(ci) and (est, ci) == bootstrap(6, diff(same), seed=3)
    est, ci = bootstrap(6, diff(slower), seed=3)
    assert ci is not None and not contains_zero(ci) and ci[0] <= est <= ci[1] and ci[0] > 1.5
    assert bootstrap(2, diff(slower), seed=3)[1] is None  # two rounds give no interval
    assert median_of([1.0, None, 3.0], [0, 1, 2]) == 2.0 and median_of([None], [0]) is None


def test_verdicts_come_from_the_whole_interval_and_no_overhead_is_negative() -> None:
    assert _verdict([0.2, 0.8], 1.0, upper=True) == PASS
    assert _verdict([1.2, 1.8], 1.0, upper=True) == FAIL
    assert _verdict([0.8, 1.2], 1.0, upper=True) == NOISE
    assert _verdict([5.5, 7.0], 5.0, upper=False) == PASS and _verdict([1.0, 3.0], 5.0, upper=False) == FAIL
    noise = describe_added({"estimate": -0.3, "ci": [-0.6, 0.1], "verdict": "within noise"})
    below = describe_added({"estimate": -0.3, "ci": [-0.6, -0.1], "verdict": "below direct"})
    assert noise.startswith("within noise") and below.startswith("below direct")
    assert describe_added({"estimate": 0.4, "ci": [0.2, 0.6], "verdict": "added"}).startswith("+0.40 ms")


def test_rate_counts_after_the_last_dial_and_never_a_burst() -> None:
    # 8 connections dialled in the first 0.05 s, then one response per ms until 1.05 s: 1000 rps.
    finished = [0.01 * i for i in range(1, 6)] + [0.05 + 0.001 * i for i in range(1, 1001)]
    assert rate(finished, dials=[0.01, 0.02, 0.05])[0] == pytest.approx(1000, rel=0.01)
    # 128 connections whose first (and only) responses all came back together after 1.4 s: 128 / 1.4 s.
    late = [1.4 + 0.0001 * i for i in range(128)]
    assert rate(late, dials=late)[0] == pytest.approx(128 / 1.4127, rel=0.01)


def test_limit_of_a_cell() -> None:
    assert limit_of({"proxy_cpu": 97, "generator_cpu": 60, "upstream_cpu": 10, "host_cpu": 180}, 2) == "proxy"
    assert limit_of({"proxy_cpu": 50, "generator_cpu": 120, "upstream_cpu": 20, "host_cpu": 195}, 2) == "generator"
    assert limit_of({"proxy_cpu": 20, "generator_cpu": 20, "upstream_cpu": 5, "host_cpu": 195}, 2) == "other load"
    assert limit_of({"proxy_cpu": 20, "generator_cpu": 20, "upstream_cpu": 5, "host_cpu": 60}, 2) == "none"


def _https(port: int, ca: Path, host: str, key: str | None) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw, server_hostname=host) as tls:
        extra = f"x-api-key: {key}\r\n" if key else ""
        tls.sendall(f"POST /v1/messages HTTP/1.1\r\nHost: {host}\r\n{extra}content-length: 2\r\n\r\n{{}}".encode())
        return int(tls.recv(4096).split(b" ", 2)[1])


def test_nginx_checks_the_model_key_and_denies_on_its_deny_listener(upstream: Upstream) -> None:
    n = upstream.nginx
    assert _https(n.https_port, upstream.ca_file, "api.anthropic.com", upstream.key) == 200
    assert _https(n.https_port, upstream.ca_file, "api.anthropic.com", "proxy-managed") == 401
    assert _https(n.https_port, upstream.ca_file, "api.anthropic.com", None) == 401
    assert _https(n.https_port, upstream.ca_file, "127.0.0.1", None) == 200  # the tunnelled model URL: no key
    with socket.create_connection(("127.0.0.1", n.deny_port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 403")
    assert upstream.key not in (n.workdir / "nginx.conf").read_text()  # the run dir's copy is redacted


def test_hey_through_gateway_intercept_gets_the_key_injected_and_its_cpu_counted(
    upstream: Upstream, load_supervisor: Supervisor, tmp_path: Path, gateway_ca_dir: Path
) -> None:
    endpoint = start_target(
        GATEWAY_INTERCEPT, tmp_path / "gi", load_supervisor, upstream, ("model",), 1024, 0, gateway_ca_dir
    )
    try:
        exe = capacity.require_hey()
        cell = run_cell(
            exe, endpoint, upstream, Cell(GATEWAY_INTERCEPT, "connect-1k", 2, 0), 0.4, tmp_path, load_supervisor
        )
        plain = run_cell(
            exe, endpoint, upstream, Cell(GATEWAY_INTERCEPT, "http-1k", 2, 0), 0.3, tmp_path, load_supervisor
        )
        hey_pids = [r.pid for r in load_supervisor.live() if r.name.startswith("hey")]
    finally:
        endpoint.stop()
    # nginx answers 401 without the real key: every response a 2xx means the gateway injected it.
    assert cell.error == "" and cell.responses > 0 and cell.non_2xx == 0, cell
    assert cell.rps and cell.rps > 0 and cell.p50_ms is not None and cell.p50_ms <= cell.p99_ms
    assert cell.generator_cpu_pct and cell.generator_cpu_pct > 0 and cell.proxy_cpu_pct and cell.proxy_cpu_pct > 0
    assert plain.error == "" and plain.responses > 0 and plain.non_2xx == 0
    assert (tmp_path / "gateway-intercept-connect-1k-c2-r0.csv").exists()
    assert hey_pids == [] and load_supervisor.live() == []
    assert not any(
        p.info["name"] == "hey" and p.info["ppid"] == psutil.Process().pid
        for p in psutil.process_iter(["name", "ppid"])
    )


def test_a_missing_tool_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(capacity, "hey_binary", lambda: None)
    with pytest.raises(EnvironmentMissing, match="apt-get install -y hey"):
        ProxyBenchConfig().validate()
    ProxyBenchConfig(capacity_s=0).validate()  # no capacity phase: no hey needed
    with pytest.raises(SystemExit) as exit_info:
        cli.bench({}, {"proxy": True, "sandboxes": "1"})
    assert exit_info.value.code == 2
    monkeypatch.setattr(nginx, "binary", lambda: None)
    with pytest.raises(EnvironmentMissing, match="apt-get install -y nginx-light"):
        ProxyBenchConfig(capacity_s=0).validate()
