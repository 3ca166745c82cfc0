"""The isolation probes' judging logic, without booting anything: recorded outputs from each backend.

tests/scenarios/data/kernel_recordings.json holds what probes.KERNEL_COMMAND printed on the host itself,
in a bubblewrap jail, under gVisor (runsc, ptrace platform) and in a QEMU microVM, all on one machine, with
that machine's boot id, release and /proc/version and the host's uptime read around each run.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from harness.sandbox.base import Endpoint, ExecResult, GuestNetwork
from harness.sandbox.jail import jail_network
from harness.sandbox.qemu.vm import GUEST_NETWORK
from harness.scenario.loader import load_scenario_module

SCENARIO = load_scenario_module("isolation")
probes = SCENARIO.probes
honeytokens = SCENARIO.honeytokens
RECORDINGS = json.loads((Path(__file__).parent / "data" / "kernel_recordings.json").read_text())
HOST = probes.KernelView(RECORDINGS["host"]["boot_id"], RECORDINGS["host"]["release"], RECORDINGS["host"]["version"])
HOST_NETWORK = GuestNetwork(
    egress=Endpoint("127.0.0.1", 3128),
    egress_route="none",
    agent_port=40000,
    own_address="127.0.0.1",
    host_alias="127.0.0.1",
    resolver=None,
)
"""What the host backend's network looks like (its ports are per sandbox)."""


def recorded(case: str) -> tuple[Any, tuple[float, float]]:
    entry = RECORDINGS["cases"][case]
    return probes.parse_kernel_view(entry["output"]), tuple(entry["host_uptime"])


def judge(case: str) -> Any:
    inside, window = recorded(case)
    return probes.judge_kernel(inside, HOST, window)


@pytest.mark.parametrize(
    ("case", "passed", "signs"),
    [
        (
            "qemu",
            True,
            {"boot_id": "different", "proc_version": "different", "uptime": "its own", "log": "its own Linux kernel"},
        ),
        (
            "gvisor",
            True,
            {"boot_id": "absent", "release": "different", "proc_version": "different", "log": "gVisor"},
        ),
        ("bwrap", False, {"boot_id": "same", "release": "same", "proc_version": "same", "uptime": "the host's"}),
        ("host", False, {"boot_id": "same", "proc_version": "same", "log": "the host's kernel"}),
    ],
)
def test_kernel_judgement_of_each_backend(case: str, passed: bool, signs: dict[str, str]) -> None:
    verdict = judge(case)
    assert verdict.passed is passed, verdict.reason
    assert signs.items() <= verdict.facts["signs"].items(), verdict.facts["signs"]
    if passed:
        assert not verdict.facts["host_signs"] and len(verdict.facts["own_signs"]) >= 2
    else:
        assert verdict.facts["judgement"] == "the host's kernel"
        assert "the host's boot id" in verdict.facts["host_signs"]
        assert "the host's exact /proc/version" in verdict.facts["host_signs"]


def test_gvisor_is_named_as_the_sentry_not_the_host() -> None:
    verdict = judge("gvisor")
    assert "gVisor's sentry" in verdict.reason
    assert verdict.facts["guest_boot_id"] == "" and verdict.facts["guest_kernel"] == "4.4.0"
    assert "a kernel log naming gVisor" in verdict.facts["own_signs"]


def test_bwrap_shows_no_kernel_log_and_is_red_on_the_shared_signs() -> None:
    verdict = judge("bwrap")
    assert verdict.facts["signs"]["log"].startswith("nothing (dmesg: klogctl: Operation not permitted")
    assert verdict.reason.startswith("the host's own kernel")


def test_an_absent_boot_id_with_the_hosts_release_is_the_host_kernel_hiding_a_file() -> None:
    inside, window = recorded("bwrap")
    hidden = replace(inside, boot_id=None)
    verdict = probes.judge_kernel(hidden, HOST, window)
    assert verdict.passed is False
    assert any("file hidden" in sign for sign in verdict.facts["host_signs"])
    # Hiding /proc/version and the clock as well does not help: uname -r still answers with the host's release.
    masked = replace(hidden, version="Linux version 4.4.0 #1 SMP Sun Jan 10 15:06:54 PST 2016", uptime_s=3.0)
    verdict = probes.judge_kernel(masked, HOST, window)
    assert verdict.passed is False and verdict.facts["signs"]["proc_version"] == "different"


def test_a_vm_booting_the_hosts_exact_build_passes_on_its_own_boot_id_and_clock() -> None:
    inside, window = recorded("qemu")
    same_build = replace(
        inside, release=HOST.release, version=HOST.version, log=f"[    0.000000] {HOST.version}", uptime_s=2.5
    )
    verdict = probes.judge_kernel(same_build, HOST, window)
    assert verdict.passed is True, verdict.reason
    assert verdict.facts["same_build_booted_separately"] is True
    assert verdict.facts["signs"]["log"] == "its own Linux kernel"
    # Without its own clock the same build cannot be told from the host's kernel with a fake boot id.
    verdict = probes.judge_kernel(replace(same_build, uptime_s=None), HOST, window)
    assert verdict.passed is False and "the host's exact /proc/version" in verdict.facts["host_signs"]


def test_a_log_naming_the_host_kernel_is_red_even_with_everything_else_masked() -> None:
    inside, window = recorded("host")
    masked = replace(inside, boot_id=None, release="2.6.80", version=None, uptime_s=None)
    verdict = probes.judge_kernel(masked, HOST, window)
    assert verdict.passed is False
    assert "a kernel log naming the host's kernel" in verdict.facts["host_signs"]


def test_the_hosts_uptime_alone_is_a_host_sign() -> None:
    inside, window = recorded("gvisor")
    verdict = probes.judge_kernel(replace(inside, uptime_s=window[0] + 0.2), HOST, window)
    assert verdict.passed is False and verdict.facts["host_signs"] == ["the host's uptime"]


def test_gvisor_without_a_readable_log_still_has_two_signs_of_its_own() -> None:
    inside, window = recorded("gvisor")
    verdict = probes.judge_kernel(replace(inside, log="dmesg: klogctl: Operation not permitted"), HOST, window)
    assert verdict.passed is True
    assert verdict.facts["own_signs"] == ["a /proc/version of its own", "an uptime of its own"]


@pytest.mark.parametrize(
    "inside",
    [
        probes.KernelView(None, None, None),
        probes.KernelView(None, "4.4.0", None),
        probes.KernelView(None, "4.4.0", "Linux version 4.4.0 #1 SMP Sun Jan 10 15:06:54 PST 2016"),
    ],
    ids=["nothing readable", "release only", "one sign"],
)
def test_fewer_than_two_signs_of_its_own_cannot_vouch(inside: Any) -> None:
    verdict = probes.judge_kernel(inside, HOST, None)
    assert verdict.passed is False and verdict.facts["judgement"] == "unproven"
    assert verdict.reason.startswith("cannot tell it from the host's kernel")


def test_parse_kernel_view_of_the_gvisor_recording() -> None:
    inside, _ = recorded("gvisor")
    assert inside.boot_id is None and inside.release == "4.4.0" and inside.uptime_s == pytest.approx(0.07)
    assert inside.version is not None and inside.version.startswith("Linux version 4.4.0")
    assert "Starting gVisor" in inside.log
    assert probes.parse_kernel_view("") == probes.KernelView(None, None, None)


class RecordedTarget:
    """A target that answers every command with one recorded output."""

    id = "recorded"
    network = jail_network()

    def __init__(self, output: str) -> None:
        self.output = output.encode()

    def exec(self, command: str, timeout: float = 30.0, stdin: bytes = b"") -> ExecResult:
        return ExecResult(rc=0, stdout=self.output, stderr=b"", duration_s=0.01)


@pytest.mark.parametrize(("case", "passed"), [("qemu", True), ("gvisor", True), ("bwrap", False), ("host", False)])
def test_the_kernel_probe_reads_the_host_clock_around_its_exec(case: str, passed: bool) -> None:
    entry = RECORDINGS["cases"][case]
    readings = iter(entry["host_uptime"])
    host = probes.HostFacts(
        boot_id=HOST.boot_id,
        kernel_release=HOST.release,
        process_count=100,
        proc_version=HOST.version,
        clock=lambda: next(readings),
    )
    home = honeytokens.HoneyHome()
    env = probes.ProbeEnv(target=RecordedTarget(entry["output"]), home=home, traps={}, host=host)
    result = probes.run_probe(probes.PROBES_BY_ID["kernel"], env)
    assert result["passed"] is passed, result["reason"]
    assert result["facts"]["host_uptime_s"] == entry["host_uptime"]
    assert result["method"] and "gVisor" in result["method"]
    assert result["evidence"][0]["command"] == probes.KERNEL_COMMAND


# ---- processes, peers, dns: the pieces that read recorded output --------------------------------
BWRAP_PS = """PID   COMMAND
    1 /usr/bin/bwrap --unshare-all --die-with-parent --new-session --ro-bind /root/.cache/x / --proc /proc
    2 socat -t 86400 UNIX-LISTEN:/run/br/agent.sock,fork,unlink-early EXEC:/bin/sh /sbin/br-agent
   11 {br-agent} /bin/sh /sbin/br-agent
   12 {ps} sh /tmp/.br-agent.x/cmd
"""
QEMU_PS = """PID   COMMAND
    1 /bin/busybox init
    2 [kthreadd]
  102 /bin/nc -ll -p 7000 -e /sbin/br-agent
"""
GVISOR_PS = """PID   COMMAND
    1 socat -t 86400 UNIX-LISTEN:/run/br/agent.sock,fork,unlink-early EXEC:/bin/sh /sbin/br-agent
    5 {ps} sh /tmp/.br-agent.x/cmd
"""


@pytest.mark.parametrize(
    ("listing", "count", "supervisors"),
    [(BWRAP_PS, 4, [{"pid": 1, "name": "bwrap"}]), (QEMU_PS, 3, []), (GVISOR_PS, 2, [])],
    ids=["bwrap", "qemu", "gvisor"],
)
def test_process_list_and_visible_supervisor(listing: str, count: int, supervisors: list[dict[str, Any]]) -> None:
    rows = probes.parse_process_list(listing)
    assert len(rows) == count and rows[0][0] == 1
    assert probes.supervisors_in(rows) == supervisors
    assert probes.executable_name("{br-agent} /bin/sh /sbin/br-agent") == "sh"


def test_host_addresses_say_what_each_backend_aims_at() -> None:
    assert list(probes.host_addresses(jail_network())) == ["127.0.0.1"]
    assert list(probes.host_addresses(GUEST_NETWORK)) == ["127.0.0.1", "10.0.2.2"]
    shared = probes.host_addresses(HOST_NETWORK)
    assert list(shared) == ["127.0.0.1"] and "shares the host's network" in shared["127.0.0.1"]


def test_own_agent_control_is_the_socket_in_a_jail_and_the_port_elsewhere() -> None:
    ask = probes.agent_request("hostname")
    jail = probes.own_agent_path(jail_network(), ask)
    assert jail is not None and "/run/br/agent.sock" in jail[0] and "UNIX-CONNECT:/run/br/agent.sock" in jail[1]
    vm = probes.own_agent_path(GUEST_NETWORK, ask)
    assert vm is not None and vm[0].startswith("own agent at 10.0.2.15:7000")
    no_agent = replace(jail_network(), agent_socket=None)
    assert probes.own_agent_path(no_agent, ask) is None
    assert jail_network().agent_port is None


def test_peers_is_not_applicable_without_anything_to_aim_at() -> None:
    home = honeytokens.HoneyHome()
    host = probes.HostFacts(boot_id="", kernel_release="", process_count=0)
    env = probes.ProbeEnv(target=RecordedTarget(""), home=home, traps={}, host=host)
    assert probes.check_peers(env).passed is None
    env.peers = [probes.Peer("other", {})]
    verdict = probes.check_peers(env)
    assert verdict.passed is None and "names no host address or path" in verdict.reason


@pytest.mark.parametrize(
    ("rc", "text", "outcome"),
    [
        (1, "Server:\t\t10.255.255.53\n\n** server can't find example.com: NXDOMAIN\n", "a resolver answered NXDOMAIN"),
        (
            1,
            "nslookup: write to '127.0.0.1': Connection refused\n;; connection timed out; no servers could be reached",
            "no resolver reachable",
        ),
        (137, "", "no resolver answered within"),
    ],
    ids=["nxdomain", "refused", "killed"],
)
def test_lookup_outcomes_in_words(rc: int, text: str, outcome: str) -> None:
    assert probes.lookup_outcome(rc, text, []).startswith(outcome)
    assert probes.lookup_outcome(0, text, ["93.184.215.14"]) == "resolved to 93.184.215.14"


def test_every_probe_says_how_it_judges() -> None:
    assert all(p.method for p in probes.PROBES)
    assert probes.PROBES_BY_ID["processes"].proves.startswith("no host process visible (decoy absent)")


# ---- the field evaluation's own commands: judged from what curl, dig and the env grep printed ------------------
# The outputs are those of the host backend behind the gateway (the balanced policy) and of a --leaky set-up.
GATEWAY_DENY = (
    "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\nx-proxy-error: blocked-by-allowlist\r\n"
    'content-length: 60\r\n\r\n{"error": "blocked_by_policy", "decision": "deny", "host": "example.com"}'
)
CURL_DENIED = {
    "http (as written)": (0, "403"),
    "https (as written)": (56, "000"),
    "https: the proxy's answer to the CONNECT": (56, "403"),
    "http: what the user sees (-i, headers and body)": (0, GATEWAY_DENY),
}
CURL_ALLOWED = {
    "http (as written)": (0, "200"),
    "https (as written)": (60, "000"),
    "https: the proxy's answer to the CONNECT": (60, "200"),
    "http: what the user sees (-i, headers and body)": (0, "HTTP/1.1 200 OK\r\n\r\nexample domain"),
}


def test_field_probes_carry_the_evaluations_command_and_outcome() -> None:
    described = {p.id: p.describe() for p in probes.FIELD_PROBES}
    assert set(described) == {"field-env", "field-curl", "field-dig", "field-connect"}
    assert described["field-dig"]["field_evaluation"]["command"] == "dig example.com +short"
    assert "172.66.147.243" in described["field-dig"]["field_evaluation"]["outcome"]
    assert described["field-env"]["field_evaluation"]["command"] == 'env | grep -iE "anthropic|api_key"'
    assert "403" in described["field-curl"]["field_evaluation"]["outcome"]
    assert "succeeded" in described["field-connect"]["field_evaluation"]["outcome"]
    assert all(p.covered_by in probes.PROBES_BY_ID for p in probes.FIELD_PROBES)
    # The busybox probes stay, in front of the field ones.
    assert [p.id for p in probes.PROBES[: len(probes.BUSYBOX_PROBES)]] == [p.id for p in probes.BUSYBOX_PROBES]


@pytest.mark.parametrize(
    ("printed", "found"),
    [
        ("env\ngrep\n", {"env", "grep"}),  # busybox's shell runs its applets as builtins
        ("/usr/bin/curl\n/usr/bin/timeout\n", {"curl", "timeout"}),
        ("/usr/bin/dig\n", {"dig"}),
        ("", set()),
    ],
)
def test_tools_are_read_from_command_v(printed: str, found: set[str]) -> None:
    assert probes.tools_found(printed) == found


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("ANTHROPIC_API_KEY=proxy-managed", "sentinel"),
        ("ANTHROPIC_API_KEY=", "empty"),
        ("ANTHROPIC_API_KEY=abc123", "key"),
        ("OPENAI_API_KEY=not-a-sentinel", "key"),
        ("MY_HELPER=sk-ant-api03-aaaaaaaaaaaaaaaaaaaaaaaa", "key"),
        ("ANTHROPIC_BASE_URL=http://127.0.0.1:3128", "other"),
    ],
)
def test_env_grep_lines_are_classified(line: str, kind: str) -> None:
    assert probes.classify_env_line(line, marked=False) == kind


def test_env_grep_judgement() -> None:
    assert probes.judge_env_grep(1, []).passed is True
    assert probes.judge_env_grep(1, []).observed == "grep exit 1, printed nothing"
    sentinel = probes.judge_env_grep(0, [("ANTHROPIC_API_KEY", "sentinel")])
    assert sentinel.passed is True and "<the sentinel>" in sentinel.observed
    red = probes.judge_env_grep(0, [("ANTHROPIC_API_KEY", "honeytoken"), ("ANTHROPIC_BASE_URL", "other")])
    assert red.passed is False and red.facts["keys"] == ["ANTHROPIC_API_KEY"]


def test_curl_codes_read_the_write_out() -> None:
    assert probes.curl_codes("403") == (403, None)
    assert probes.curl_codes("403 000") == (403, 0)
    assert probes.curl_codes("") == (None, None)


def test_curl_to_a_blocked_domain_denied_by_the_proxy_passes() -> None:
    verdict = probes.judge_curl_blocked(CURL_DENIED, arrivals=0)
    assert verdict.passed is True, verdict.reason
    assert verdict.facts["http"] == {"curl_exit": 0, "http_code": "403"}
    assert verdict.facts["https_connect"]["http_connect"] == "403"
    assert verdict.facts["what_the_user_sees"]["headers"]["x-proxy-error"] == "blocked-by-allowlist"
    assert verdict.observed.startswith("http: exit 0, HTTP 403; https: exit 56")


def test_curl_to_a_blocked_domain_is_red_when_anything_gets_through() -> None:
    allowed = probes.judge_curl_blocked(CURL_ALLOWED, arrivals=2)
    assert allowed.passed is False and "stand-in logged 2" in allowed.reason and "opened a tunnel" in allowed.reason
    # A proxy that answers 403 while the request still reached the host is a leak too.
    assert probes.judge_curl_blocked(CURL_DENIED, arrivals=1).passed is False


@pytest.mark.parametrize(
    ("rc", "printed", "passed", "outcome"),
    [
        (0, "172.66.147.243\n", False, None),
        (0, "example.com.cdn.net.\n104.18.26.120\n", False, None),
        (0, "", True, "a resolver answered with no address"),
        (9, ";; communications error to 10.0.2.3#53: timed out\n;; no servers could be reached\n", True, "no resolver"),
        (137, "", True, f"within {probes.DIG_TIMEOUT_S} s"),
        (0, "some.cname.only.\n", True, "a resolver answered with no address"),
    ],
)
def test_dig_judgement(rc: int, printed: str, passed: bool, outcome: str | None) -> None:
    verdict = probes.judge_dig(rc, printed)
    assert verdict.passed is passed, verdict.reason
    if outcome is not None:
        assert outcome in verdict.facts["outcome"]
    else:
        assert verdict.facts["addresses"] and "resolved to" in verdict.observed


@pytest.mark.parametrize(
    ("parts", "hits", "passed", "says"),
    [
        ({22: (56, "403 000"), 9999: (56, "403 000"), 443: (60, "200 000")}, 0, True, "refused the CONNECTs"),
        ({22: (0, "200 200"), 9999: (56, "403 000"), 443: (60, "200 000")}, 1, False, "not port-scoped"),
        ({22: (56, "403 000"), 9999: (56, "403 000"), 443: (60, "200 000")}, 1, False, "not port-scoped"),
        ({22: (56, "403 000"), 9999: (56, "403 000"), 443: (56, "403 000")}, 0, False, "control"),
        ({22: (7, "000 000"), 9999: (7, "000 000"), 443: (7, "000 000")}, 0, False, "control"),
    ],
)
def test_connect_judgement(parts: dict[int, tuple[int, str]], hits: int, passed: bool, says: str) -> None:
    verdict = probes.judge_connect(parts, hits)
    assert verdict.passed is passed and says in verdict.reason, verdict.reason
    assert verdict.observed.startswith(":22 CONNECT answered")
