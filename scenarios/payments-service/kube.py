"""The `--kube-context` target: the same manifests on a real cluster, through the kubernetes Python client.

It creates (or replaces) the Deployment from the YAML, lists or watches its pods and reads the same
vocabulary podrt reports: lastState.terminated.reason (OOMKilled), restartCount, readiness, events.
Exercised here only against recorded API responses (scenarios/payments-service/recorded/): no cluster
can run on our machines, so this path has not been run against a live cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from .manifests import parse_deployment

HTTP_CONFLICT = 409
HTTP_NOT_FOUND = 404

REQUEST_TIMEOUT_S = 15
"""Client-side timeout per API call; a wedged API server must not hang the scenario."""


def pod_status(pod: Any) -> dict[str, Any]:
    """A V1Pod in podrt's vocabulary: {"pod": {...}, "containers": [...]}."""
    statuses = {s.name: s for s in (pod.status.container_statuses or [])}
    containers = []
    for spec in pod.spec.containers:
        s = statuses.get(spec.name)
        state, reason = "waiting", "ContainerCreating"
        last_reason = last_exit = None
        if s is not None:
            if s.state and s.state.running:
                state, reason = "running", None
            elif s.state and s.state.terminated:
                state, reason = "terminated", s.state.terminated.reason
            elif s.state and s.state.waiting:
                reason = s.state.waiting.reason
            if s.last_state and s.last_state.terminated:
                last_reason, last_exit = s.last_state.terminated.reason, s.last_state.terminated.exit_code
        containers.append(
            {
                "name": spec.name,
                "state": state,
                "reason": reason,
                "ready": bool(s and s.ready),
                "restarts": int(s.restart_count) if s else 0,
                "last_reason": last_reason,
                "last_exit": last_exit,
            }
        )
    ready = sum(c["ready"] for c in containers)
    status = next((c["reason"] for c in containers if c["reason"]), pod.status.phase)
    return {
        "pod": {
            "name": pod.metadata.name,
            "phase": pod.status.phase,
            "status": status,
            "ready": f"{ready}/{len(containers)}",
            "ready_containers": ready,
            "total_containers": len(containers),
            "restarts": sum(c["restarts"] for c in containers),
            "created": pod.metadata.creation_timestamp.isoformat() if pod.metadata.creation_timestamp else None,
        },
        "containers": containers,
    }


class KubeCluster:
    """One Deployment on a real cluster."""

    def __init__(self, api_client: Any, namespace: str = "default") -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.deployment: Any = None
        self.apply_errors: list[str] = []

    @classmethod
    def from_context(cls, context: str, config_file: str | None = None) -> KubeCluster:
        """A client for kubeconfig context `context` (KUBECONFIG or ~/.kube/config unless config_file)."""
        return cls(config.new_client_from_config(config_file=config_file, context=context))

    def apply(self, text: str) -> str:
        """Create the Deployment, or replace it when it exists (what `kubectl apply` amounts to here)."""
        deployment = parse_deployment(text)
        self.deployment = deployment
        self.namespace = deployment.namespace
        try:
            self.apps.create_namespaced_deployment(self.namespace, deployment.raw, _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as exc:
            if exc.status != HTTP_CONFLICT:
                raise
            self.apps.replace_namespaced_deployment(
                deployment.name, self.namespace, deployment.raw, _request_timeout=REQUEST_TIMEOUT_S
            )
        return deployment.name

    def _selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.deployment.labels.items()))

    def pods(self) -> list[dict[str, Any]]:
        """The Deployment's live pods, newest first."""
        listing = self.core.list_namespaced_pod(
            self.namespace, label_selector=self._selector(), _request_timeout=REQUEST_TIMEOUT_S
        )
        live = [p for p in listing.items if p.metadata.deletion_timestamp is None]
        live.sort(key=lambda p: p.metadata.creation_timestamp, reverse=True)
        return [pod_status(p) for p in live]

    def watch_pods(self, timeout_s: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """(ADDED|MODIFIED|DELETED, status) as the API server streams them, for up to timeout_s."""
        stream = watch.Watch().stream(
            self.core.list_namespaced_pod, self.namespace, label_selector=self._selector(), timeout_seconds=timeout_s
        )
        for event in stream:
            yield event["type"], pod_status(event["object"])

    def events(self, pod_name: str) -> list[dict[str, Any]]:
        listing = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={pod_name}", _request_timeout=REQUEST_TIMEOUT_S
        )
        return [
            {
                "t_ms": None,
                "type": e.type,
                "reason": e.reason,
                "object": f"pod/{pod_name}",
                "message": e.message,
                "count": e.count,
            }
            for e in listing.items
        ]

    def observe(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        pods = self.pods()
        if not pods:
            return None, []
        return pods[0], self.events(pods[0]["pod"]["name"])

    def delete(self) -> None:
        try:
            self.apps.delete_namespaced_deployment(
                self.deployment.name, self.namespace, _request_timeout=REQUEST_TIMEOUT_S
            )
        except ApiException as exc:
            if exc.status != HTTP_NOT_FOUND:
                raise


class KubeTarget:
    """KubeCluster with the manifests kept as local files (run_dir/manifests), synced on change."""

    def __init__(self, cluster: KubeCluster, manifests_dir: Path) -> None:
        self.cluster = cluster
        self.dir = manifests_dir
        self.applied: str | None = None
        self.apply_errors = cluster.apply_errors

    def manifests(self) -> dict[str, str]:
        return {p.name: p.read_text() for p in sorted(self.dir.glob("*.y*ml"))}

    def write(self, name: str, text: str) -> None:
        (self.dir / name).write_text(text)

    def sync(self) -> str | None:
        text = "\n---\n".join(self.manifests().values())
        if text == self.applied:
            return None
        self.applied = text
        try:
            return self.cluster.apply(text)
        except ValueError as exc:
            self.apply_errors.append(str(exc))
            return None

    def observe(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        return self.cluster.observe()
