"""Egress policy: rules by host, wildcard, host:port and CIDR; deny wins; default deny.

Rule strings (the `allow:` / `deny:` value of a rule in YAML):
  example.com            exact name                       (ports: default_ports, i.e. 443 only)
  example.com:22         exact name on one port           (`:*` means every port)
  *.example.com          exactly one label below example.com (not example.com itself)
  **.example.com         any depth below example.com      (not example.com itself)
  **                     every host name (never an IP literal)
  10.0.0.0/8, 1.2.3.4    CIDR / single address; IP literals match only these rules
  [fd00::/8]:443         IPv6 CIDR with a port

A rule may also carry `ports: [80, 443, "8000-8100"]`, `methods: [GET]` and `paths: ["/v1/**"]`.
Method/path rules can only be checked where the gateway sees the request (plain http, or a
host whose TLS it terminates), so a host with such rules is always intercepted.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from harness.gateway.credentials import CredentialSpec
from harness.gateway.errors import SetupError, check_keys
from harness.gateway.loopbreaker import DEFAULT_LOOP_ANSWER, LOOP_ANSWERS
from harness.gateway.names import HostError, canonical_address, is_ip, normalise_host, parse_port

Action = Literal["allow", "deny"]
DENY_MODES = ("403", "403-explained", "reset")
DEFAULT_DENY_MODE = "403-explained"
# "Allow github.com" means github.com:443 and nothing else (FINDINGS probe 6).
DEFAULT_RULE_PORTS: tuple[int, ...] = (443,)
DEFAULT_LOOP_THRESHOLD = 5
DEFAULT_LOOP_WINDOW_S = 60.0
DEFAULT_DENY_RULE = "default-deny"
PRESETS = ("open", "balanced", "locked")
DECISION_CACHE_SIZE = 4096
LOOPBACK_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
"""The host's own loopback, in both families (names.canonical_address already made 0.0.0.0 and :: loopback)."""


class PolicyError(SetupError):
    """A policy file that cannot be loaded; raised at start-up, never at request time."""


@dataclass(frozen=True)
class PortSet:
    """A set of ports as ranges; `any_port` covers 1..65535."""

    ranges: tuple[tuple[int, int], ...]
    any_port: bool = False

    def __contains__(self, port: int) -> bool:
        return self.any_port or any(lo <= port <= hi for lo, hi in self.ranges)

    def describe(self) -> str:
        if self.any_port:
            return "*"
        return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)


def parse_ports(items: list[Any] | tuple[Any, ...], where: str = "ports") -> PortSet:
    ranges: list[tuple[int, int]] = []
    for item in items:
        text = str(item).strip()
        if text == "*":
            return PortSet((), any_port=True)
        lo_s, sep, hi_s = text.partition("-")
        try:
            lo = parse_port(lo_s)
            hi = parse_port(hi_s) if sep else lo
        except HostError as exc:
            raise PolicyError(f"{where}: {exc} (a port is 1-65535, a range 8000-8100, or '*')") from exc
        if hi < lo:
            raise PolicyError(f"{where}: bad port range {text!r}")
        ranges.append((lo, hi))
    return PortSet(tuple(ranges))


@dataclass(frozen=True)
class HostPattern:
    """The host part of a rule. kind: exact | one (`*.`) | any (`**.`) | all (`**`) | cidr."""

    kind: str
    value: str = ""
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None

    @property
    def covers_loopback(self) -> bool:
        """True for a CIDR that holds a loopback address of either family."""
        return self.network is not None and any(self.network.overlaps(lo) for lo in LOOPBACK_NETWORKS)

    def matches(self, host: str, host_is_ip: bool) -> bool:
        if self.kind == "cidr":
            return host_is_ip and self.network is not None and ipaddress.ip_address(host) in self.network
        if host_is_ip:
            return False
        if self.kind == "exact":
            return host == self.value
        if self.kind == "all":
            return True
        suffix = "." + self.value
        if not host.endswith(suffix):
            return False
        return self.kind == "any" or "." not in host[: -len(suffix)]


def parse_host_pattern(text: str) -> HostPattern:
    if text == "**":
        return HostPattern("all")
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if "/" in bare or _looks_like_ip(bare):
        try:
            return HostPattern("cidr", network=canonical_network(ipaddress.ip_network(bare, strict=False)))
        except ValueError as exc:
            raise PolicyError(f"bad CIDR {text!r}") from exc
    for prefix, kind in (("**.", "any"), ("*.", "one")):
        if text.startswith(prefix):
            return HostPattern(kind, _normalise_pattern_name(text[len(prefix) :]))
    if "*" in text:
        raise PolicyError(f"wildcards are only allowed as a leading '*.' or '**.': {text!r}")
    return HostPattern("exact", _normalise_pattern_name(text))


def canonical_network(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A rule's network in the form destinations are compared in (names.canonical_address): a range of
    IPv4-mapped addresses is the IPv4 range, and a single address is its canonical address."""
    if network.num_addresses == 1:
        return ipaddress.ip_network(canonical_address(network.network_address))
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(mapped):
        base = network.network_address.ipv4_mapped
        assert base is not None
        return ipaddress.IPv4Network((base, network.prefixlen - 96))
    return network


def _looks_like_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _normalise_pattern_name(name: str) -> str:
    try:
        return normalise_host(name)
    except HostError as exc:
        raise PolicyError(str(exc)) from exc


def split_rule_target(text: str) -> tuple[str, str | None]:
    """Split a rule target into host pattern and optional port spec ('443', '*', '80-90')."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise PolicyError(f"bad rule target {text!r}")
        rest = text[end + 1 :]
        return text[: end + 1], (rest[1:] if rest.startswith(":") else None)
    if text.count(":") > 1:  # bare IPv6 / IPv6 CIDR without a port
        return text, None
    host, sep, port = text.partition(":")
    return host, (port if sep else None)


_PATH_TOKEN_RE = re.compile(r"\*\*|\*|[^*]+")


@lru_cache(maxsize=256)
def compile_path_glob(glob: str) -> re.Pattern[str]:
    """`*` matches within one path segment, `**` across segments."""
    parts = []
    for token in _PATH_TOKEN_RE.findall(glob):
        if token == "**":
            parts.append(".*")
        elif token == "*":
            parts.append("[^/]*")
        else:
            parts.append(re.escape(token))
    return re.compile("^" + "".join(parts) + "$")


@dataclass(frozen=True)
class Rule:
    action: Action
    target: str
    host: HostPattern
    ports: PortSet
    methods: frozenset[str] | None = None
    paths: tuple[re.Pattern[str], ...] | None = None
    name: str = ""

    @property
    def conditional(self) -> bool:
        return self.methods is not None or self.paths is not None

    def matches_dest(self, host: str, host_is_ip: bool, port: int, loopback: bool = False) -> bool:
        """`loopback`: host is a loopback address. Loopback is one place, the host itself, whatever the
        family: a deny rule that covers any loopback address (127.0.0.0/8, [::1]) covers them all."""
        if port not in self.ports:
            return False
        if loopback and self.action == "deny" and self.host.covers_loopback:
            return True
        return self.host.matches(host, host_is_ip)

    def matches_request(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self.paths is None or any(p.match(path) for p in self.paths)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str
    # True when the decision depends on method/path, so the gateway must see the requests.
    needs_requests: bool = False


@dataclass
class Policy:
    name: str
    rules: list[Rule]
    deny_mode: str = DEFAULT_DENY_MODE
    loop_threshold: int = DEFAULT_LOOP_THRESHOLD
    loop_window_s: float = DEFAULT_LOOP_WINDOW_S
    loop_answer: str = DEFAULT_LOOP_ANSWER  # "429" | "200-terminal" (loopbreaker.py)
    dns: bool = False
    credentials: list[CredentialSpec] | None = None
    source: str = ""
    _cache: dict[tuple[str, int], Decision] = field(default_factory=dict, repr=False)
    _rules_for: dict[tuple[str, int], list[Rule]] = field(default_factory=dict, repr=False)

    def _matching(self, host: str, port: int) -> list[Rule]:
        """The rules whose destination covers host:port, remembered per destination like the decisions:
        a keep-alive client sends many requests to one host, and only method and path differ."""
        key = (host, port)
        cached = self._rules_for.get(key)
        if cached is not None:
            return cached
        host_is_ip = is_ip(host)
        loopback = host_is_ip and ipaddress.ip_address(host).is_loopback
        matching = [r for r in self.rules if r.matches_dest(host, host_is_ip, port, loopback)]
        if len(self._rules_for) >= DECISION_CACHE_SIZE:
            self._rules_for.clear()
        self._rules_for[key] = matching
        return matching

    def check_destination(self, host: str, port: int) -> Decision:
        """Decide a connection to host:port before any request is seen (CONNECT)."""
        key = (host, port)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        decision = self._decide_destination(self._matching(host, port))
        if len(self._cache) >= DECISION_CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = decision
        return decision

    @staticmethod
    def _decide_destination(matching: list[Rule]) -> Decision:
        for rule in matching:
            if rule.action == "deny" and not rule.conditional:
                return Decision(False, rule.name)
        conditional = any(r.conditional for r in matching)
        for rule in matching:
            if rule.action == "allow" and not rule.conditional:
                return Decision(True, rule.name, needs_requests=conditional)
        for rule in matching:
            if rule.action == "allow":
                return Decision(True, rule.name, needs_requests=True)
        return Decision(False, DEFAULT_DENY_RULE)

    def check_request(self, host: str, port: int, method: str, path: str) -> Decision:
        """Decide one request whose method and (normalised) path the gateway can see."""
        matching = [r for r in self._matching(host, port) if r.matches_request(method, path)]
        for rule in matching:
            if rule.action == "deny":
                return Decision(False, rule.name)
        if matching:  # only allow rules are left
            return Decision(True, matching[0].name)
        return Decision(False, DEFAULT_DENY_RULE)

    def names_allowed(self, host: str) -> bool:
        """True when some port on host could be allowed: the DNS resolver's question."""
        host_is_ip = is_ip(host)
        for rule in self.rules:
            deny_all_ports = rule.action == "deny" and not rule.conditional and rule.ports.any_port
            if deny_all_ports and rule.host.matches(host, host_is_ip):
                return False
        return any(r.action == "allow" and r.host.matches(host, host_is_ip) for r in self.rules)


def normalise_path(raw: str) -> str:
    """The path as policy sees it and as it is sent: no query, dot-segments resolved, unreserved escapes
    decoded.

    Raises HostError for spellings whose meaning upstreams disagree on (encoded '/', '\\', NUL, and a
    dot-segment carrying ';' parameters).
    """
    path = raw.split("?", 1)[0].split("#", 1)[0] or "/"
    lowered = path.lower()
    if any(bad in lowered for bad in ("%2f", "%5c", "%00", "\\")):
        raise HostError("ambiguous encoding in path")
    path = re.sub(r"%([0-9A-Fa-f]{2})", _decode_unreserved, path)
    # "..;x" is a plain segment here, but ".." to servers that cut path parameters (Tomcat, Jetty).
    if ";" in path and any(seg.split(";", 1)[0] in (".", "..") for seg in path.split("/") if ";" in seg):
        raise HostError("ambiguous dot-segment with parameters in path")
    normal = posixpath.normpath(path)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    if path.endswith("/") and normal != "/":
        normal += "/"
    return normal if normal.startswith("/") else "/" + normal


def _decode_unreserved(m: re.Match[str]) -> str:
    char = chr(int(m.group(1), 16))
    return char if char.isalnum() or char in "-._~" else m.group(0).upper()


POLICY_KEYS = ("name", "deny_mode", "loop_breaker", "dns", "default_ports", "rules", "credentials")
"""The keys a policy file may have at its top level; any other is an error naming the closest."""
RULE_KEYS = ("allow", "deny", "ports", "methods", "paths", "name")
"""The keys of one rule."""
LOOP_KEYS = ("threshold", "window_s", "answer")
"""The keys of `loop_breaker:`."""
DNS_KEYS = ("enabled",)
"""The keys of `dns:`."""


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"{where} must be a mapping (key: value), got {value!r}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise PolicyError(f"{where} must be a list, e.g. [a, b], got {value!r}")
    return value


def _whole_number(value: Any, where: str) -> int:
    # bool is an int to Python, never to a reader of the file.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PolicyError(f"{where} must be a whole number >= 0, got {value!r}")
    return value


def _positive_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise PolicyError(f"{where} must be a number of seconds > 0, got {value!r}")
    return float(value)


def _strings(value: Any, where: str) -> list[str]:
    items = _list(value, where)
    for item in items:
        if not isinstance(item, str) or not item:
            raise PolicyError(f"{where} must be a list of strings, got {item!r} in it")
    return items


def parse_rule(entry: Any, default_ports: PortSet, index: int, policy: str = "policy") -> Rule:
    """One entry of `rules:`; `policy` names the file in error messages."""
    where = f"{policy}: rule {index + 1}"
    entry = _mapping(entry, where)
    check_keys(entry, RULE_KEYS, where, PolicyError)
    actions = [a for a in ("allow", "deny") if a in entry]
    if len(actions) != 1:
        raise PolicyError(f"{where} needs exactly one of allow/deny: {entry!r}")
    action: Action = actions[0]  # type: ignore[assignment]
    if not isinstance(entry[action], str) or not entry[action].strip():
        raise PolicyError(f"{where}: {action} must name a host, host:port or CIDR, got {entry[action]!r}")
    target = entry[action]
    where = f"{where} ({action}: {target})"
    host_text, port_text = split_rule_target(target)
    host = parse_host_pattern(host_text)
    if port_text is not None and "ports" in entry:
        raise PolicyError(f"{where}: give the port in the target or in ports, not both")
    if port_text is not None:
        ports = parse_ports([port_text], where)
    elif "ports" in entry:
        ports = parse_ports(_list(entry["ports"], f"{where}: ports"), f"{where}: ports")
    else:
        ports = default_ports
    methods = (
        frozenset(m.upper() for m in _strings(entry["methods"], f"{where}: methods")) if "methods" in entry else None
    )
    paths = None
    if "paths" in entry:
        globs = _strings(entry["paths"], f"{where}: paths")
        if any(not g.startswith("/") for g in globs):
            raise PolicyError(f"{where}: every path must start with '/', got {globs!r}")
        paths = tuple(compile_path_glob(g) for g in globs)
    name = entry.get("name") or f"{action} {host_text}:{ports.describe()}"
    if not isinstance(name, str):
        raise PolicyError(f"{where}: name must be a string, got {name!r}")
    return Rule(action, target, host, ports, methods, paths, name)


def policy_from_dict(data: Any, source: str = "") -> Policy:
    """Build a Policy from parsed YAML; every key and value is checked, so a typo is an error, not a default."""
    where = f"policy {source}" if source else "policy"
    if data is None:
        raise PolicyError(f"{where} is empty; it needs at least `rules:`")
    data = _mapping(data, where)
    check_keys(data, POLICY_KEYS, where, PolicyError)
    default_ports = parse_ports(
        _list(data.get("default_ports", list(DEFAULT_RULE_PORTS)), f"{where}: default_ports"), f"{where}: default_ports"
    )
    rules = [
        parse_rule(e, default_ports, i, where) for i, e in enumerate(_list(data.get("rules") or [], f"{where}: rules"))
    ]
    deny_mode = str(data.get("deny_mode", DEFAULT_DENY_MODE))
    if deny_mode not in DENY_MODES:
        raise PolicyError(f"{where}: deny_mode must be one of {', '.join(DENY_MODES)}, got {deny_mode!r}")
    loop = _mapping(data.get("loop_breaker") or {}, f"{where}: loop_breaker")
    check_keys(loop, LOOP_KEYS, f"{where}: loop_breaker", PolicyError)
    # YAML reads a bare 429 as an int: accept it as the string it names.
    loop_answer = str(loop.get("answer", DEFAULT_LOOP_ANSWER))
    if loop_answer not in LOOP_ANSWERS:
        raise PolicyError(f"{where}: loop_breaker answer must be one of {', '.join(LOOP_ANSWERS)}, got {loop_answer!r}")
    dns = _mapping(data.get("dns") or {}, f"{where}: dns")
    check_keys(dns, DNS_KEYS, f"{where}: dns", PolicyError)
    if not isinstance(dns.get("enabled", False), bool):
        raise PolicyError(f"{where}: dns.enabled must be true or false, got {dns['enabled']!r}")
    credentials = data.get("credentials")
    if credentials is not None:
        credentials = [
            CredentialSpec.from_dict(_mapping(c, f"{where}: credential {i + 1}"), f"{where}: credential {i + 1}")
            for i, c in enumerate(_list(credentials, f"{where}: credentials"))
        ]
    name = data.get("name", source or "policy")
    return Policy(
        name=str(name),
        rules=rules,
        deny_mode=deny_mode,
        loop_threshold=_whole_number(loop.get("threshold", DEFAULT_LOOP_THRESHOLD), f"{where}: loop_breaker.threshold"),
        loop_window_s=_positive_number(loop.get("window_s", DEFAULT_LOOP_WINDOW_S), f"{where}: loop_breaker.window_s"),
        loop_answer=loop_answer,
        dns=dns.get("enabled", False),
        credentials=credentials,
        source=source,
    )


def preset_path(name: str) -> Path:
    return Path(str(resources.files("harness.gateway") / "presets" / f"{name}.yaml"))


def load_policy(policy: str | Path) -> Policy:
    """Load a preset by name ('open', 'balanced', 'locked') or a YAML file by path."""
    path = preset_path(str(policy)) if str(policy) in PRESETS else Path(policy)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"cannot read policy {path}: {exc}") from exc
    return policy_from_dict(data, source=str(path))
