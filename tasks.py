"""Invoke tasks: parse flags, call plain functions in harness/. No logic lives here."""

from pathlib import Path

from invoke import task


@task(
    help={
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
        "guest_samples": "timed requests through the gateway from inside each sandbox (default 10)",
        "proxy": "run the Locust proxy-latency comparison (default on; --no-proxy skips it)",
        "users": "Locust users per target",
        "spawn_rate": "Locust users started per second",
        "duration": "seconds of load per target",
        "workers": "local Locust worker processes under one master",
        "master_host": "bind the Locust master here and wait for remote workers (Locust distributed mode)",
        "targets": "comma list: direct,gateway,gateway-intercept,squid,tinyproxy,mitmproxy",
        "traffic": "comma list: model,download,blocked",
    }
)
def bench(
    c,
    sandboxes=None,
    backend=None,
    out=None,
    accel=None,
    concurrency=None,
    warmup=None,
    repeat=None,
    mem_mib=None,
    boot_timeout=None,
    boot_mode=None,
    policy=None,
    guest_samples=None,
    proxy=True,
    users=None,
    spawn_rate=None,
    duration=None,
    workers=None,
    master_host=None,
    targets=None,
    traffic=None,
):
    """Boot N sandboxes, measure boot phases and host RAM, write results.json and report.html."""
    from harness import cli

    cli.bench(
        sandboxes=_int(sandboxes),
        backend=backend,
        out=Path(out) if out else None,
        accel=accel,
        concurrency=_int(concurrency),
        warmup=_int(warmup),
        repeat=_int(repeat),
        mem_mib=_int(mem_mib),
        boot_timeout_s=_float(boot_timeout),
        boot_mode=boot_mode,
        policy=policy,
        guest_samples=_int(guest_samples),
        proxy=cli.proxy_config(
            proxy,
            users=_int(users),
            spawn_rate=_float(spawn_rate),
            duration_s=_float(duration),
            workers=_int(workers),
            master_host=master_host,
            targets=_list(targets),
            traffic=_list(traffic),
        ),
    )


@task(
    help={
        "policy": "open | balanced | locked | path to a policy YAML",
        "listen": "address to listen on (default 127.0.0.1)",
        "port": "port to listen on (default 3128)",
        "deny_mode": "override the policy's deny mode: 403 | 403-explained | reset",
        "audit": "JSONL audit log path",
        "override": "HOST[:PORT]=ADDR:PORT: dial ADDR for HOST; policy, keys and TLS checks keep the name (repeatable)",
        "upstream_ca": "a CA file (PEM) to trust for upstream TLS, e.g. a local stand-in's",
    },
    iterable=["override"],
)
def gateway(
    c, policy="balanced", listen="127.0.0.1", port=3128, deny_mode=None, audit=None, override=None, upstream_ca=None
):
    """Run the egress gateway in the foreground, in front of sandboxes of your own."""
    from harness import cli

    cli.gateway(
        policy,
        listen,
        _int(port),
        deny_mode,
        Path(audit) if audit else None,
        override,
        Path(upstream_ca) if upstream_ca else None,
    )


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

    return cli.parse_number(value, int)


def _float(value):
    from harness import cli

    return cli.parse_number(value, float)


def _list(value):
    return [item.strip() for item in value.split(",") if item.strip()] if value else None


@task
def image(c):
    """Fetch the Debian guest kernel and build (or reuse) the busybox initramfs."""
    from harness import cli

    cli.image()


@task(
    help={
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
    }
)
def scenario(
    c,
    name,
    sandboxes=None,
    out=None,
    backend=None,
    accel=None,
    mem_mib=None,
    leaky=False,
    file=None,
    agent=None,
    fixer=None,
    kube_context=None,
    max_sandboxes=None,
    duration=None,
    boot_mode=None,
):
    """Run one scenario and write results.json + report.html; exits non-zero when the scenario fails."""
    from harness import cli

    cli.scenario(
        name,
        out=Path(out) if out else None,
        sandboxes=_int(sandboxes),
        backend=backend,
        accel=accel,
        mem_mib=_int(mem_mib),
        leaky=leaky or None,
        file=file,
        agent=agent,
        fixer=fixer,
        kube_context=kube_context,
        max_sandboxes=_int(max_sandboxes),
        duration_s=_float(duration),
        boot_mode=boot_mode,
    )
