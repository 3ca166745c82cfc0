"""Locust user classes modelling sandbox traffic. Loaded only by `python -m locust` processes.

    python -m locust -f harness/load/locustfile.py --headless --br-plan '<LoadPlan JSON>' \
        ModelUser DownloadUser BlockedUser

Every request is timed by harness.load.client.ProxyClient and reported to Locust (its CSVs and
stats history) *and* appended to a per-process samples CSV, from which the harness computes
exact percentiles (Locust's own are bucketed) over the measured window, after the warm-up.
"""

from __future__ import annotations

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
    _samples().write(f"{time.time():.6f},{name},{response_time:.3f},{response_length},{kind}\n")


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
        self.client = ProxyClient(p.proxy, p.ca_file, timeout_s=p.timeout_s)
        self.url = p.urls[self.kind]
        self.headers = p.headers.get(self.kind, {})

    def on_stop(self) -> None:
        self.client.close()

    def body(self) -> bytes:
        return b""

    def call(self, stream: bool = False) -> None:
        fire = self.environment.events.request.fire
        t0 = time.perf_counter()
        length, exc = 0, None
        try:
            response = self.client.request(self.method, self.url, self.body(), self.headers)
            length = response.length
            if response.status not in EXPECTED_STATUS[self.kind]:
                exc = RequestFailed(f"http_{response.status}")
            elif stream:
                fire(
                    request_type=self.method,
                    name=f"{self.kind}-ttfb",
                    response_time=response.ttfb_ms,
                    response_length=0,
                    exception=None,
                    context={},
                )
        except Exception as error:  # every failure is counted, by kind, never retried
            exc = error if isinstance(error, RequestFailed) else RequestFailed(failure_kind(error), str(error))
        fire(
            request_type=self.method,
            name=self.kind,
            response_time=(time.perf_counter() - t0) * 1000.0,
            response_length=length,
            exception=exc,
            context={},
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
