"""Invoke tasks: parse flags, call plain functions in harness/. No logic lives here.

Flags of `bench` and `scenario` may also come from invoke's own config: a `bench:` or `scenario:` section in
an invoke.yaml beside this file, or INVOKE_BENCH_<FLAG> / INVOKE_SCENARIO_<FLAG> variables (README).
"""

from pathlib import Path

from invoke import Collection, task

from harness.config import invoke_config
from harness.taskargs import VariadicTask


@task(
    auto_shortflags=False,  # bench's flags share first letters; invoke would print a broken `--=STRING` row
    help={
        "sandboxes": "sandboxes booted concurrently per round (N)",
        "backend": "sandbox backend module",
        "out": "run directory (default results/<run-id>)",
        "force": "empty --out first when it holds an earlier run (never a directory of other files)",
        "accel": "auto (KVM only if a canary guest boots under it) | kvm | tcg",
        "concurrency": "boots in flight at once",
        "warmup": "discarded warm-up rounds",
        "repeat": "measured rounds",
        "mem_mib": "guest RAM in MiB",
        "boot_timeout": "seconds before a boot counts as failed",
        "boot_mode": "snapshot (restore a booted template) | cold (boot the kernel every time)",
        "memory_sharing": "off | file (clones map the template's RAM file) | ksm | file+ksm",
        "image": "guest image: busybox (small default) | debian (curl, git, pip, the model SDKs)",
        "policy": "gateway policy: open | balanced | locked | path to a policy YAML",
        "guest_samples": "timed requests through the gateway from inside each sandbox",
        "proxy": "run the proxy bench: Locust rounds and hey capacity (--no-proxy: no Locust, hey or peer proxy)",
        "users": "Locust users per target",
        "spawn_rate": "Locust users started per second",
        "duration": "seconds of each target's window per round (paced Locust phase)",
        "rounds": "interleaved rounds of the paced phase (each target one window per round, shuffled order)",
        "capacity": "seconds of hey per capacity cell (0 skips the capacity phase)",
        "seed": "seed of the target orders and of the bootstrap intervals (default: drawn and recorded)",
        "workers": "local Locust worker processes under one master",
        "master_host": "bind the Locust master here and wait for remote workers (Locust distributed mode)",
        "targets": "comma list: direct,gateway,gateway-intercept,squid,tinyproxy,mitmproxy",
        "traffic": "comma list: model,download,blocked",
    },
)
def bench(
    c,
    sandboxes=None,
    backend=None,
    out=None,
    force=False,
    accel=None,
    concurrency=None,
    warmup=None,
    repeat=None,
    mem_mib=None,
    boot_timeout=None,
    boot_mode=None,
    memory_sharing=None,
    image=None,
    policy=None,
    guest_samples=None,
    proxy=True,
    users=None,
    spawn_rate=None,
    duration=None,
    rounds=None,
    capacity=None,
    seed=None,
    workers=None,
    master_host=None,
    targets=None,
    traffic=None,
):
    """Boot N sandboxes, measure boot phases and host RAM, write results.json and report.html.

    Defaults are in README; invoke.yaml's `bench:` section and INVOKE_BENCH_<FLAG> override them, a flag both.
    """
    from harness import cli

    cli.bench(
        c.config.bench,
        {
            "sandboxes": sandboxes,
            "backend": backend,
            "out": out,
            "force": force or None,
            "accel": accel,
            "concurrency": concurrency,
            "warmup": warmup,
            "repeat": repeat,
            "mem_mib": mem_mib,
            "boot_timeout": boot_timeout,
            "boot_mode": boot_mode,
            "memory_sharing": memory_sharing,
            "image": image,
            "policy": policy,
            "guest_samples": guest_samples,
            "proxy": proxy,
            "users": users,
            "spawn_rate": spawn_rate,
            "duration": duration,
            "rounds": rounds,
            "capacity": capacity,
            "seed": seed,
            "workers": workers,
            "master_host": master_host,
            "targets": targets,
            "traffic": traffic,
        },
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


@task(
    klass=VariadicTask,  # `runs` takes every word after `compare` that is not a flag (invoke has no *args)
    positional=["runs"],
    iterable=["runs"],
    auto_shortflags=False,
    help={
        "runs": "run directories (several; a comparison directory counts as its runs), as words after `compare`",
        "out": "comparison directory (default results/compare-<run-id>)",
        "baseline": "label of the run the others are compared with (default: the first)",
        "force": "empty --out first when it holds an earlier run or comparison (never a directory of other files)",
    },
)
def compare(c, runs, out=None, baseline=None, force=False):
    """Compare runs side by side: invoke compare RUN_DIR RUN_DIR... [--out DIR] [--baseline LABEL] [--force].

    Writes results.json and report.html into --out; the word after compare and every later one that is not a
    flag is a run directory, so compare goes last on a command line.
    """
    from harness import cli

    cli.compare(runs, out, baseline, force)


@task(help={"marker": "pytest -m expression, e.g. 'not qemu'"})
def test(c, marker=None):
    """Run the test suite."""
    c.run("python -m pytest" + (f" -m {marker!r}" if marker else ""), pty=False)


def _int(value):
    """Flags arrive as strings; a bad number becomes a clear error in harness.cli."""
    from harness import cli

    return cli.parse_number(value, int)


@task(help={"name": "busybox (the default: an initramfs) | debian (debootstrap, the SDKs, a squashfs root disk)"})
def image(c, name="busybox"):
    """Fetch the Debian guest kernel and build (or reuse) a guest image: the busybox initramfs, or debian."""
    from harness import cli

    cli.image(name)


@task(
    iterable=["set"],
    # Long flags only: an automatic -h for --help-options would read as --help.
    auto_shortflags=False,
    help={
        "name": "scenario folder under scenarios/ (isolation, retry-403, proxy-chaos, payments-service, ram-pressure, "
        "egress-conformance)",
        "set": "KEY=VALUE: set one of the scenario's options (repeatable); --help-options lists them",
        "help_options": "list the scenario's options (type, default, meaning) and the common flags, then exit",
        "out": "run directory (default results/<run-id>)",
        "force": "empty --out first when it holds an earlier run (never a directory of other files)",
        "backend": "sandbox backend module",
        "accel": "auto | kvm | tcg",
        "mem_mib": "guest RAM in MiB (a scenario may need more, and says so)",
        "boot_timeout": "seconds before a boot counts as failed",
        "boot_mode": "snapshot | cold",
        "memory_sharing": "off | file | ksm | file+ksm",
        "image": "guest image: busybox | debian",
        "sandboxes": "--set sandboxes=N (isolation, retry-403)",
        "leaky": "--set leaky=true (isolation: weaken the setup so the probes must turn red)",
        "file": "--set file=PATH (proxy-chaos: timeline YAML)",
        "agent": "--set agent=CMD (retry-403, payments-service: your agent instead of the built-in clients/fixer)",
        "fixer": "--set fixer=NAME (payments-service: reference | memory-only | probe-only | none)",
        "kube_context": "--set kube_context=CTX (payments-service: a real cluster instead of the embedded runtime)",
        "max_sandboxes": "--set max_sandboxes=N (ram-pressure: cap on sandboxes)",
        "duration": "--set duration_s=SECONDS (proxy-chaos: seconds of load at least)",
        "egress": "--set egress=NAMES (egress-conformance: gateway,squid,tinyproxy,mitmproxy; isolation: one peer)",
    },
)
def scenario(
    c,
    name,
    set=None,
    help_options=False,
    out=None,
    force=False,
    backend=None,
    accel=None,
    mem_mib=None,
    boot_timeout=None,
    boot_mode=None,
    memory_sharing=None,
    image=None,
    sandboxes=None,
    leaky=False,
    file=None,
    agent=None,
    fixer=None,
    kube_context=None,
    max_sandboxes=None,
    duration=None,
    egress=None,
):
    """Run one scenario and write results.json + report.html; exits non-zero when the scenario fails."""
    from harness import cli

    cli.scenario(
        name,
        c.config.scenario,
        flags={
            "out": out,
            "force": force or None,
            "backend": backend,
            "accel": accel,
            "mem_mib": mem_mib,
            "boot_timeout": boot_timeout,
            "boot_mode": boot_mode,
            "memory_sharing": memory_sharing,
            "image": image,
        },
        aliases={
            "sandboxes": sandboxes,
            "leaky": leaky,
            "file": file,
            "agent": agent,
            "fixer": fixer,
            "kube_context": kube_context,
            "max_sandboxes": max_sandboxes,
            "duration": duration,
            "egress": egress,
        },
        sets=set or [],
        help_options=help_options,
    )


ns = Collection(bench, gateway, clean, report, compare, test, image, scenario)
ns.configure(invoke_config())
