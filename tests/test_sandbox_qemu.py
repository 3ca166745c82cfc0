"""Boot and exec on a real TCG guest through the guest agent."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from harness.image import GuestImage
from harness.sandbox.base import BootFailed, SandboxSpec
from harness.sandbox.qemu.vm import Microvm
from harness.supervisor import Supervisor
from tests.conftest import HOST_SECRET

pytestmark = pytest.mark.qemu


def test_exec_returns_exit_code_stdout_and_stderr(guest: Microvm) -> None:
    result = guest.exec("echo out; echo err >&2; exit 7")
    assert (result.rc, result.stdout, result.stderr, result.timed_out) == (7, b"out\n", b"err\n", False)


def test_exec_passes_stdin_and_binary_output(guest: Microvm) -> None:
    payload = bytes(range(256)) * 400
    result = guest.exec("cat > /tmp/blob && sha256sum /tmp/blob && cat /tmp/blob", stdin=payload)
    assert result.rc == 0
    import hashlib

    digest = hashlib.sha256(payload).hexdigest().encode()
    assert result.stdout.startswith(digest) and result.stdout.endswith(payload)


def test_exec_timeout_kills_the_whole_command(guest: Microvm) -> None:
    result = guest.exec("sleep 30 & sleep 30; echo never", timeout=1)
    assert result.timed_out and result.rc == 137 and b"never" not in result.stdout
    assert result.duration_s < 5, "a straggler kept the agent connection open"
    assert guest.exec("pgrep -f 'sleep 30' || echo none").text.strip() == "none"


def test_guest_identity_and_separate_kernel(guest: Microvm) -> None:
    assert guest.exec("hostname").text.strip() == "guest0"
    guest_boot_id = guest.exec("cat /proc/sys/kernel/random/boot_id").text.strip()
    assert guest_boot_id and guest_boot_id != Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_guest_sees_only_the_gateway_proxy_and_no_host_secret(guest: Microvm) -> None:
    env = guest.exec("env").text
    assert "HTTP_PROXY=http://10.0.2.100:3128" in env and "HTTPS_PROXY=http://10.0.2.100:3128" in env
    assert HOST_SECRET not in env
    # busybox grep has no --exclude-dir: name the guest's trees instead of / (not /proc, /sys, nor /bin and
    # /sbin, which are hundreds of links to busybox). The pattern is built at run time so the agent's own
    # copy of this command does not match it.
    scan = guest.exec('p=br-host; grep -r -l -s "$p-secret" /etc /lib /root /tmp /work /init; echo rc=$?', timeout=60)
    assert "rc=1" in scan.text, scan.text  # grep's 1: searched everything, found nothing


def test_guest_has_no_host_home(guest: Microvm) -> None:
    assert guest.exec("ls -A /root /work").text.strip() in ("/root:\n\n/work:", "")
    host_home_files = [p.name for p in Path.home().iterdir()][:20]
    listing = guest.exec("ls -A /").text.split()
    assert ".ssh" not in listing and not set(host_home_files) & set(guest.exec("ls -A /root").text.split())


def test_boot_record_phases_add_up(guest: Microvm) -> None:
    boot = guest.boot
    assert boot.boot_ms and boot.boot_ms > 0
    assert set(boot.phases_ms) == {"vmm", "kernel", "userspace", "agent"}
    assert sum(boot.phases_ms.values()) == pytest.approx(boot.boot_ms, abs=1.0)
    assert boot.marks_ms["kernel_start"] < boot.marks_ms["init"] < boot.marks_ms["network"]
    assert (guest.guest_memory() or {})["MemTotal"] > 64 << 20


def test_direct_egress_is_blocked(guest: Microvm) -> None:
    # Host loopback through slirp's host alias, and the gateway's address on a port it does not forward.
    result = guest.exec("nc -w 2 10.0.2.2 22 </dev/null; echo rc=$?; nc -w 2 10.0.2.100 80 </dev/null; echo rc=$?")
    assert result.text.count("rc=1") == 2, result.text


def test_stop_leaves_no_process(image: GuestImage, supervisor: Supervisor, tmp_path: Path) -> None:
    vm = Microvm(SandboxSpec(id="stopme", workdir=tmp_path), image, supervisor, "tcg")
    vm.spawn()
    vm.wait_ready()
    pid = vm.pids()[0]
    vm.stop()
    vm.stop()  # idempotent
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert vm.pids() == [] and supervisor.live() == []


def test_guest_that_never_becomes_ready_fails_within_timeout(
    image: GuestImage, supervisor: Supervisor, tmp_path: Path
) -> None:
    vm = Microvm(
        SandboxSpec(id="hung", workdir=tmp_path, boot_timeout_s=2), image, supervisor, "tcg", extra_args=("-S",)
    )  # -S: QEMU starts with the CPU stopped, a guest that hangs for ever
    vm.spawn()
    with pytest.raises(BootFailed, match="did not answer within 2 s") as failure:
        vm.wait_ready()
    vm.stop()
    assert failure.value.boot.boot_ms is None
    assert supervisor.live() == [] and os.path.exists(tmp_path / "qemu.log")


@pytest.mark.parametrize("sharing", ["off", "file"])
def test_snapshot_clones_are_renamed_and_independent(supervisor: Supervisor, tmp_path: Path, sharing: str) -> None:
    """README's note on snapshot clones, in both sharing modes: each is renamed; each has a boot id of its
    own (generated at its first read, from a CRNG that has diverged from the template's by then); and what
    one writes (a file in RAM) the other never sees."""
    from harness.paths import cache_dir
    from harness.sandbox import BackendOptions, create_backend

    options = BackendOptions(cache=cache_dir(), accel="tcg", boot_mode="snapshot", memory_sharing=sharing)
    backend = create_backend("qemu", options)
    specs = [
        SandboxSpec(id=f"clone{i}", workdir=tmp_path / str(i), reclaim=sharing == "off", shared_ram=sharing == "file")
        for i in range(2)
    ]
    clones = [backend.boot(spec, supervisor) for spec in specs]
    try:
        assert [c.exec("hostname").text.strip() for c in clones] == ["clone0", "clone1"]
        boot_ids = {c.exec("cat /proc/sys/kernel/random/boot_id").text.strip() for c in clones}
        assert len(boot_ids) == 2, "README says each clone's boot id is its own; if this changed, update it"
        clones[0].exec("echo only-here > /work/mark && echo only-here > /tmp/mark")
        assert clones[0].exec("cat /tmp/mark").text.strip() == "only-here"
        assert clones[1].exec("cat /work/mark /tmp/mark 2>/dev/null || echo absent").text.strip() == "absent"
        assert all(set(c.boot.phases_ms) == {"qemu_start", "state_load", "first_answer"} for c in clones)
        assert all(c.ram_file is not None for c in clones) == (sharing == "file")
    finally:
        for clone in clones:
            clone.stop()
    assert supervisor.live() == []


def test_agent_port_taken_before_qemu_binds_it_is_retried(
    image: GuestImage, supervisor: Supervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from harness.sandbox.qemu import vm as qemu_vm
    from harness.sandbox.qemu.backend import QemuBackend

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        handed_out = iter([taken])
        real_free_port = qemu_vm.free_port
        monkeypatch.setattr(qemu_vm, "free_port", lambda: next(handed_out, None) or real_free_port())
        backend = QemuBackend(image, "tcg", boot_mode="cold")
        vm = backend.boot(SandboxSpec(id="clash", workdir=tmp_path), supervisor)
        try:
            assert vm.agent_port != taken and vm.exec("true").rc == 0
        finally:
            vm.stop()
