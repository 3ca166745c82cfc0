"""The embedded target: podrt inside one of our guests, driven from the host.

The host plays API server and Deployment controller: it compiles the manifests in the guest's
/work/payments-service into podrt spec files and rolls out a new pod whenever they change, the way a
GitOps controller syncs a repo. podrt (in the guest) plays kubelet.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .manifests import compile_pod, parse_deployment

PODRT_DIR = Path(__file__).resolve().parent / "podrt"
"""podrt.sh, shim.sh, the kubectl shim and the image programs, pushed into the guest at setup."""

GUEST_ROOT = "/run/podrt"
"""podrt's state: spec.<gen>/, gen, status, events, logs/."""

GUEST_PROGRAMS = "/opt/podrt"
"""Where the image programs live in the guest (podrt's shim execs /opt/podrt/images/<program>.sh)."""

GUEST_MANIFESTS = "/work/payments-service"
"""The desired state an agent edits."""

EXEC_TIMEOUT_S = 20.0
"""One status read or spec push; probes inside the guest never block the agent this long."""


class SandboxLike(Protocol):
    def exec(self, command: str, timeout: float = 30.0, stdin: bytes = b"") -> Any: ...


@dataclass(frozen=True)
class RuntimeSettings:
    """podrt's own timing: the kubelet's defaults, shortened by tests."""

    tick_s: int = 1
    backoff_base_s: int = 10
    """Kubelet's first CrashLoopBackOff delay; doubles per restart."""
    backoff_max_s: int = 300
    """Kubelet's cap on the back-off."""


def parse_status(text: str) -> dict[str, Any] | None:
    """podrt's status file -> {"pod": {...}, "containers": [{...}]} with ints where it can."""
    pod: dict[str, Any] | None = None
    containers: list[dict[str, Any]] = []
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        fields: dict[str, Any] = {}
        for item in rest.split():
            key, _, value = item.partition("=")
            fields[key] = int(value) if re.fullmatch(r"-?[0-9]+", value) else (value or None)
        if kind == "pod":
            pod = fields
        elif kind == "container":
            fields["ready"] = bool(fields.get("ready"))
            containers.append(fields)
    if pod is None:
        return None
    ready, _, total = str(pod["ready"]).partition("/")
    pod.update(ready_containers=int(ready), total_containers=int(total))
    return {"pod": pod, "containers": containers}


def parse_events(text: str) -> list[dict[str, Any]]:
    """podrt's events file: one `ms|type|reason|object|message` per line."""
    events = []
    for line in text.splitlines():
        parts = line.split("|", 4)
        if len(parts) == 5 and parts[0].isdigit():
            events.append(
                {"t_ms": int(parts[0]), "type": parts[1], "reason": parts[2], "object": parts[3], "message": parts[4]}
            )
    return events


class EmbeddedCluster:
    """One Deployment, one replica, run by podrt in `sandbox`."""

    def __init__(self, sandbox: SandboxLike, settings: RuntimeSettings, timing: Any, deployment_name: str) -> None:
        self.sandbox = sandbox
        self.settings = settings
        self.timing = timing
        self.deployment_name = deployment_name
        self.generation = 0
        self.applied_digest: str | None = None
        self.apply_errors: list[str] = []

    def _exec(self, command: str, stdin: bytes = b"", timeout: float = EXEC_TIMEOUT_S) -> str:
        result = self.sandbox.exec(command, timeout=timeout, stdin=stdin)
        if result.rc != 0:
            raise RuntimeError(f"guest command failed ({result.rc}): {command[:80]}: {result.stderr[-400:]!r}")
        return result.text

    def push(self, guest_path: str, data: bytes, mode: str = "644") -> None:
        self._exec(
            f"mkdir -p {shlex.quote(str(Path(guest_path).parent))} && cat > {shlex.quote(guest_path)} "
            f"&& chmod {mode} {shlex.quote(guest_path)}",
            stdin=data,
        )

    def install(self, manifests: dict[str, str]) -> None:
        """Push podrt, the kubectl shim and the manifests; nothing runs until `start`."""
        for script in ("podrt.sh", "shim.sh"):
            self.push(f"{GUEST_ROOT}/{script}", (PODRT_DIR / script).read_bytes(), "755")
        for program in sorted((PODRT_DIR / "images").glob("*.sh")):
            self.push(f"{GUEST_PROGRAMS}/images/{program.name}", program.read_bytes(), "755")
        self.push("/bin/kubectl", (PODRT_DIR / "kubectl").read_bytes(), "755")
        self.push(
            f"{GUEST_ROOT}/settings",
            (
                f"TICK_S={self.settings.tick_s}\nBACKOFF_BASE_S={self.settings.backoff_base_s}\n"
                f"BACKOFF_MAX_S={self.settings.backoff_max_s}\n"
            ).encode(),
        )
        for name, text in manifests.items():
            self.push(f"{GUEST_MANIFESTS}/{name}", text.encode())

    def manifests(self) -> dict[str, str]:
        """The manifest files as they are now in the guest."""
        listing = self._exec(f"ls {GUEST_MANIFESTS}").split()
        return {
            name: self._exec(f"cat {GUEST_MANIFESTS}/{shlex.quote(name)}")
            for name in listing
            if name.endswith((".yaml", ".yml"))
        }

    def write(self, name: str, text: str) -> None:
        """Save a manifest in the guest and `kubectl apply` it, as an agent would."""
        path = f"{GUEST_MANIFESTS}/{name}"
        self.push(path, text.encode())
        self._exec(f"kubectl apply -f {shlex.quote(path)}")

    def apply(self, text: str) -> str:
        """Compile the manifests into a new generation and flip podrt to it; returns the new pod's name."""
        deployment = parse_deployment(text)
        self.generation += 1
        # ReplicaSet-style name: a hash of the template plus a random suffix, like the real controller's.
        template_hash = hashlib.sha256(text.encode()).hexdigest()[:10]
        pod = f"{deployment.name}-{template_hash}-{secrets.token_hex(3)[:5]}"
        files = compile_pod(deployment, pod, self.timing)
        spec_dir = f"{GUEST_ROOT}/spec.{self.generation}"
        for name, content in files.items():
            self.push(f"{spec_dir}/{name}", content.encode())
        self._exec(f"echo {self.generation} > {GUEST_ROOT}/gen.tmp && mv {GUEST_ROOT}/gen.tmp {GUEST_ROOT}/gen")
        return pod

    def start(self) -> None:
        """Start podrt detached (setsid) so it outlives the agent connection that launched it."""
        self._exec(f"setsid sh {GUEST_ROOT}/podrt.sh </dev/null >{GUEST_ROOT}/podrt.log 2>&1 &")

    def sync(self) -> str | None:
        """Roll out the guest's manifests if they changed since the last apply; the new pod's name or None."""
        files = self.manifests()
        text = "\n---\n".join(files[name] for name in sorted(files))
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self.applied_digest:
            return None
        self.applied_digest = digest
        try:
            return self.apply(text)
        except ValueError as exc:  # ManifestError: keep the old pod running, as `kubectl apply` would reject it
            self.apply_errors.append(str(exc))
            self._exec(
                f"echo \"$(awk '{{print $1*1000}}' /proc/uptime | cut -d. -f1)|Warning|FailedApply|"
                f'deployment/{self.deployment_name}|{shlex.quote(str(exc))[:200]}" >> {GUEST_ROOT}/events'
            )
            return None

    def observe(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """(status, all events) in one guest round trip."""
        # Either file may not exist yet (podrt starts writing them after boot): that is "nothing yet", not an error.
        out = self._exec(f"cat {GUEST_ROOT}/status 2>/dev/null; echo '%%%'; cat {GUEST_ROOT}/events 2>/dev/null; true")
        status_text, _, events_text = out.partition("%%%\n")
        return parse_status(status_text), parse_events(events_text)

    def guest_uptime_ms(self) -> int:
        return int(float(self._exec("cut -d' ' -f1 /proc/uptime").strip()) * 1000)

    def wait_for_status(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status, _ = self.observe()
            if status is not None:
                return status
            time.sleep(0.5)
        raise RuntimeError(
            f"podrt wrote no status within {timeout_s:g} s: "
            f"{self.sandbox.exec(f'cat {GUEST_ROOT}/podrt.log').text[-800:]}"
        )
