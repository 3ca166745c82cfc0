"""A minimal synchronous QMP client: enough to take a snapshot (migrate to a file) of a guest."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

QMP_TIMEOUT_S = 10.0


class QmpError(RuntimeError):
    """QEMU answered a command with an error."""


class Qmp:
    """One QMP session over a unix socket; events are skipped, each command waits for its reply."""

    def __init__(self, path: Path, timeout_s: float = QMP_TIMEOUT_S) -> None:
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
                time.sleep(0.02)
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

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
