"""One owner for configuration: the settings every run shares, and the one parser that turns flags,
environment variables, invoke.yaml and `--set key=value` into typed dataclass fields.

A config is a frozen dataclass: one field per setting with a type, a default (stated only there)
and a one-line docstring below it that doubles as the help text. `build(cls, values)` parses raw
values (strings from the command line or the environment, or typed values from YAML and tests) to
each field's type, refuses unknown names with the closest valid one, and runs the dataclass's
`validate()`, all before anything is written.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import itertools
import os
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from harness.errors import ConfigError
from harness.image.catalog import image_kind

T = TypeVar("T")

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
NONE_WORDS = ("", "none")
"""What an optional setting accepts as "not set" from the command line or the environment."""


RUN_FLAGS: dict[str, str] = {
    "out": "out",
    "force": "force",
    "backend": "backend",
    "accel": "accel",
    "mem_mib": "mem_mib",
    "boot_timeout": "boot_timeout_s",
    "boot_mode": "boot_mode",
    "memory_sharing": "memory_sharing",
    "image": "image",
}
"""The flags every run has (the bench and each scenario) -> RunConfig fields."""

BENCH_FLAGS: dict[str, str] = {
    **RUN_FLAGS,
    "sandboxes": "sandboxes",
    "concurrency": "concurrency",
    "warmup": "warmup",
    "repeat": "repeat",
    "policy": "policy",
    "guest_samples": "guest_samples",
    "proxy": "proxy",
}
"""`invoke bench` flags -> BenchConfig fields."""

PROXY_FLAGS: dict[str, str] = {
    "users": "users",
    "spawn_rate": "spawn_rate",
    "duration": "duration_s",
    "rounds": "rounds",
    "capacity": "capacity_s",
    "seed": "seed",
    "workers": "workers",
    "master_host": "master_host",
    "targets": "targets",
    "traffic": "traffic",
}
"""`invoke bench` flags -> ProxyBenchConfig fields (the Locust comparison's)."""

SCENARIO_FLAGS: dict[str, str] = RUN_FLAGS
"""`invoke scenario`'s common flags: exactly the run's."""

SCENARIO_ALIASES: dict[str, str] = {
    "sandboxes": "sandboxes",
    "leaky": "leaky",
    "file": "file",
    "agent": "agent",
    "fixer": "fixer",
    "kube_context": "kube_context",
    "max_sandboxes": "max_sandboxes",
    "duration": "duration_s",
    "egress": "egress",
}
"""`invoke scenario` flags that are `--set` under another name: `--fixer X` is `--set fixer=X`."""


PER_RUN_FLAGS = ("out", "force")
"""Flags that name one run and so are never read from invoke.yaml or the environment."""


def invoke_config() -> dict[str, dict[str, None]]:
    """The keys invoke's own config system reads for the tasks, all unset: `bench.<flag>` and
    `scenario.<flag>` from invoke.yaml (beside tasks.py), INVOKE_BENCH_<FLAG> and INVOKE_SCENARIO_<FLAG>
    from the environment. Invoke reads a variable only for a key declared here; defaults stay in the
    dataclasses."""
    bench = [flag for flag in (*BENCH_FLAGS, *PROXY_FLAGS) if flag not in PER_RUN_FLAGS]
    scenario = [flag for flag in SCENARIO_FLAGS if flag not in PER_RUN_FLAGS]
    return {"bench": dict.fromkeys(bench), "scenario": dict.fromkeys(scenario)}


def layered(
    section: str, table: Mapping[str, str], flags: Mapping[str, Any], configured: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Raw values by field for the flags in `table`: a flag given on the command line, else the value invoke's
    config holds for it (the environment over invoke.yaml), else nothing (the dataclass default). Also where
    each value came from, for error messages."""
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for flag, field_name in table.items():
        if flags.get(flag) is not None:
            values[field_name], labels[field_name] = flags[flag], flag_name(flag)
        elif configured.get(flag) is not None:
            values[field_name] = configured[flag]
            labels[field_name] = f"{section}.{flag} (invoke.yaml) or {env_var(section, flag)}"
    return values, labels


def check_configured(section: str, configured: Mapping[str, Any]) -> None:
    """An invoke.yaml key under `section` that is no setting is a ConfigError naming the closest one."""
    known = invoke_config()[section]
    for key in configured:
        if key not in known:
            raise ConfigError(
                f"invoke.yaml: {section}.{key} is not a setting of `invoke {section}`; "
                f"{did_you_mean(key, known)}its keys: {', '.join(known)}"
            )


def env_var(section: str, flag: str) -> str:
    """The environment variable invoke reads for `section.flag`: INVOKE_BENCH_MEM_MIB."""
    return f"INVOKE_{section}_{flag}".upper()


def flag_name(name: str) -> str:
    """`mem_mib` -> `--mem-mib`."""
    return "--" + name.replace("_", "-")


def parse_sets(items: Iterable[str]) -> dict[str, str]:
    """`--set key=value` items by key (`-` in a key read as `_`); a malformed one is a ConfigError."""
    values = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE, not {item!r}")
        values[key.strip().replace("-", "_")] = value
    return values


@dataclass(frozen=True)
class RunConfig:
    """What every run is parameterised by, the bench and each scenario alike."""

    backend: str = "qemu"
    """Sandbox backend: a module under harness/sandbox/ (MODULE:ARGUMENT where it takes one, such as
    command:stack.yaml), or several separated by commas, each run in turn into a sub-run of its own."""
    out: Path | None = None
    """Run directory; results/<run-id> when not given."""
    force: bool = False
    """Empty a run directory that holds an earlier run before this one writes into it."""
    accel: str = "auto"
    """auto (KVM only if a canary guest boots under it, else TCG), kvm or tcg."""
    mem_mib: int | None = None
    """Guest RAM per sandbox, in MiB; by default the image's own (busybox 128, debian 512)."""
    boot_timeout_s: float = 60.0
    """Seconds before a sandbox that is not ready counts as a failed boot."""
    boot_mode: str = "snapshot"
    """snapshot (restore each sandbox from a booted template) or cold (boot its kernel every time)."""
    memory_sharing: Literal["off", "file", "ksm", "file+ksm"] = "off"
    """off (each clone holds its own copy of the template's RAM), file (the template's RAM is a file every
    clone maps privately), ksm (Linux KSM on while the run lasts), or file+ksm."""
    image: Literal["busybox", "debian"] = "busybox"
    """Guest userland: busybox (a 1 MB initramfs) or debian (Debian 12 with curl, git, pip and the model SDKs,
    built once with debootstrap)."""

    def __post_init__(self) -> None:
        # Resolved at once, so every reader sees a number; the image decides because its clients do: the
        # model SDKs' imports thrash a 128 MiB debian guest's page cache (minutes under TCG, measured).
        if self.mem_mib is None:
            object.__setattr__(self, "mem_mib", image_kind(self.image).default_mem_mib)

    def validate(self) -> None:
        # Imported here, not at the top: tasks.py imports this module for the config keys on every
        # `invoke` call, and the backends pull in the QEMU code.
        from harness.sandbox import backend_features, backend_label, check_backend_argument
        from harness.sandbox.base import BOOT_MODES
        from harness.sandbox.qemu.accel import ACCELS

        if not self.backends or self.backend != ",".join(self.backends):
            raise ConfigError(
                f"--backend {self.backend!r}: give one backend, or several separated by commas "
                "with no space or empty name"
            )
        labels = [backend_label(name) for name in self.backends]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"--backend {self.backend} names a backend twice; name each once")
        for name in self.backends:
            check_backend_argument(name)
            floor = backend_features(name).min_mem_mib
            if floor is not None and self.mem_mib < floor:
                raise ConfigError(f"--mem-mib must be at least {floor} for the {name} backend, not {self.mem_mib}")
            if self.image not in backend_features(name).images:
                raise ConfigError(
                    f"--image {self.image}: the {name} backend cannot run that image; "
                    f"use one of {', '.join(backend_features(name).images)}"
                )
            if self.memory_sharing not in backend_features(name).memory_sharing:
                raise ConfigError(
                    f"--memory-sharing {self.memory_sharing}: the {name} backend shares no memory that way; "
                    f"use one of {', '.join(backend_features(name).memory_sharing)}"
                )
        if self.accel not in ACCELS:
            raise ConfigError(f"--accel must be one of {', '.join(ACCELS)}, not {self.accel!r}")
        if self.boot_mode not in BOOT_MODES:
            raise ConfigError(f"--boot-mode must be one of {', '.join(BOOT_MODES)}, not {self.boot_mode!r}")
        if self.boot_timeout_s <= 0:
            raise ConfigError("--boot-timeout must be positive")
        if self.out is not None:
            check_run_dir(self.out, self.force)

    @property
    def backends(self) -> list[str]:
        """The backends of --backend, in the order given."""
        return [name.strip() for name in self.backend.split(",") if name.strip()]


RUN_MARKER = "results.json"
"""A directory with this file in it is a blastradius run, which --force may empty."""


def check_run_dir(out: Path, force: bool) -> None:
    """--out must name a directory this run can have to itself: new, empty, or (with --force) an earlier
    run's. Never one that holds anything else, --force or not: emptying it could destroy a user's files."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a directory for the run")
    if out.is_dir() and any(out.iterdir()):
        if not (out / RUN_MARKER).exists():
            raise ConfigError(f"--out {out} holds files that are not a blastradius run; name a new directory")
        if not force:
            raise ConfigError(
                f"--out {out} holds an earlier run, whose files would mix with this one's; "
                "pass --force to empty it first, or name a new directory"
            )
    existing = next((parent for parent in (out, *out.parents) if parent.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {existing} is not writable; name a directory you can write to")


@dataclass(frozen=True)
class Setting:
    """One field of a config dataclass, as `--help-options` shows it."""

    name: str
    """Field name (the key of `--set key=value` and of invoke.yaml)."""
    kind: str
    """The type as a user reads it: int, float, bool, str, path, one of a|b|c, list."""
    default: Any
    """The built-in default."""
    help: str
    """The field's one-line docstring."""


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right below it), from the class source and its bases'."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if is_dataclass(k)]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def settings(cls: type) -> list[Setting]:
    """Every init field of config dataclass `cls`, with its type, default and help."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in fields(cls):
        if not f.init:
            continue
        default = (
            f.default
            if f.default is not MISSING
            else (f.default_factory() if f.default_factory is not MISSING else None)
        )
        out.append(Setting(f.name, kind_name(hints[f.name]), default, docs.get(f.name, "")))
    return out


def kind_name(annotation: Any) -> str:
    choices = _choices(annotation)
    if choices is not None:
        return "|".join(str(c) for c in choices)
    inner, optional = _unwrap_optional(annotation)
    names = {list: "list", Path: "path"}
    name = names.get(get_origin(inner) or inner, getattr(inner, "__name__", str(inner)))
    return f"{name} or none" if optional else name


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """ "did you mean 'x'? " when a choice is close to `word`, else ""."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def build(cls: type[T], values: Mapping[str, Any], labels: Mapping[str, str] | None = None, owner: str = "") -> T:
    """A validated `cls` from raw values by field name; a bad name or value is a ConfigError naming the fix.

    `labels` says where each value came from (e.g. "--set fixer", "--fixer") so the error points at it;
    `owner` names what the settings belong to (a scenario) in the unknown-name message.
    """
    labels = labels or {}
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    parsed: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in known:
            given = f" (given as {labels[key]})" if key in labels else ""
            raise ConfigError(
                f"{owner or 'this command'} has no option {key!r}{given}; {did_you_mean(key, known)}"
                f"its options: {', '.join(known) or 'none'}"
            )
        parsed[key] = parse_value(raw, hints[key], labels.get(key, key))
    instance = cls(**parsed)
    check = getattr(instance, "validate", None)
    if callable(check):
        check()
    return instance


def parse_value(raw: Any, annotation: Any, label: str) -> Any:
    """`raw` (a string, or an already typed value) as `annotation`: int, float, bool, str, Path,
    Literal[...], list[str], a dataclass, or any of these or None."""
    inner, optional = _unwrap_optional(annotation)
    if raw is None or (optional and isinstance(raw, str) and raw.strip().lower() in NONE_WORDS):
        if optional:
            return None
        raise ConfigError(f"{label} needs a value")
    choices = _choices(inner)
    if choices is not None:
        found = next((c for c in choices if c == raw or str(c) == str(raw)), None)
        if found is None:
            listed = ", ".join(str(c) for c in choices)
            hint = did_you_mean(str(raw), [str(c) for c in choices]).strip()
            raise ConfigError(f"{label} must be one of {listed}, not {raw!r}" + (f"; {hint}" if hint else ""))
        return found
    if inner is bool:
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise ConfigError(f"{label}: expected true or false, got {raw!r}")
    if inner is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        try:
            return int(str(raw).strip())
        except ValueError:
            raise ConfigError(f"{label}: expected a whole number, got {raw!r}") from None
    if inner is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        try:
            return float(str(raw).strip())
        except ValueError:
            raise ConfigError(f"{label}: expected a number, got {raw!r}") from None
    if inner is Path:
        if isinstance(raw, (str, Path)):
            return Path(raw).expanduser()
        raise ConfigError(f"{label}: expected a path, got {raw!r}")
    if get_origin(inner) is list:
        items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
        return [str(item).strip() for item in items if str(item).strip()]
    if inner is str:
        if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
            return str(raw)
        raise ConfigError(f"{label}: expected text, got {raw!r}")
    if isinstance(inner, type) and isinstance(raw, inner):
        return raw
    raise ConfigError(f"{label}: cannot take {raw!r}")


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`, else (annotation, False)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _choices(annotation: Any) -> tuple[Any, ...] | None:
    inner, _ = _unwrap_optional(annotation)
    return get_args(inner) if get_origin(inner) is Literal else None
