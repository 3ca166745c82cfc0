"""The in-guest driver of one Python client (requests, anthropic or openai): copied into the sandbox and started
once, so its library is imported once (the anthropic SDK's import alone takes ~40 s under TCG), then runs every
cell of that client, one at a time, for the rest of the run.

    python3 driver.py CLIENT DIR      (DIR holds the FIFOs `in` and `out`, made by the harness)

On start it writes DIR/status.json: {"ready": true, "import_s": ..., "version": ...}, or {"ready": false,
"error": ...} when the library is missing. Then for each JSON line read from DIR/in ({"destination":
"denied"|"allowed", "cell": ID, "timeout_s": S}) it writes one JSON line to DIR/out: {"exit": "ok" or the
exception's class name, "output": what the caller would see (the exception's text, or the answer), "seconds",
"timed_out"}. A cell still running at its timeout is answered as timed out; its thread is left to finish.

The clients use their defaults, except where the matrix names a setting: requests gets a urllib3 Retry
(clients.REQUESTS_RETRY). Runs on the guest's Python; imports nothing of the harness.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

ALLOWED_URL = "https://github.com/blastradius/toolchains/raw/{client}.txt"
DENIED_URL = "https://httpbin.org/toolchains/{cell}"
MODEL_MESSAGE = [{"role": "user", "content": "stand-in"}]


def build(client: str) -> tuple[Callable[[str], Any], Callable[[str], Any], str]:
    """The client's denied and allowed calls (each takes the cell id) and its library's version."""
    if client == "requests":
        import requests
        import urllib3
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        session = requests.Session()
        retry = Retry(total=5, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504))
        session.mount("https://", HTTPAdapter(max_retries=retry))

        def get(url: str) -> str:
            answer = session.get(url, timeout=30)
            answer.raise_for_status()
            return answer.text[:2000]

        version = f"requests {requests.__version__}, urllib3 {urllib3.__version__}"
        return (
            lambda cell: get(DENIED_URL.format(cell=cell)),
            lambda cell: get(ALLOWED_URL.format(client=client)),
            version,
        )
    if client == "anthropic":
        import anthropic

        sdk = anthropic.Anthropic(api_key="proxy-managed")  # the sentinel: the gateway injects the key

        def message(cell: str) -> str:
            reply = sdk.messages.create(model="stand-in", max_tokens=16, messages=MODEL_MESSAGE)
            return repr(reply)[:2000]

        return (lambda cell: repr(sdk.models.list())[:2000], message, f"anthropic {anthropic.__version__}")
    if client == "openai":
        import openai

        sdk = openai.OpenAI(api_key="proxy-managed")

        def chat(cell: str) -> str:
            reply = sdk.chat.completions.create(model="stand-in", messages=MODEL_MESSAGE)
            return repr(reply)[:2000]

        return (lambda cell: repr(sdk.models.list())[:2000], chat, f"openai {openai.__version__}")
    raise ValueError(f"unknown client {client}")


def run_cell(call: Callable[[str], Any], cell: str, timeout_s: float) -> dict[str, Any]:
    box: dict[str, Any] = {}

    def target() -> None:
        started = time.monotonic()
        try:
            box["output"] = str(call(cell))
            box["exit"] = "ok"
        except BaseException as exc:  # what the caller would catch and print
            box["exit"] = type(exc).__name__
            box["output"] = f"{type(exc).__name__}: {exc}"
        box["seconds"] = round(time.monotonic() - started, 3)

    started = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return {"exit": "timeout", "output": "", "seconds": round(time.monotonic() - started, 3), "timed_out": True}
    return {**box, "timed_out": False}


def write_atomic(path: str, data: dict[str, Any]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(path + ".tmp", path)


def main() -> None:
    client, workdir = sys.argv[1], sys.argv[2]
    started = time.monotonic()
    try:
        denied, allowed, version = build(client)
    except Exception as exc:
        write_atomic(os.path.join(workdir, "status.json"), {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    status = {"ready": True, "import_s": round(time.monotonic() - started, 2), "version": version}
    write_atomic(os.path.join(workdir, "status.json"), status)
    while True:
        with open(os.path.join(workdir, "in"), encoding="utf-8") as fh:
            line = fh.readline()
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("op") == "exit":
            return
        call = denied if request["destination"] == "denied" else allowed
        result = run_cell(call, request["cell"], float(request["timeout_s"]))
        with open(os.path.join(workdir, "out"), "w", encoding="utf-8") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
