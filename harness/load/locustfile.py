"""Locust user classes modelling sandbox traffic. Loaded only by `python -m locust` processes.

    python -m locust -f harness/load/locustfile.py --headless --br-plan '<LoadPlan JSON>' \
        ModelUser PageUser DownloadUser BlockedUser

Every request is timed by harness.load.client.ProxyClient and reported to Locust (its CSVs and
stats history) *and* appended to a per-process samples CSV, from which the harness computes
exact percentiles (Locust's own are bucketed) over the measured window, after the warm-up.

An interleaved plan (LoadPlan.schedule) sends every user's requests to the target of the current window:
each user keeps one client (and so one kept-alive connection per origin) per target for the whole run, and
the target is written beside each sample.
"""

from __future__ import annotations

import bisect
import json
import os
import time
from pathlib import Path
from typing import IO, Any

from locust import User, between, constant_throughput, events, task
from locust.env import Environment

from harness.load.client import ProxyClient, RequestFailed, failure_kind
from harness.load.plan import EXPECTED_STATUS, LoadPlan

_state: dict[str, Any] = {"env": None, "plan": None, "samples": None}
NO_WAIT = between(0, 0)


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument("--br-plan", type=str, default="", help="blastradius LoadPlan as JSON", include_in_web_ui=False)


@events.init.add_listener
def _on_init(environment: Environment, **_kw: Any) -> None:
    _state["env"] = environment


def plan() -> LoadPlan:
    """The run's plan; on a worker it arrives with the first spawn message, hence lazily."""
    if _state["plan"] is None:
        options = _state["env"].parsed_options
        _state["plan"] = LoadPlan.from_json(options.br_plan)
    return _state["plan"]


def _samples() -> IO[str]:
    if _state["samples"] is None:
        path = Path(plan().samples_dir) / f"samples-{os.getpid()}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        _state["samples"] = open(path, "a", buffering=1024 * 1024)  # noqa: SIM115 - lives as long as the process
    return _state["samples"]


@events.request.add_listener
def _record(
    request_type: str,
    name: str,
    response_time: float,
    response_length: int,
    exception: BaseException | None = None,
    **_kw: Any,
) -> None:
    kind = "" if exception is None else failure_kind(exception)
    target = (_kw.get("context") or {}).get("target", "")
    _samples().write(f"{time.time():.6f},{name},{response_time:.3f},{response_length},{kind},{target}\n")


@events.test_stop.add_listener
def _flush(**_kw: Any) -> None:
    if _state["samples"] is not None:
        _state["samples"].flush()


@events.quitting.add_listener
def _close(**_kw: Any) -> None:
    if _state["samples"] is not None:
        _state["samples"].close()
        _state["samples"] = None


def _paced(user: User) -> float:
    rate = plan().user_rps
    return constant_throughput(rate)(user) if rate > 0 else NO_WAIT(user)


class _ProxyUser(User):
    """One agent-like client: one kept-alive connection per origin, one request at a time."""

    abstract = True
    kind = ""
    method = "GET"
    wait_time = _paced

    def on_start(self) -> None:
        p = plan()
        if p.schedule:
            self.clients = {
                name: ProxyClient(route.proxy, route.ca_file, timeout_s=p.timeout_s) for name, route in p.routes.items()
            }
            self.starts = [start for start, _end, _target in p.schedule]
        else:
            self.clients = {"": ProxyClient(p.proxy, p.ca_file, timeout_s=p.timeout_s)}

    def on_stop(self) -> None:
        for client in self.clients.values():
            client.close()

    def route(self) -> tuple[str, ProxyClient, str, dict[str, str]] | None:
        """(target, client, url, headers) of the window now open; outside every window, sleep until the
        next one opens (cooperatively, under gevent) and return None."""
        p = plan()
        if not p.schedule:
            return "", self.clients[""], p.urls[self.kind], p.headers.get(self.kind, {})
        now = time.time()
        index = bisect.bisect_right(self.starts, now) - 1
        if index < 0:
            time.sleep(self.starts[0] - now)
            return None
        _start, end, target = p.schedule[index]
        if now >= end:
            time.sleep(self.starts[index + 1] - now if index + 1 < len(self.starts) else 1.0)
            return None
        route = p.routes[target]
        return target, self.clients[target], route.urls[self.kind], route.headers.get(self.kind, {})

    def body(self) -> bytes:
        return b""

    def call(self, stream: bool = False) -> None:
        route = self.route()
        if route is None:
            return
        target, client, url, headers = route
        fire = self.environment.events.request.fire
        # Per target in Locust's own CSVs too: its stats are keyed by (type, name).
        request_type = f"{self.method} {target}" if target else self.method
        context = {"target": target}
        t0 = time.perf_counter()
        length, exc = 0, None
        try:
            response = client.request(self.method, url, self.body(), headers)
            length = response.length
            if response.status not in EXPECTED_STATUS[self.kind]:
                exc = RequestFailed(f"http_{response.status}")
            elif stream:
                fire(
                    request_type=request_type,
                    name=f"{self.kind}-ttfb",
                    response_time=response.ttfb_ms,
                    response_length=0,
                    exception=None,
                    context=context,
                )
        except Exception as error:  # every failure is counted, by kind, never retried
            exc = error if isinstance(error, RequestFailed) else RequestFailed(failure_kind(error), str(error))
        fire(
            request_type=request_type,
            name=self.kind,
            response_time=(time.perf_counter() - t0) * 1000.0,
            response_length=length,
            exception=exc,
            context=context,
        )


class ModelUser(_ProxyUser):
    """POSTs a JSON prompt to the stand-in model API over HTTPS, with the sentinel, not the key."""

    kind = "model"
    method = "POST"
    weight = 3

    def on_start(self) -> None:
        super().on_start()
        filler = "x" * max(0, plan().model_body_bytes - 120)
        self._body = json.dumps(
            {"model": "bench", "max_tokens": 16, "messages": [{"role": "user", "content": filler}]}
        ).encode()

    def body(self) -> bytes:
        return self._body

    @task
    def message(self) -> None:
        self.call(stream=plan().stream)


class PageUser(_ProxyUser):
    """GETs a 1 KiB body over plain http: the proxy's per-request cost, with little data to move."""

    kind = "page"
    weight = 1

    @task
    def page(self) -> None:
        self.call()


class DownloadUser(_ProxyUser):
    """GETs a package-sized body over plain http: bandwidth through the proxy."""

    kind = "download"
    weight = 1

    @task
    def download(self) -> None:
        self.call()


class BlockedUser(_ProxyUser):
    """Asks for a host every proxy denies: the latency of the deny path."""

    kind = "blocked"
    weight = 1

    @task
    def blocked(self) -> None:
        self.call()
