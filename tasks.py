"""Invoke tasks: parse flags, call plain functions in harness/. No logic lives here."""

from pathlib import Path

from invoke import task


@task(help={
    "sandboxes": "sandboxes booted concurrently per round (N, default 4)",
    "backend": "sandbox backend module (default qemu)",
    "out": "run directory (default results/<run-id>)",
    "accel": "auto | kvm | tcg (default auto: KVM only if a canary guest boots under it)",
    "concurrency": "boots in flight at once (default: CPU cores)",
    "warmup": "discarded warm-up rounds (default 1)",
    "repeat": "measured rounds (default 1)",
    "mem_mib": "guest RAM in MiB (default 128)",
    "boot_timeout": "seconds before a boot counts as failed (default 60)",
    "boot_mode": "snapshot (restore a booted template, default) | cold (boot the kernel every time)",
    "policy": "gateway policy: open | balanced | locked | path to a policy YAML (default balanced)",
})
def bench(c, sandboxes=None, backend=None, out=None, accel=None, concurrency=None, warmup=None, repeat=None,
          mem_mib=None, boot_timeout=None, boot_mode=None, policy=None):
    """Boot N sandboxes, measure boot phases and host RAM, write results.json and report.html."""
    from harness import cli

    cli.bench(sandboxes=_int(sandboxes), backend=backend, out=Path(out) if out else None, accel=accel,
              concurrency=_int(concurrency), warmup=_int(warmup), repeat=_int(repeat), mem_mib=_int(mem_mib),
              boot_timeout_s=float(boot_timeout) if boot_timeout else None, boot_mode=boot_mode, policy=policy)


@task
def clean(c):
    """Reap processes (qemu, gateway, locust) that a killed run left behind."""
    from harness import cli

    cli.clean()


@task(help={"run_dir": "a results/<run-id> directory"})
def report(c, run_dir):
    """Re-render report.html from a run directory's results.json."""
    from harness import cli

    cli.report(Path(run_dir))


@task(help={"marker": "pytest -m expression, e.g. 'not qemu'"})
def test(c, marker=None):
    """Run the test suite."""
    c.run("python -m pytest" + (f" -m {marker!r}" if marker else ""), pty=False)


def _int(value):
    """Flags arrive as strings; a bad number becomes a clear error in harness.cli."""
    from harness import cli

    return cli.parse_int(value)


@task
def image(c):
    """Fetch the Debian guest kernel and build (or reuse) the busybox initramfs."""
    from harness import cli

    cli.image()


@task(help={
    "name": "scenario folder under scenarios/ (isolation, retry-403, proxy-chaos, payments-service, ram-pressure)",
    "sandboxes": "sandboxes to run the scenario in",
    "out": "run directory (default results/<run-id>)",
    "backend": "sandbox backend module (default qemu)",
    "accel": "auto | kvm | tcg",
    "mem_mib": "guest RAM in MiB",
    "leaky": "isolation: deliberately weaken the setup so the probes must turn red",
    "file": "proxy-chaos: timeline YAML",
    "agent": "run this agent command inside the sandbox instead of the built-in reference client/fixer",
    "fixer": "payments-service: reference | memory-only | probe-only",
    "kube_context": "payments-service: a real cluster context instead of the embedded pod runtime",
    "max_sandboxes": "ram-pressure: cap on sandboxes",
    "duration": "seconds of load where the scenario runs load",
    "boot_mode": "snapshot (default) | cold",
})
def scenario(c, name, sandboxes=None, out=None, backend=None, accel=None, mem_mib=None, leaky=False, file=None,
             agent=None, fixer=None, kube_context=None, max_sandboxes=None, duration=None, boot_mode=None):
    """Run one scenario and write results.json + report.html; exits non-zero when the scenario fails."""
    from harness import cli

    cli.scenario(name, out=Path(out) if out else None, sandboxes=_int(sandboxes), backend=backend, accel=accel,
                 mem_mib=_int(mem_mib), leaky=leaky or None, file=file, agent=agent, fixer=fixer,
                 kube_context=kube_context, max_sandboxes=_int(max_sandboxes),
                 duration_s=float(duration) if duration else None, boot_mode=boot_mode)
