"""Invoke glue for tasks.py: a positional parameter that takes every remaining word (`invoke compare A B C`).

pyinvoke has no variadic positional (pyinvoke/invoke#760): its parser fills a positional while the task's
context reports it missing (`value is None`), and checks once more at the end of the command line that none
is. A `Rest` argument answers "missing" only while the parser is handling a word that is not a flag, so it
takes every such word, and answers with what it took everywhere else (the end-of-line check, the task call).

A task opts in with `@task(klass=VariadicTask, positional=["runs"], iterable=["runs"])`: a parameter that is
both positional and iterable becomes a `Rest`. Such a task must be the last one on its command line (every
later word is one of its values), and its flags may come before, between or after the values. Written against
the pinned invoke (pyproject.toml); tests/test_compare.py runs it through the real `invoke` program.
"""

from __future__ import annotations

import sys
from types import CodeType, FrameType
from typing import Any

from invoke.parser import Argument
from invoke.parser.parser import ParseMachine
from invoke.tasks import Task

_HANDLE: CodeType = ParseMachine.handle.__code__
"""The parser's per-word step: it asks whether a positional is missing before it reads the word as a task name."""
_COMPLETE: CodeType = ParseMachine.complete_context.__code__
"""The parser's end-of-task check: a positional still missing there is an error."""


def _handling_a_value() -> bool:
    """True while invoke's parser handles a word that is not a flag (so it may be a value of ours)."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _COMPLETE:
            return False
        if frame.f_code is _HANDLE:
            return not str(frame.f_locals.get("token", "")).startswith("-")
        frame = frame.f_back
    return False


class Rest(Argument):
    """A positional list argument that takes every remaining word of the command line that is not a flag."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "kind": list, "positional": True, "default": []})

    @property
    def value(self) -> Any:
        return None if _handling_a_value() else list(self._value)

    @value.setter
    def value(self, arg: str) -> None:
        self.set_value(arg)

    def set_value(self, value: Any, cast: bool = True) -> None:
        self.raw_value = value
        self._value = [*self._value, value]

    @property
    def got_value(self) -> bool:
        return bool(self._value)


class VariadicTask(Task):
    """A task whose positional and iterable parameter (there may be one) is a `Rest`."""

    def get_arguments(self, ignore_unknown_help: bool | None = None) -> list[Argument]:
        arguments = super().get_arguments(ignore_unknown_help)
        rest = [a for a in arguments if a.positional and a.kind is list]
        if len(rest) > 1:
            raise ValueError(f"task {self.name}: only one parameter can take the remaining words")
        return [
            Rest(names=a.names, help=a.help, attr_name=a.attr_name) if a in rest else a
            for a in arguments  # positionals come first, as invoke orders them
        ]
