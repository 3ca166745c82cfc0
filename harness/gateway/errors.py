"""Set-up errors: a configuration the user must fix, reported as one line that names the fix.

The gateway's own entry point prints one and exits EXIT_SETUP (never a traceback); the harness,
which may not import this package's internals, catches SetupError the same way it catches its own.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

EXIT_SETUP = 2
"""The gateway process's exit status for a set-up error, as the harness's own for a bad flag."""


class SetupError(ValueError):
    """A policy, credential, override or CA file the user must fix; str() is the one line to show."""


def check_keys(data: Mapping[Any, Any], allowed: Iterable[str], where: str, error: type[SetupError]) -> None:
    """Refuse a key that is not one of `allowed`, naming the closest valid one.

    A misspelt key that is silently ignored changes nothing and says nothing: `port: [8080]`
    quietly meant :443, `deny_mod: reset` quietly kept the default."""
    valid = list(allowed)
    for key in data:
        if key in valid:
            continue
        close = difflib.get_close_matches(str(key), valid, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
        raise error(f"{where}: unknown key {key!r}; {hint}")
