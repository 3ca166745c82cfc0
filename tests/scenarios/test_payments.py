"""payments-service: manifests, grader, the kubernetes path (recorded responses), podrt on a real guest."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.image import GuestImage
from harness.sandbox.base import SandboxSpec
from harness.sandbox.qemu.vm import Microvm
from harness.scenario.loader import load_scenario_module
from harness.scenario.runner import run_scenario
from harness.supervisor import Supervisor

mod = load_scenario_module("payments-service")
manifests, grader, embedded = mod.manifests, mod.grader, mod.embedded
BROKEN = (mod.HERE / "deployment.yaml").read_text()
RECORDED = mod.HERE / "recorded"
MIB = 1024 * 1024

FAST: dict[str, Any] = {
    "probe_period_s": 1,
    "probe_initial_delay_s": 1,
    "backoff_base_s": 1,
    "backoff_max_s": 4,
    "broken_window_s": 25,
    "soak_s": 5,
    "ready_timeout_s": 15,
    "observe_period_s": 1,
    "accel": "tcg",
}
"""Timings that keep a whole embedded run near 30 s under TCG."""


def fixed_text(memory: bool = True, probe: bool = True) -> str:
    status = {"containers": [{"name": "payments", "last_reason": "OOMKilled"}]}
    events = [{"reason": "Unhealthy", "message": "Liveness probe failed: connection refused"}]
    return mod.reference_fix(BROKEN, status, events, fix_memory=memory, fix_probe=probe)[0]


# -- manifests ---------------------------------------------------------------------------------------------------
def test_quantities() -> None:
    assert manifests.parse_quantity("64Mi") == 64 * MIB
    assert manifests.parse_quantity("1Gi") == 1024 * MIB
    assert manifests.parse_quantity("128M") == 128_000_000
    assert manifests.parse_quantity(1048576) == MIB
    with pytest.raises(manifests.ManifestError):
        manifests.parse_quantity("lots")


def test_broken_manifest_parses_with_both_planted_bugs() -> None:
    d = manifests.parse_deployment(BROKEN)
    assert (d.name, d.replicas, d.labels) == ("payments-service", 1, {"app": "payments-service"})
    payments, nginx = d.container("payments"), d.container("nginx")
    assert payments.memory_limit_bytes == 64 * MIB and payments.env["HEAP_MIB"] == "150"
    assert payments.readiness and payments.readiness.port == 8081
    assert nginx.ports == (80,) and nginx.liveness is not None
    assert (nginx.liveness.port, nginx.liveness.period_s, nginx.liveness.failure_threshold) == (8080, 10, 3)
    assert {p.what for p in grader.static_problems(d)} == {"memory-limit", "liveness-probe"}


def test_compile_pod_and_timing_override() -> None:
    files = manifests.compile_pod(manifests.parse_deployment(BROKEN), "p-1", manifests.Timing(probe_period_s=1))
    assert files["pod"] == "POD=p-1\nN=2\n"
    assert "MEM_MAX=67108864" in files["c0.conf"] and "IMAGE=payments-service" in files["c0.conf"]
    assert "LIVE_PORT=8080" in files["c1.conf"] and "LIVE_PERIOD=1" in files["c1.conf"]
    assert "export HEAP_MIB=150" in files["c0.env"]


@pytest.mark.parametrize(
    "bad",
    [
        "kind: Deployment\nmetadata: {name: x}\nspec: {template: {spec: {}}}",
        "{not yaml",
        "kind: Service\nmetadata: {name: x}",
        BROKEN.replace("port: 8080", "port: http"),
    ],
)
def test_manifest_errors(bad: str) -> None:
    with pytest.raises(manifests.ManifestError):
        manifests.parse_deployment(bad)


def test_reference_fix_diff() -> None:
    diff = mod.unified_diff({"deployment.yaml": BROKEN}, {"deployment.yaml": fixed_text()})
    assert "-              memory: 64Mi" in diff and "+              memory: 192Mi" in diff
    assert "-              port: 8080" in diff and "+              port: 80" in diff
    assert grader.static_problems(manifests.parse_deployment(fixed_text())) == []


# -- grader ------------------------------------------------------------------------------------------------------
def status(ready: int, restarts: int = 0, last: str | None = None) -> dict[str, Any]:
    return {
        "pod": {"name": "p2", "ready_containers": ready, "total_containers": 2, "restarts": restarts},
        "containers": [
            {"name": "payments", "restarts": restarts, "last_reason": last},
            {"name": "nginx", "restarts": 0, "last_reason": None},
        ],
    }


def test_grade_pass() -> None:
    statuses = [(0.0, status(0)), (1.0, status(2)), (5.0, status(2)), (11.0, status(2))]
    g = grader.grade(statuses, [], manifests.parse_deployment(fixed_text()), soak_required_s=10)
    assert g.passed and g.verdict == "pass" and g.soak_s == 10 and g.ready_after_s == 1.0


def test_grade_partial_memory_only_names_the_probe() -> None:
    events = [{"reason": "Unhealthy", "message": 'Liveness probe failed: Get "http://127.0.0.1:8080/"'}]
    statuses = [(0.0, status(2)), (4.0, status(2)), (6.0, status(1, 1))]
    g = grader.grade(statuses, events, manifests.parse_deployment(fixed_text(probe=False)), soak_required_s=10)
    assert not g.passed and g.verdict == "partial-fix" and g.fixed == ["memory-limit"]
    kinds = {p.what for p in g.still_broken}
    assert "liveness-probe" in kinds and "memory-limit" not in kinds
    assert any(":8080" in p.detail and ":80" in p.detail for p in g.still_broken)


def test_grade_partial_probe_only_names_memory() -> None:
    statuses = [(0.0, status(1)), (3.0, status(0, 1, "OOMKilled"))]
    g = grader.grade(statuses, [], manifests.parse_deployment(fixed_text(memory=False)), soak_required_s=10)
    assert g.verdict == "partial-fix" and g.fixed == ["liveness-probe"]
    assert {"memory-limit", "not-ready"} <= {p.what for p in g.still_broken}


def test_grade_fail_when_nothing_changed() -> None:
    g = grader.grade([(0.0, status(1, 2, "OOMKilled"))], [], manifests.parse_deployment(BROKEN), 10, changed=False)
    assert g.verdict == "fail" and not g.fixed
    assert {"manifests-unchanged", "memory-limit", "liveness-probe"} <= {p.what for p in g.still_broken}


# -- kubernetes path, against recorded API responses ---------------------------------------------------------------
class RecordedApi:
    """An HTTP server answering the kubernetes client from RECORDED: broken pods until the Deployment is
    replaced, fixed pods after. Records every request it got."""

    def __init__(self) -> None:
        self.fixed = False
        self.created = False
        self.requests: list[tuple[str, str]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> dict[str, Any]:
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

            def do_GET(self) -> None:
                api.requests.append(("GET", self.path))
                path = self.path.split("?")[0]
                state = "fixed" if api.fixed else "broken"
                if path == "/api/v1/namespaces/default/pods" and "watch=true" in self.path:
                    self._reply(200, (RECORDED / "watch-pods.jsonl").read_bytes())
                elif path == "/api/v1/namespaces/default/pods":
                    self._reply(200, (RECORDED / f"pods-{state}.json").read_bytes())
                elif path == "/api/v1/namespaces/default/events":
                    self._reply(200, (RECORDED / f"events-{state}.json").read_bytes())
                else:
                    self._reply(404, b'{"kind":"Status","status":"Failure","reason":"NotFound","code":404}')

            def do_POST(self) -> None:
                api.requests.append(("POST", self.path))
                body = self._body()
                if api.created:
                    self._reply(
                        409,
                        json.dumps(
                            {
                                "kind": "Status",
                                "apiVersion": "v1",
                                "status": "Failure",
                                "reason": "AlreadyExists",
                                "code": 409,
                                "message": 'deployments.apps "payments-service" already exists',
                            }
                        ).encode(),
                    )
                    return
                api.created = True
                body["metadata"].update(uid="0b9e7f0e", resourceVersion="48190", generation=1)
                self._reply(201, json.dumps(body).encode())

            def do_PUT(self) -> None:
                api.requests.append(("PUT", self.path))
                body = self._body()
                api.fixed = True
                body["metadata"].update(uid="0b9e7f0e", resourceVersion="49100", generation=2)
                self._reply(200, json.dumps(body).encode())

            def do_DELETE(self) -> None:
                api.requests.append(("DELETE", self.path))
                self._reply(200, b'{"kind":"Status","apiVersion":"v1","status":"Success","code":200}')

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "recorded",
                    "clusters": [
                        {"name": "recorded", "cluster": {"server": f"http://127.0.0.1:{self.server.server_port}"}}
                    ],
                    "users": [{"name": "u", "user": {"token": "recorded-token"}}],
                    "contexts": [{"name": "recorded", "context": {"cluster": "recorded", "user": "u"}}],
                }
            )
        )
        return path


@pytest.fixture
def recorded(tmp_path: Path) -> Iterator[tuple[RecordedApi, Path]]:
    api = RecordedApi()
    yield api, api.kubeconfig(tmp_path / "kubeconfig")
    api.server.shutdown()


def test_kube_client_reads_oomkilled_restarts_and_readiness(recorded: tuple[RecordedApi, Path]) -> None:
    api, kubeconfig = recorded
    kube = load_scenario_module("payments-service", "kube")
    cluster = kube.KubeCluster.from_context("recorded", str(kubeconfig))
    assert cluster.apply(BROKEN) == "payments-service"
    status, events = cluster.observe()
    assert status["pod"]["ready"] == "1/2" and status["pod"]["restarts"] == 7
    payments = status["containers"][0]
    assert (payments["last_reason"], payments["last_exit"], payments["reason"]) == (
        "OOMKilled",
        137,
        "CrashLoopBackOff",
    )
    assert any(e["reason"] == "Unhealthy" and ":8080" in e["message"] for e in events)
    assert cluster.apply(fixed_text()) == "payments-service"  # 409 on create -> replace
    assert [m for m, _ in api.requests if m in ("POST", "PUT")] == ["POST", "POST", "PUT"]
    status, _ = cluster.observe()
    assert status["pod"]["ready"] == "2/2" and status["pod"]["restarts"] == 0
    watched = list(cluster.watch_pods(timeout_s=5))
    assert [t for t, _ in watched] == ["ADDED", "MODIFIED"] and watched[1][1]["pod"]["ready"] == "2/2"


def test_kube_scenario_end_to_end_on_recorded_responses(recorded: tuple[RecordedApi, Path], tmp_path: Path) -> None:
    api, kubeconfig = recorded
    code, run_dir = run_scenario(
        "payments-service",
        {
            "kube_context": "recorded",
            "kubeconfig": str(kubeconfig),
            "soak_s": 0.5,
            "observe_period_s": 0.1,
            "accel": "tcg",
        },
        tmp_path / "run",
    )
    data = json.loads((run_dir / "results.json").read_text())["scenario"]["data"]
    assert code == 0 and data["target"] == "kubernetes" and data["grade"]["verdict"] == "pass"
    assert data["broken"]["last_reasons"]["payments"] == "OOMKilled" and data["broken"]["restarts_before_fix"] == 7
    assert "+              memory: 192Mi" in data["fix"]["diff"]
    assert ("DELETE", "/apis/apps/v1/namespaces/default/deployments/payments-service") in api.requests


# -- podrt on a real guest -----------------------------------------------------------------------------------------
@pytest.mark.qemu
def test_podrt_oom_kill_probe_restarts_and_rollout(image: GuestImage, supervisor: Supervisor, tmp_path: Path) -> None:
    vm = Microvm(SandboxSpec(id="podrt", workdir=tmp_path, mem_mib=mod.GUEST_MEM_MIB), image, supervisor, "tcg")
    vm.spawn()
    vm.wait_ready()
    try:
        cluster = embedded.EmbeddedCluster(
            vm,
            embedded.RuntimeSettings(backoff_base_s=1, backoff_max_s=2),
            manifests.Timing(probe_period_s=1, probe_initial_delay_s=1),
            "payments-service",
        )
        cluster.install({"deployment.yaml": BROKEN})
        first = cluster.sync()
        cluster.start()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            st, events = cluster.observe()
            reasons = [e["reason"] for e in events]
            if "OOMKilled" in reasons and any("liveness" in e["message"] for e in events if e["reason"] == "Killing"):
                break
            time.sleep(1)
        assert st is not None and st["pod"]["name"] == first
        assert "OOMKilled" in reasons and "Unhealthy" in reasons and "BackOff" in reasons
        # The kill was the kernel's: the container cgroup's own OOM counter moved.
        oom = vm.exec(f"cat /sys/fs/cgroup/kubepods/{first}/payments/memory.events").text
        assert int(oom.split("oom_kill ")[1].split()[0]) >= 1
        assert vm.exec(f"cat /sys/fs/cgroup/kubepods/{first}/payments/memory.max").text.strip() == str(64 * MIB)
        # kubectl in the guest speaks the same vocabulary.
        described = vm.exec("kubectl describe pod").text
        assert "OOMKilled" in described and "Liveness probe failed" in described
        cluster.write("deployment.yaml", fixed_text())
        second = cluster.sync()
        assert second and second != first
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st, _ = cluster.observe()
            if st and st["pod"]["name"] == second and st["pod"]["ready"] == "2/2":
                break
            time.sleep(1)
        assert st["pod"]["name"] == second and st["pod"]["ready"] == "2/2" and st["pod"]["restarts"] == 0
        payments = st["containers"][0]
        assert payments["memory_max"] == 192 * MIB and payments["memory_current"] > 150 * MIB
        assert vm.exec(f"ls /sys/fs/cgroup/kubepods/{first} 2>/dev/null || echo gone").text.strip() == "gone"
    finally:
        vm.stop()


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.parametrize(("fixer", "code", "verdict"), [("reference", 0, "pass"), ("memory-only", 1, "partial-fix")])
def test_scenario_embedded_grades_fixers(fixer: str, code: int, verdict: str, tmp_path: Path) -> None:
    got, run_dir = run_scenario("payments-service", {**FAST, "fixer": fixer}, tmp_path / "run")
    results = json.loads((run_dir / "results.json").read_text())
    data = results["scenario"]["data"]
    assert got == code and data["grade"]["verdict"] == verdict
    assert data["broken"]["oom_kills"] >= 1 and data["broken"]["time_to_first_oom_kill_s"] > 0
    assert data["fix"]["model_calls"]["total"] == 0 and data["fix"]["changed"]
    if fixer == "memory-only":
        assert any(p["what"] == "liveness-probe" for p in data["grade"]["still_broken"])
    assert (run_dir / "report.html").exists() and "report_error" not in results
