"""A minimal synchronous QMP client: enough to snapshot a guest into a file, restore one from it, and
time the restore by QEMU's own events."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

QMP_TIMEOUT_S = 10.0

CONNECT_POLL_S = 0.005
"""Pause between connection attempts while QEMU sets up its socket; a clone's restore waits on it."""


class QmpError(RuntimeError):
    """QEMU answered a command with an error."""


class Qmp:
    """One QMP session over a unix socket; each command waits for its reply, events are kept for wait_event."""

    def __init__(self, path: Path, timeout_s: float = QMP_TIMEOUT_S) -> None:
        self.events: list[dict[str, Any]] = []
        """Events read so far and not yet taken by wait_event, oldest first."""
        self._timeout_s = timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._sock = socket.socket(socket.AF_UNIX)
                self._sock.settimeout(timeout_s)
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self._sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(CONNECT_POLL_S)
        self._file = self._sock.makefile("rw")
        json.loads(self._file.readline())  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._file.write(json.dumps(message) + "\n")
        self._file.flush()
        while True:
            reply = json.loads(self._file.readline())
            if "error" in reply:
                raise QmpError(f"{command}: {reply['error'].get('desc')}")
            if "return" in reply:
                return reply["return"]
            if "event" in reply:
                self.events.append(reply)

    def wait_event(self, names: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
        """The first event named in `names` (one already read, or the next to come); raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while True:
            for index, event in enumerate(self.events):
                if event["event"] in names:
                    return self.events.pop(index)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no QMP event {'/'.join(names)} within {timeout_s:g} s")
            self._sock.settimeout(left)
            try:
                line = self._file.readline()
            finally:
                self._sock.settimeout(self._timeout_s)
            if not line:
                raise ConnectionError("QEMU closed its QMP socket")
            reply = json.loads(line)
            if "event" in reply:
                self.events.append(reply)

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
