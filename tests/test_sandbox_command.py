"""The `command` backend (a user's stack as a YAML of shell commands): its validation, one line each and
through the real CLI; its lifecycle on a plain host stack (timeouts enforced on the host, nothing left
running); the shipped examples; and the bwrap example end to end behind a real gateway, with the same
isolation verdicts as the built-in bwrap backend."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from harness.config import RunConfig
from harness.errors import ConfigError
from harness.fleet import open_fleet
from harness.gateway.process import GatewayConfig
from harness.paths import cache_dir
from harness.sandbox import (
    BackendOptions,
    Sandbox,
    SandboxSpec,
    backend_features,
    create_backend,
    sweep_backend_leftovers,
)
from harness.sandbox.base import BootFailed
from harness.sandbox.command import FEATURES, CommandBackend, CommandSandbox, load_stack
from harness.scratch import remove_scratch_dir
from harness.standins.upstream import UpstreamServer
from harness.supervisor import OWNER_ENV, Supervisor, kill_group, owner_mark, pid_alive, process_create_time
from tests.conftest import REPO, IsolationComparison, invoke_cmd

EXAMPLES = REPO / "examples" / "command-backends"
"""As a user types it, relative to the repository (the CLI tests run from there)."""

GOOD = {
    "name": "host-shell",
    "commands": {"create": "true", "exec": 'exec sh -c "$BR_COMMAND"', "stop": "true"},
    "egress": {"proxy": "127.0.0.1:3128", "gateway": "behind"},
}
"""The smallest valid stack: no isolation at all, commands run on the host."""

DAEMON_STACK = {
    "name": "host-shell-with-daemon",
    "description": "create leaves a daemon that escaped its process group",
    "commands": {
        "create": (
            'echo "$$" >"$BR_SCRATCH/create.pid"\n'
            'setsid sleep 300 </dev/null >/dev/null 2>&1 &\necho "$!" >"$BR_WORKDIR/daemon.pid"\n'
        ),
        "exec": 'exec sh -c "$BR_COMMAND"',
        "stop": "true",
    },
    "egress": {"proxy": "127.0.0.1:3128", "gateway": "behind"},
    "boot_timeout_s": 10,
}


def write_stack(directory: Path, data: Any, name: str = "stack.yaml") -> Path:
    path = directory / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def with_changes(**changes: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(GOOD))
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = data
        for parent in parents:
            target = target[parent]
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    return data


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    with Supervisor(f"test-command-{os.getpid()}-{secrets.token_hex(2)}") as sup:
        yield sup


def marked_processes(workdir_prefix: str) -> list[str]:
    """Live processes whose BR_WORKDIR lies under workdir_prefix: what a stopped sandbox must not leave."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("BR_WORKDIR", "").startswith(workdir_prefix) and pid_alive(process.pid):
                found.append(" ".join(process.cmdline()))
        except psutil.Error:
            continue
    return found


# ---- validation --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "key", "fix"),
    [
        ("name: x\ncommands: {create: [\n", "not valid YAML", "fix the syntax"),
        ("- a list\n", "not a mapping", "write keys: name, description, commands"),
        ("", "is empty", "create, exec, stop"),
        (with_changes(comands={"create": "true"}), "unknown key 'comands'", "did you mean 'commands'?"),
        (with_changes(commands__exec=None), "commands.exec is missing", "runs $BR_COMMAND inside"),
        (with_changes(commands__start="x"), "unknown key commands.start", "the commands are: create"),
        (with_changes(commands__stop=""), "commands.stop must be a non-empty shell command", "not ''"),
        (with_changes(egress=None), "egress is missing", "gateway: behind|own"),
        (with_changes(egress__gateway="inside"), "egress.gateway must be behind", "not 'inside'"),
        (with_changes(egress__proxy="3128"), "egress.proxy must be HOST:PORT", "127.0.0.1:3128"),
        (with_changes(egress__gateway="own", ca_bundle="/etc/ca.pem"), "ca_bundle", "drop it"),
        (with_changes(ca_bundle="etc/ca.pem"), "ca_bundle must be an absolute path", "'etc/ca.pem'"),
        (with_changes(boot_timeout_s=-1), "boot_timeout_s must be a positive number", "-1"),
        (with_changes(own_kernel="yes"), "own_kernel must be true or false", "'yes'"),
        (with_changes(name=None), "name is missing", "name: <what this stack is>"),
    ],
)
def test_a_bad_stack_file_is_one_line_naming_the_file_the_key_and_the_fix(
    tmp_path: Path, data: Any, key: str, fix: str
) -> None:
    path = write_stack(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_stack(str(path))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"--backend command:{path}: ")
    assert key in message and fix in message, message
    with pytest.raises(ConfigError):  # the same check before a run writes anything
        RunConfig(backend=f"command:{path}").validate()


def test_a_missing_file_or_argument_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file; name a stack YAML"):
        load_stack(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"needs a stack file: --backend command:PATH\.yaml"):
        RunConfig(backend="command").validate()
    with pytest.raises(ConfigError, match="is a directory"):
        create_backend(f"command:{tmp_path}", BackendOptions(cache=cache_dir()))


def test_features_are_static_and_need_no_file() -> None:
    assert backend_features("command:does-not-exist.yaml") == FEATURES
    assert not FEATURES.own_kernel and not FEATURES.snapshot and not FEATURES.weaken


@pytest.mark.parametrize(
    ("stack", "message"),
    [
        ("commands: {create: true\n", "not valid YAML"),
        ("name: x\ncommands: {create: a, exec: b}\negress: {proxy: '127.0.0.1:3128', gateway: behind}\n", "stop"),
    ],
)
def test_the_cli_refuses_a_bad_stack_in_one_line_before_writing_anything(
    tmp_path: Path, stack: str, message: str
) -> None:
    bad = write_stack(tmp_path, stack, "bad.yaml")
    out = tmp_path / "X"
    result = subprocess.run(
        invoke_cmd("bench", "--backend", f"command:{bad}", "--out", str(out), "--no-proxy"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: --backend command:{bad}: "), result.stderr
    assert message in lines[0] and "Traceback" not in result.stderr
    assert not out.exists()


# ---- lifecycle on a plain host stack -----------------------------------------------------
def test_a_host_stack_boots_execs_and_gets_nothing_of_the_hosts_environment(
    supervisor: Supervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host_secret = f"sk-ant-host-{secrets.token_hex(12)}"
    monkeypatch.setenv("BR_TEST_HOST_API_KEY", host_secret)
    backend = create_backend(f"command:{write_stack(tmp_path, GOOD)}", BackendOptions(cache=cache_dir()))
    assert isinstance(backend, CommandBackend) and backend.rootfs is None  # no command names BR_ROOTFS
    sandbox = backend.boot(SandboxSpec(id="c0", workdir=tmp_path / "c0", gateway_port=4111), supervisor)
    try:
        assert isinstance(sandbox, Sandbox) and sandbox.boot.boot_ms is not None
        assert set(sandbox.boot.phases_ms) == set(backend.phases)
        assert sandbox.create_proc is not None and sandbox.create_proc.wait(timeout=5) == 0  # a create that returns
        result = sandbox.exec('cat; echo "to stderr" >&2; exit 3', stdin=b"from stdin\n")
        assert (result.rc, result.stdout, result.stderr, result.timed_out) == (
            3,
            b"from stdin\n",
            b"to stderr\n",
            False,
        )
        env = dict(line.split("=", 1) for line in sandbox.exec("env").text.splitlines() if "=" in line)
        assert host_secret not in json.dumps(env)
        assert env["BR_SANDBOX_ID"] == "c0" and env["BR_WORKDIR"] == str(tmp_path / "c0")
        assert (env["BR_GATEWAY_HOST"], env["BR_GATEWAY_PORT"], env["BR_PROXY"]) == (
            "127.0.0.1",
            "4111",
            "127.0.0.1:3128",
        )
        assert len(env["BR_SCRATCH"]) < 40 and env["BR_STACK_DIR"] == str(tmp_path) and env["BR_ROOTFS"] == ""
        assert env["BR_SANDBOX_NAME"].startswith("br-test-command-") and env["BR_SANDBOX_NAME"].endswith("-c0")
        copied = tmp_path / "copied"
        source = tmp_path / "source.txt"
        source.write_text("through exec\n")
        assert sandbox.copy_in(source, str(copied / "it's.txt")).rc == 0  # no copy_in command: exec + stdin
        assert (copied / "it's.txt").read_text() == "through exec\n"
        assert sandbox.pids() == []  # no pids command: n/a, which the bench records as None
        assert backend.describe()["host_memory"].startswith("n/a")
    finally:
        sandbox.stop()
    assert not Path(env["BR_SCRATCH"]).exists()


@pytest.mark.slow
def test_the_host_enforces_the_timeout_and_an_answer_does_not_wait_for_stragglers(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    backend = create_backend(f"command:{write_stack(tmp_path, GOOD)}", BackendOptions(cache=cache_dir()))
    sandbox = backend.boot(SandboxSpec(id="c1", workdir=tmp_path / "c1"), supervisor)
    try:
        # This stack's exec ignores BR_TIMEOUT: the host kills the exec's group after the grace.
        slow = sandbox.exec("sleep 30; echo late", timeout=1)
        assert slow.timed_out and slow.rc == 137 and b"late" not in slow.stdout and slow.duration_s < 6
        # A stack that kills at BR_TIMEOUT itself: its 137 at the timeout is a timed-out exec.
        killed = sandbox.exec('timeout -s KILL "$BR_TIMEOUT" sleep 30', timeout=1)
        assert killed.timed_out and killed.rc == 137 and killed.duration_s < 2
        # A command that leaves a child holding its output: the answer comes once the shell is done.
        started = time.monotonic()
        quick = sandbox.exec("sleep 30 & echo done", timeout=20)
        assert quick.rc == 0 and quick.text == "done\n" and time.monotonic() - started < 3
        assert not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "30"]]
    finally:
        sandbox.stop()


def test_stop_kills_what_create_left_even_outside_its_process_group(supervisor: Supervisor, tmp_path: Path) -> None:
    backend = create_backend(f"command:{write_stack(tmp_path, DAEMON_STACK)}", BackendOptions(cache=cache_dir()))
    sandbox = backend.boot(SandboxSpec(id="c2", workdir=tmp_path / "c2"), supervisor)
    daemon = int((tmp_path / "c2" / "daemon.pid").read_text())
    assert pid_alive(daemon) and os.getpgid(daemon) != sandbox.create_proc.pid  # type: ignore[union-attr]
    assert psutil.Process(daemon).environ()[OWNER_ENV] == owner_mark()
    sandbox.stop()
    sandbox.stop()  # idempotent
    time.sleep(0.1)
    assert not pid_alive(daemon) and marked_processes(str(tmp_path)) == []
    assert supervisor.live() == []


@pytest.mark.parametrize(
    ("commands", "reason"),
    [
        (
            {"create": "echo 'no such image' >&2; exit 3", "exec": "exit 1"},
            "create command exited with status 3: no such image",
        ),
        ({"exec": "echo not yet; exit 1"}, "did not answer `echo ready` within 0.5 s (last: rc 1: not yet)"),
    ],
)
def test_a_failed_boot_says_why_and_leaves_nothing(
    supervisor: Supervisor, tmp_path: Path, commands: dict[str, str], reason: str
) -> None:
    data = json.loads(json.dumps(DAEMON_STACK))
    data["commands"].update(commands)
    data["boot_timeout_s"] = 0.5
    backend = create_backend(f"command:{write_stack(tmp_path, data)}", BackendOptions(cache=cache_dir()))
    with pytest.raises(BootFailed) as caught:
        backend.boot(SandboxSpec(id="c3", workdir=tmp_path / "c3"), supervisor)
    assert reason in caught.value.reason
    time.sleep(0.1)
    assert marked_processes(str(tmp_path)) == [] and supervisor.live() == []


@pytest.mark.slow
def test_a_bench_without_a_pids_command_reports_host_memory_as_na_not_zero(tmp_path: Path) -> None:
    from harness.bench import BenchConfig, run_bench

    out = tmp_path / "run"
    backend = f"command:{write_stack(tmp_path, GOOD)}"
    run_bench(BenchConfig(backend=backend, sandboxes=2, warmup=0, out=out, proxy=None, guest_samples=0))
    data = json.loads((out / "results.json").read_text())
    assert [s["ok"] for s in data["sandboxes"]] == [True, True] and data["leftover_vmm_pids"] == []
    assert [s["host_pss_bytes"] for s in data["sandboxes"]] == [None, None]
    assert data["backend"]["name"] == backend and data["backend"]["stack"]["name"] == "host-shell"
    assert "Host memory per sandbox: n/a: the stack has no pids command" in (out / "report.html").read_text()


KILLED_RUN = """
import sys, time
from pathlib import Path
from harness.paths import cache_dir
from harness.sandbox import BackendOptions, SandboxSpec, create_backend
from harness.supervisor import Supervisor
backend = create_backend("command:" + sys.argv[1], BackendOptions(cache=cache_dir()))
supervisor = Supervisor("test-command-killed-" + sys.argv[3])
sandbox = backend.boot(SandboxSpec(id="k0", workdir=Path(sys.argv[2])), supervisor)
print(supervisor.record_path, sandbox.scratch, flush=True)
time.sleep(300)
"""


@pytest.mark.slow
def test_after_a_sigkill_clean_finds_the_processes_and_runs_the_stop_command(tmp_path: Path) -> None:
    data = json.loads(json.dumps(DAEMON_STACK))
    data["commands"]["stop"] = 'echo "$BR_SANDBOX_ID" >"$BR_WORKDIR/stopped"'  # what removes a container or a pod
    workdir = tmp_path / "k0"
    run = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(write_stack(tmp_path, data)), str(workdir), str(os.getpid())],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert run.stdout is not None
    record_path, scratch = run.stdout.readline().split()
    daemon = int((workdir / "daemon.pid").read_text())
    owner = f"{run.pid}:{process_create_time(run.pid)!r}"
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=10)
    assert pid_alive(daemon)  # a jail's --die-with-parent would not reach this far: only clean does
    # What `invoke clean` does first (reap_leftovers), for this run only: the real one reaps every gone run's.
    for entry in json.loads(Path(record_path).read_text())["processes"]:
        if process_create_time(entry["pid"]) == entry["create_time"]:
            kill_group(entry["pid"])
    for process in psutil.process_iter():
        try:
            if process.environ().get(OWNER_ENV) == owner:
                process.kill()
        except psutil.Error:
            continue
    Path(record_path).unlink()
    time.sleep(0.1)
    assert not pid_alive(daemon) and marked_processes(str(tmp_path)) == []
    # Then every backend's sweep: this one runs the stop command of each sandbox of a run that is gone.
    swept = sweep_backend_leftovers()
    assert any("ran the stop command of command sandbox k0" in line for line in swept), swept
    assert (workdir / "stopped").read_text() == "k0\n"
    assert not any("command sandbox k0" in line for line in sweep_backend_leftovers())  # once
    assert Path(scratch).exists()  # sweep_scratch_dirs removes it by its record, as for any run
    remove_scratch_dir(Path(scratch))


# ---- the shipped examples ----------------------------------------------------------------
def test_every_shipped_example_loads_and_its_commands_parse_as_shell(tmp_path: Path) -> None:
    examples = sorted(EXAMPLES.glob("*.yaml"))
    assert {p.name for p in examples} == {"bwrap.yaml", "docker-runsc.yaml", "sbx.yaml", "kubectl-runtimeclass.yaml"}
    for path in examples:
        stack = load_stack(str(path))
        assert path.read_text().startswith("#") and stack.name and stack.description
        not_here = "NOT RUN ON THIS PROJECT'S MACHINES"
        assert (not_here in path.read_text()) == (path.name != "bwrap.yaml"), path.name
        for key, command in stack.commands.items():
            script = tmp_path / f"{path.stem}-{key}.sh"
            script.write_text(command)
            check = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
            assert check.returncode == 0, f"{path.name} commands.{key}: {check.stderr}"
    readme = (EXAMPLES / "README.md").read_text()
    assert all(f"`{path.name}`" in readme for path in examples) and "never been run" in readme


@pytest.fixture
def stand_in_clis(tmp_path: Path) -> dict[str, str]:
    """docker, sbx and kubectl stand-ins that log their argv and stdin, and run what follows `timeout` here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for cli in ("docker", "sbx", "kubectl"):
        (bin_dir / cli).write_text(
            "#!/bin/sh\n"
            'printf "%s\\0" "$@" >"$CLI_LOG.argv"\n'
            'case "$1" in apply) cat >"$CLI_LOG.stdin"; exit 0;; exec) ;; *) exit 0;; esac\n'
            'while [ "$#" -gt 0 ] && [ "$1" != timeout ]; do shift; done\n'
            'exec "$@"\n'
        )
        (bin_dir / cli).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CLI_LOG": str(tmp_path / "cli")}


@pytest.mark.parametrize("example", ["docker-runsc.yaml", "sbx.yaml", "kubectl-runtimeclass.yaml"])
def test_each_examples_exec_line_keeps_the_command_stdin_and_exit_code_whole(
    example: str, stand_in_clis: dict[str, str], tmp_path: Path
) -> None:
    stack = load_stack(str(EXAMPLES / example))
    command = "cat; printf '%s\\n' \"it's $HOME\" >&2; exit 3"
    env = {**stand_in_clis, "BR_COMMAND": command, "BR_TIMEOUT": "7", "BR_SANDBOX_NAME": "br-run-sb0"}
    env["BR_WORKDIR"] = str(tmp_path)
    result = subprocess.run(["sh", "-c", stack.commands["exec"]], input=b"in\n", capture_output=True, env=env)
    assert (result.returncode, result.stdout) == (3, b"in\n"), result.stderr
    assert result.stderr.decode().startswith("it's ")
    argv = (tmp_path / "cli.argv").read_bytes().split(b"\0")[:-1]
    assert b"br-run-sb0" in argv and b"-i" in argv
    assert argv[argv.index(b"timeout") :] == [b"timeout", b"-s", b"KILL", b"7", b"sh", b"-c", command.encode()]


def test_the_kubectl_example_makes_a_pod_the_kubernetes_model_reads_whole(
    stand_in_clis: dict[str, str], tmp_path: Path
) -> None:
    from kubernetes.client import ApiClient

    stack = load_stack(str(EXAMPLES / "kubectl-runtimeclass.yaml"))
    env = {**stand_in_clis, "BR_SANDBOX_NAME": "br-run-sb0", "BR_SANDBOX_ID": "sb0", "BR_PROXY": str(stack.proxy)}
    subprocess.run(["sh", "-c", stack.commands["create"]], env=env, check=True, capture_output=True)
    manifest = yaml.safe_load((tmp_path / "cli.stdin").read_text())
    client = ApiClient()
    pod = client.deserialize(json.dumps(manifest), "V1Pod", "application/json")
    # A misspelt field would be dropped by the model: the round trip must give the manifest back.
    assert client.sanitize_for_serialization(pod) == manifest
    assert pod.spec.runtime_class_name == "gvisor" and pod.metadata.name == "br-run-sb0"
    assert pod.spec.automount_service_account_token is False


# ---- the bwrap example, end to end -------------------------------------------------------
needs_bwrap = pytest.mark.skipif(
    not (shutil.which("bwrap") and shutil.which("socat")), reason="needs bubblewrap and socat"
)


@needs_bwrap
@pytest.mark.slow
def test_the_bwrap_example_behind_a_real_gateway(supervisor: Supervisor, tmp_path: Path) -> None:
    backend = create_backend(f"command:{EXAMPLES / 'bwrap.yaml'}", BackendOptions(cache=cache_dir()))
    assert isinstance(backend, CommandBackend) and backend.rootfs is not None
    described = backend.describe()
    assert described["egress_mode"] == "behind" and described["own_kernel_claimed"] is False
    assert "claims no kernel of its own" in str(described["isolation"]) and "gateway listener" in str(
        described["egress"]
    )
    assert described["stack"]["sha256"] and "create" in described["stack"]["commands"]  # type: ignore[index]
    upstream = UpstreamServer().start()
    config = GatewayConfig(
        policy="open",
        audit_path=tmp_path / "audit.jsonl",
        state_dir=tmp_path / "gw",
        upstream_overrides=upstream.overrides(),
        upstream_ca_file=upstream.ca_file,
    )
    pids: list[int] = []
    try:
        with open_fleet(backend, supervisor, tmp_path, SandboxSpec(id="", workdir=tmp_path), config) as fleet:
            booted: dict[str, Sandbox] = {}
            # Booted on threads that end, as the isolation scenario does: the jail must outlive its boot thread.
            threads = [
                threading.Thread(target=lambda i=i: booted.setdefault(f"cb{i}", fleet.boot(f"cb{i}"))) for i in (0, 1)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert sorted(booted) == ["cb0", "cb1"]
            for sandbox_id, sandbox in booted.items():
                assert isinstance(sandbox, CommandSandbox) and sandbox.boot.boot_ms is not None
                assert sandbox.exec("hostname").text.strip() == sandbox_id
                result = sandbox.exec('cat; echo "e" >&2; exit 4', stdin=b"x" * 100_000)
                assert (result.rc, len(result.stdout), result.stderr) == (4, 100_000, b"e\n")
                assert b"BEGIN CERTIFICATE" in sandbox.exec(f"cat {sandbox.ca_bundle}").stdout
                # The proxy inside reaches a loopback upstream only through this sandbox's gateway listener.
                request = f"GET http://example.com/from-{sandbox_id} HTTP/1.1\\r\\nHost: example.com\\r\\n"
                reply = sandbox.exec(f"printf '{request}Connection: close\\r\\n\\r\\n' | nc -w 5 127.0.0.1 3128")
                assert reply.text.startswith("HTTP/1.1 200"), reply
                source = tmp_path / "note.txt"
                source.write_text(f"for {sandbox_id}\n")
                assert sandbox.copy_in(source, "/tmp/in dir/note.txt").rc == 0
                assert sandbox.exec("cat '/tmp/in dir/note.txt'").text == f"for {sandbox_id}\n"
                pids += sandbox.pids()
            slow = booted["cb0"].exec("sleep 30; echo late", timeout=1)
            assert slow.timed_out and slow.rc == 137 and slow.duration_s < 3  # the jail's agent killed it
            assert {p.target for p in upstream.received()} >= {"/from-cb0", "/from-cb1"}
            audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
            assert {r["sandbox"] for r in audit if r["host"] == "example.com"} == {"cb0", "cb1"}, audit
            names = {psutil.Process(pid).name() for pid in pids}
            assert {"bwrap", "socat", "sh"} <= names
    finally:
        upstream.stop()
    time.sleep(0.1)
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert marked_processes(str(tmp_path)) == [] and supervisor.live() == []


def test_isolation_verdicts_match_the_bwrap_backend(isolation_comparison: IsolationComparison) -> None:
    """The same jail built from outside the harness must get the built-in backend's verdict on every probe."""
    runs = {}
    for label in ("bwrap", "command-bwrap"):
        data = isolation_comparison.sub_run(label)
        assert data["partial"] is False and data["scenario"]["data"]["evidence_clean"]["clean"]
        runs[label] = {
            (card["sandbox"], probe["id"]): probe["passed"]
            for card in data["scenario"]["data"]["scorecards"]
            for probe in card["probes"]
        }
    assert runs["command-bwrap"] == runs["bwrap"], {
        key: (runs["bwrap"].get(key), verdict)
        for key, verdict in runs["command-bwrap"].items()
        if runs["bwrap"].get(key) != verdict
    }
    assert {sandbox for sandbox, _ in runs["command-bwrap"]} == {"iso-sb0", "iso-sb1"}
    assert marked_processes(str(isolation_comparison.out)) == []
