"""Deployment manifests: parse the parts the pod runtime honours and compile them into podrt's spec files.

Only what payments-service exercises is modelled (containers, env, ports, memory limits, httpGet probes);
anything else in the YAML is kept by the file but ignored here, as a kubelet would ignore unknown fields
it does not act on.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import yaml

QUANTITY_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?$")
"""Kubernetes memory quantity: a number with an optional binary or decimal suffix."""

SUFFIX_BYTES = {
    None: 1,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "m": 10**-3,
}

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
"""DNS-1123 label: container and deployment names (also keeps podrt's shell variables safe)."""

SAFE_VALUE_RE = re.compile(r"^[A-Za-z0-9_./:@+,=-]*$")
"""Characters allowed in values that podrt reads unquoted (paths, image names)."""

PROBE_DEFAULTS = {"initialDelaySeconds": 0, "periodSeconds": 10, "timeoutSeconds": 1, "failureThreshold": 3}
"""The kubelet's defaults for a probe's timing fields."""

IMAGE_PROGRAMS = {"payments-service": "payments-service", "nginx": "nginx"}
"""Image repository basename -> program under podrt/images/ that stands in for it in the guest."""


class ManifestError(ValueError):
    """The manifests cannot be applied (bad YAML, missing Deployment, unsupported field value)."""


def parse_quantity(value: str | int | float) -> int:
    """Bytes of a memory quantity such as 64Mi, 1Gi, 128M or 1048576."""
    match = QUANTITY_RE.match(str(value).strip())
    if not match:
        raise ManifestError(f"not a memory quantity: {value!r}")
    return int(float(match.group(1)) * SUFFIX_BYTES[match.group(2)])


@dataclass(frozen=True)
class HttpProbe:
    port: int
    path: str = "/"
    initial_delay_s: int = 0
    period_s: int = 10
    timeout_s: int = 1
    failure_threshold: int = 3


@dataclass(frozen=True)
class Container:
    name: str
    image: str
    env: dict[str, str] = field(default_factory=dict)
    ports: tuple[int, ...] = ()
    memory_limit_bytes: int | None = None
    memory_request_bytes: int | None = None
    liveness: HttpProbe | None = None
    readiness: HttpProbe | None = None

    @property
    def program(self) -> str:
        """The podrt image program standing in for this image."""
        repo = self.image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
        if repo not in IMAGE_PROGRAMS:
            raise ManifestError(
                f"container {self.name}: image {self.image!r} has no stand-in program "
                f"(known: {', '.join(IMAGE_PROGRAMS)})"
            )
        return IMAGE_PROGRAMS[repo]


@dataclass(frozen=True)
class Deployment:
    name: str
    namespace: str
    replicas: int
    labels: dict[str, str]
    containers: tuple[Container, ...]
    raw: dict[str, Any]
    """The parsed document, as the kubernetes client's create call takes it."""

    def container(self, name: str) -> Container:
        for container in self.containers:
            if container.name == name:
                return container
        raise KeyError(name)


def _probe(spec: dict[str, Any] | None, where: str) -> HttpProbe | None:
    if not spec:
        return None
    http = spec.get("httpGet")
    if not isinstance(http, dict) or "port" not in http:
        raise ManifestError(f"{where}: only httpGet probes with a port are supported")
    port = http["port"]
    if not isinstance(port, int):
        raise ManifestError(f"{where}: named ports are not supported ({port!r})")
    timing = {**PROBE_DEFAULTS, **{k: v for k, v in spec.items() if k in PROBE_DEFAULTS}}
    path = str(http.get("path", "/"))
    if not SAFE_VALUE_RE.match(path):
        raise ManifestError(f"{where}: unsupported characters in path {path!r}")
    return HttpProbe(
        port=port,
        path=path,
        initial_delay_s=int(timing["initialDelaySeconds"]),
        period_s=int(timing["periodSeconds"]),
        timeout_s=int(timing["timeoutSeconds"]),
        failure_threshold=int(timing["failureThreshold"]),
    )


def _container(spec: dict[str, Any]) -> Container:
    name = str(spec.get("name", ""))
    if not NAME_RE.match(name):
        raise ManifestError(f"container name {name!r} is not a DNS-1123 label")
    image = str(spec.get("image", ""))
    if not image or not SAFE_VALUE_RE.match(image):
        raise ManifestError(f"container {name}: bad image {image!r}")
    resources = spec.get("resources") or {}
    limits = resources.get("limits") or {}
    requests = resources.get("requests") or {}
    env = {str(e["name"]): str(e.get("value", "")) for e in spec.get("env") or []}
    ports = tuple(int(p["containerPort"]) for p in spec.get("ports") or [])
    return Container(
        name=name,
        image=image,
        env=env,
        ports=ports,
        memory_limit_bytes=parse_quantity(limits["memory"]) if "memory" in limits else None,
        memory_request_bytes=parse_quantity(requests["memory"]) if "memory" in requests else None,
        liveness=_probe(spec.get("livenessProbe"), f"container {name} livenessProbe"),
        readiness=_probe(spec.get("readinessProbe"), f"container {name} readinessProbe"),
    )


def parse_deployment(text: str) -> Deployment:
    """The first Deployment in a (possibly multi-document) YAML text."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as exc:
        raise ManifestError(f"invalid YAML: {exc}") from exc
    for doc in documents:
        if isinstance(doc, dict) and doc.get("kind") == "Deployment":
            break
    else:
        raise ManifestError("no Deployment in the manifests")
    meta = doc.get("metadata") or {}
    name = str(meta.get("name", ""))
    if not NAME_RE.match(name):
        raise ManifestError(f"deployment name {name!r} is not a DNS-1123 label")
    template = (doc.get("spec") or {}).get("template") or {}
    containers = tuple(_container(c) for c in (template.get("spec") or {}).get("containers") or [])
    if not containers:
        raise ManifestError("the Deployment's pod template has no containers")
    return Deployment(
        name=name,
        namespace=str(meta.get("namespace", "default")),
        replicas=int((doc.get("spec") or {}).get("replicas", 1)),
        labels=dict((template.get("metadata") or {}).get("labels") or {}),
        containers=containers,
        raw=doc,
    )


@dataclass(frozen=True)
class Timing:
    """Overrides that shorten the manifest's probe timings for tests; None keeps the manifest's own."""

    probe_period_s: int | None = None
    probe_initial_delay_s: int | None = None


def _probe_conf(prefix: str, probe: HttpProbe | None, timing: Timing) -> list[str]:
    if probe is None:
        return [f"{prefix}_PORT="]
    period = timing.probe_period_s if timing.probe_period_s is not None else probe.period_s
    delay = timing.probe_initial_delay_s if timing.probe_initial_delay_s is not None else probe.initial_delay_s
    return [
        f"{prefix}_PORT={probe.port}",
        f"{prefix}_PATH={probe.path}",
        f"{prefix}_PERIOD={period}",
        f"{prefix}_TIMEOUT={probe.timeout_s}",
        f"{prefix}_FAILURES={probe.failure_threshold}",
        f"{prefix}_DELAY={delay}",
    ]


def compile_pod(deployment: Deployment, pod_name: str, timing: Timing = Timing()) -> dict[str, str]:
    """podrt's spec directory for one pod of `deployment`: file name -> content."""
    files = {"pod": f"POD={pod_name}\nN={len(deployment.containers)}\n"}
    for index, container in enumerate(deployment.containers):
        conf = [
            f"NAME={container.name}",
            f"IMAGE={container.program}",
            f"MEM_MAX={container.memory_limit_bytes if container.memory_limit_bytes is not None else 'max'}",
            *_probe_conf("LIVE", container.liveness, timing),
            *_probe_conf("READY", container.readiness, timing),
        ]
        files[f"c{index}.conf"] = "\n".join(conf) + "\n"
        files[f"c{index}.env"] = "".join(
            f"export {k}={shlex.quote(v)}\n"
            for k, v in container.env.items()
            if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k)
        )
    return files
