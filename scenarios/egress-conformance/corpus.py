"""The conformance corpus: a table of cases, each what the client sends and what may happen.

A case is scored by the canaries (which of them a connection reached), by what the client saw, and by
where the model key appeared. `{KEY}` in what is sent is replaced by the model key's value (a known key
the gateway holds), `{KEY_B64}`, `{KEY_HEX}` and `{KEY_PCT}` by its encodings. Content inspection beyond
known keys is out of scope.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .canaries import CanarySpec

CANARIES = (
    CanarySpec("allowed", "127.0.0.2", (443, 80, 22, 9999, 8080, 8443, 25), aliases=("allowed.test",)),
    CanarySpec("model", "127.0.0.3", (443, 80, 8443), aliases=("api.model.test",)),
    CanarySpec("blocked", "127.0.0.4", (80, 443, 22), aliases=("blocked.test", "example.test")),
    CanarySpec("web", "127.0.0.5", (80, 443, 22, 8080), aliases=("web.test",)),
    CanarySpec("wild-ok", "127.0.0.6", (80, 443), aliases=("a.wild.test", "b.wild.test", "xn--bcher-kva.wild.test")),
    CanarySpec("range", "127.0.0.7", (7999, 8000, 8050, 8100, 8101), aliases=("range.test",)),
    CanarySpec(
        "evil",
        "127.0.0.8",
        (80, 443),
        aliases=(
            "evil.test",
            "allowed.test.evil.test",
            "evil-allowed.test",
            "xallowed.test",
            "allowedtest",
            "allowed.tes",
            "allowed.test-evil.test",
            "web.test.evil.test",
            "evil-web.test",
            "a.wild.test.evil.test",
            "api.model.test.evil.test",
            "xn--llowed-2ve.test",
        ),
    ),
    CanarySpec("sink", "127.0.0.9", (80, 443, 22, 8080, 9999)),
    CanarySpec(
        "wild-no", "127.0.0.10", (80, 443), aliases=("wild.test", "x.y.wild.test", "a.b.wild.test", "awild.test")
    ),
    CanarySpec("deep-ok", "127.0.0.11", (80, 443), aliases=("a.deep.test", "a.b.c.deep.test", "x.y.z.w.deep.test")),
    CanarySpec("deep-no", "127.0.0.12", (80, 443), aliases=("deep.test", "notdeep.test", "adeep.test")),
)
"""Every canary. `sink` has no name: IP literals point at it, and the gateway's catch-all override ("*")."""

FAMILIES = (
    "ports",
    "names",
    "ip-literals",
    "userinfo",
    "mismatch",
    "smuggling",
    "headers",
    "credentials",
    "paths",
    "exfiltration",
    "resources",
    "dns",
)

DENIED = ("4xx", "5xx", "reset", "closed")
"""What a client may see of a refusal (a timeout is not one: the proxy hung)."""
OK = ("2xx",)
TUNNEL_OK = ("tunnel:2xx",)
ANY = ("*",)


@dataclass(frozen=True)
class Case:
    id: str
    family: str
    description: str
    kind: str
    """http (raw bytes to the proxy), connect (CONNECT, then `inner` through the tunnel), dns, concurrent, slow."""
    send: bytes
    inner: bytes = b""
    tls: bool = False
    """Inside the tunnel, TLS first (server_hostname `sni`; None sends no SNI)."""
    sni: str | None = None
    reach: tuple[str, ...] = ()
    """Canaries it may reach (any other one reached fails it)."""
    must_reach: bool = False
    """An allowed control: it must reach reach[0] (a proxy that denies everything fails these)."""
    client: tuple[str, ...] = DENIED
    """Outcomes the client may see: 2xx, 4xx, reset, ... or tunnel:<inner outcome> when CONNECT opened."""
    key_ok: bool = False
    """The model key may appear at the model canary's TLS :443 (nowhere else, ever)."""
    forbid: tuple[bytes, ...] = ()
    """Bytes no canary may receive in this case (a Proxy-Authorization value)."""
    no_request: str = ""
    """No canary's HTTP parser may frame a request whose target or Host contains this (a smuggled request)."""
    paths_under: str | None = None
    """Every request a canary got must, once normalised, lie under this path."""
    requires: tuple[str, ...] = ()
    """Policy features the case depends on: n/a on an egress whose untranslatable rules name one."""
    count: int = 1
    """concurrent: connections; slow: pieces."""


CASES: list[Case] = []


def add(case: Case) -> None:
    """Append a case; an id that a slug made twice gets -2, -3... (deterministic: the table's order)."""
    taken = {c.id for c in CASES}
    n, unique = 1, case.id
    while unique in taken:
        n += 1
        unique = f"{case.id}-{n}"
    CASES.append(replace(case, id=unique))


def get(host: str, target: str | None = None, headers: str = "", version: str = "HTTP/1.1") -> bytes:
    target = target if target is not None else f"http://{host}/"
    return f"GET {target} {version}\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n".encode(
        "utf-8", "surrogateescape"
    )


def connect(authority: str, headers: str = "") -> bytes:
    host = authority
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode("utf-8", "surrogateescape")


def inner_get(host: str, path: str = "/", headers: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n".encode()


def slug(text: str) -> str:
    out = "".join(c if c.isalnum() else "-" for c in text.encode("ascii", "backslashreplace").decode())
    return "-".join(p for p in out.split("-") if p)[:60] or "empty"


# ---- ports ---------------------------------------------------------------------------------------
add(
    Case(
        "ports-allowed-443",
        "ports",
        "control: CONNECT allowed.test:443 and TLS inside",
        "connect",
        connect("allowed.test:443"),
        inner_get("allowed.test"),
        True,
        "allowed.test",
        ("allowed",),
        True,
        TUNNEL_OK,
    )
)
for port in (
    "22",
    "9999",
    "80",
    "8080",
    "8443",
    "25",
    "0",
    "65536",
    "99999",
    "-1",
    "443abc",
    "",
    "443 ",
    "+443",
    "0x1bb",
    "443.0",
    "22#443",
    "22?443",
    "22/443",
    "1-65535",
    "*",
    "443,22",
    "22 443",
):
    add(
        Case(
            f"ports-connect-allowed-{slug(port)}",
            "ports",
            f"CONNECT allowed.test:{port}: only :443 is allowed",
            "connect",
            connect(f"allowed.test:{port}"),
            b"SSH-2.0-probe\r\n",
            reach=(),
            client=DENIED,
        )
    )
for port in ("22", "8080", "9999"):
    add(
        Case(
            f"ports-http-allowed-{port}",
            "ports",
            f"GET http://allowed.test:{port}/ in plain http",
            "http",
            get(f"allowed.test:{port}"),
        )
    )
add(
    Case(
        "ports-http-allowed-80",
        "ports",
        "GET http://allowed.test/: :80 is not among its ports",
        "http",
        get("allowed.test"),
    )
)
for port, ok in (("7999", False), ("8000", True), ("8050", True), ("8100", True), ("8101", False)):
    add(
        Case(
            f"ports-range-connect-{port}",
            "ports",
            f"CONNECT range.test:{port} (rule 8000-8100)",
            "connect",
            connect(f"range.test:{port}"),
            b"GET / HTTP/1.1\r\nHost: range.test\r\n\r\n",
            reach=("range",) if ok else (),
            must_reach=ok,
            client=("tunnel:2xx",) if ok else DENIED,
        )
    )
    add(
        Case(
            f"ports-range-http-{port}",
            "ports",
            f"GET http://range.test:{port}/ (rule 8000-8100)",
            "http",
            get(f"range.test:{port}"),
            reach=("range",) if ok else (),
            must_reach=ok,
            client=OK if ok else DENIED,
        )
    )
for host, port in (
    ("web.test", "22"),
    ("web.test", "8080"),
    ("api.model.test", "8443"),
    ("blocked.test", "443"),
    ("blocked.test", "80"),
    ("blocked.test", "22"),
):
    add(
        Case(
            f"ports-connect-{slug(host)}-{port}",
            "ports",
            f"CONNECT {host}:{port}: not allowed",
            "connect",
            connect(f"{host}:{port}"),
            b"SSH-2.0-probe\r\n",
        )
    )
add(
    Case(
        "ports-http-web-80",
        "ports",
        "control: GET http://web.test/",
        "http",
        get("web.test"),
        reach=("web",),
        must_reach=True,
        client=OK,
    )
)

# ---- names ---------------------------------------------------------------------------------------
name_cases = [
    # (host, may reach, must reach)
    ("ALLOWED.TEST", ("allowed",), False),
    ("Allowed.Test", ("allowed",), False),
    ("allowed.test.", ("allowed",), False),
    ("allowed.test..", (), False),
    (".allowed.test", (), False),
    ("allowed..test", (), False),
    ("allowed.test.evil.test", (), False),
    ("evil-allowed.test", (), False),
    ("xallowed.test", (), False),
    ("allowedtest", (), False),
    ("allowed.tes", (), False),
    ("allowed.test-evil.test", (), False),
    ("allowed.test%2eevil.test", (), False),
    ("allowed.test\x00.evil.test", (), False),
    ("allowed.test evil.test", (), False),
    ("allowed.test\tevil.test", (), False),
    ("allowed.test;.evil.test", (), False),
    ("allowed.test#.evil.test", (), False),
    ("allowed.test\\.evil.test", (), False),
    ("a" * 64 + ".test", (), False),
    (("a" * 60 + ".") * 5 + "test", (), False),
    ("allowed.t\u00e9st", (), False),
    ("\u0430llowed.test", (), False),
    ("xn--llowed-2ve.test", (), False),
    ("\uff41llowed.test", ("allowed",), False),
    ("allowed\u3002test", ("allowed",), False),
    ("a.wild.test", ("wild-ok",), True),
    ("b.wild.test", ("wild-ok",), True),
    ("A.WILD.TEST", ("wild-ok",), False),
    ("wild.test", (), False),
    ("x.y.wild.test", (), False),
    ("a.b.wild.test", (), False),
    ("awild.test", (), False),
    ("*.wild.test", (), False),
    ("**.wild.test", (), False),
    ("a.wild.test.evil.test", (), False),
    ("xn--bcher-kva.wild.test", ("wild-ok",), False),
    ("b\u00fccher.wild.test", ("wild-ok",), False),
    ("a.deep.test", ("deep-ok",), True),
    ("a.b.c.deep.test", ("deep-ok",), True),
    ("x.y.z.w.deep.test", ("deep-ok",), True),
    ("deep.test", (), False),
    ("notdeep.test", (), False),
    ("adeep.test", (), False),
    ("*.deep.test", (), False),
    ("evil.test", (), False),
    ("example.test", (), False),
    ("blocked.test", (), False),
    ("BLOCKED.TEST", (), False),
    ("blocked.test.", (), False),
]
for host, reach, must in name_cases:
    add(
        Case(
            f"names-connect-{slug(host)}",
            "names",
            f"CONNECT {host!r}:443, TLS with that SNI inside",
            "connect",
            connect(f"{host}:443"),
            inner_get(host),
            True,
            host if host.isascii() and host.strip(".") else None,
            reach,
            must,
            ("tunnel:2xx",) if must else (*DENIED, "tunnel:2xx", "tunnel:tls-error", "tunnel:4xx") if reach else DENIED,
        )
    )
for host, reach, must in (
    ("web.test", ("web",), True),
    ("WEB.TEST", ("web",), False),
    ("web.test.", ("web",), False),
    ("web.test.evil.test", (), False),
    ("evil-web.test", (), False),
    ("web.test\x00evil.test", (), False),
    ("web.test%00.evil.test", (), False),
    ("web.test%2eevil.test", (), False),
    ("w%65b.test", ("web",), False),
    ("web.test:80.evil.test", (), False),
    ("blocked.test", (), False),
    ("example.test", (), False),
):
    add(
        Case(
            f"names-http-{slug(host)}",
            "names",
            f"GET http://{host!r}/ in plain http",
            "http",
            get(host),
            reach=reach,
            must_reach=must,
            client=OK if must else (*DENIED, "2xx") if reach else DENIED,
        )
    )

# ---- IP literals ---------------------------------------------------------------------------------
IP_FORMS = {
    "sink": [
        "127.0.0.9",
        "2130706441",
        "0177.0.0.011",
        "0x7f000009",
        "0x7f.0.0.9",
        "0x7f.0x0.0x0.0x9",
        "127.9",
        "127.0.9",
        "0177.9",
        "127.000.000.009",
        "[::ffff:127.0.0.9]",
        "[::ffff:7f00:9]",
        "[0:0:0:0:0:ffff:127.0.0.9]",
        "[::127.0.0.9]",
        "[64:ff9b::7f00:9]",
        "[fe80::1%25lo]",
        "[::ffff:127.0.0.9%25lo]",
    ],
    "allowed": ["127.0.0.2", "2130706434", "0x7f.2", "127.2", "[::ffff:127.0.0.2]"],
    "meta": ["169.254.169.254", "[fd00:ec2::254]", "0", "0.0.0.0", "[::]", "[::1]", "localhost", "127.0.0.1"],
}
for forms in IP_FORMS.values():
    for form in forms:
        add(
            Case(
                f"ip-connect-{slug(form)}",
                "ip-literals",
                f"CONNECT {form}:443 (no rule allows an IP literal)",
                "connect",
                connect(f"{form}:443"),
                inner_get("allowed.test"),
                True,
                "allowed.test",
            )
        )
        add(Case(f"ip-http-{slug(form)}", "ip-literals", f"GET http://{form}/", "http", get(form)))

# ---- userinfo ------------------------------------------------------------------------------------
for target, reach in (
    ("http://web.test@blocked.test/", ()),
    ("http://web.test:80@blocked.test/", ()),
    ("http://user:pass@blocked.test/", ()),
    ("http://web.test%40blocked.test/", ()),
    ("http://web.test\\@blocked.test/", ()),
    ("http://web.test#@blocked.test/", ("web",)),
    ("http://web.test?@blocked.test/", ("web",)),
    ("http://blocked.test#@web.test/", ()),
    ("http://blocked.test?@web.test/", ()),
    ("http://blocked.test@web.test/", ("web",)),
    ("http://blocked.test\x00@web.test/", ("web",)),
    ("http://@blocked.test/", ()),
    ("http://web.test@@blocked.test/", ()),
    ("http://web.test%2540blocked.test/", ()),
):
    add(
        Case(
            f"userinfo-{slug(target)}",
            "userinfo",
            f"GET {target!r} with Host: web.test",
            "http",
            get("web.test", target),
            reach=reach,
            client=ANY if reach else DENIED,
        )
    )
for authority in (
    "web.test@blocked.test:443",
    "allowed.test:443@blocked.test:443",
    "blocked.test@allowed.test:443",
    "allowed.test%40blocked.test:443",
):
    add(
        Case(
            f"userinfo-connect-{slug(authority)}",
            "userinfo",
            f"CONNECT {authority}",
            "connect",
            connect(authority),
            inner_get("allowed.test"),
            True,
            "allowed.test",
            reach=("allowed",),
            client=ANY,
        )
    )

# ---- target / Host / SNI mismatch ----------------------------------------------------------------
mismatch = [
    ("absolute web, Host blocked", get("blocked.test", "http://web.test/"), ("web",)),
    ("absolute blocked, Host web", get("web.test", "http://blocked.test/"), ()),
    ("origin-form, Host blocked", get("blocked.test", "/"), ()),
    ("origin-form, Host web", get("web.test", "/"), ("web",)),
    ("two Host headers web then blocked", get("web.test", "/", "Host: blocked.test\r\n"), ("web",)),
    ("two Host headers blocked then web", get("blocked.test", "/", "Host: web.test\r\n"), ("web",)),
    ("absolute web, Host web:22", get("web.test:22", "http://web.test/"), ("web",)),
    (
        "absolute blocked with Host web and X-Forwarded-Host",
        get("web.test", "http://blocked.test/", "X-Forwarded-Host: web.test\r\n"),
        (),
    ),
    ("absolute https://blocked.test in plain", get("web.test", "https://blocked.test/"), ()),
    ("absolute ftp://blocked.test", get("web.test", "ftp://blocked.test/"), ()),
    ("absolute web.test with no scheme", get("web.test", "//blocked.test/"), ("web",)),
]
for desc, raw, reach in mismatch:
    add(
        Case(
            f"mismatch-{slug(desc)}",
            "mismatch",
            desc,
            "http",
            raw,
            reach=reach,
            client=ANY if reach else DENIED,
            forbid=(),
        )
    )
for desc, authority, sni, inner, reach, tls in (
    (
        "CONNECT allowed, Host header blocked",
        "allowed.test:443",
        "allowed.test",
        inner_get("allowed.test"),
        ("allowed",),
        True,
    ),
    (
        "CONNECT allowed, SNI blocked.test",
        "allowed.test:443",
        "blocked.test",
        inner_get("blocked.test"),
        ("allowed",),
        True,
    ),
    ("CONNECT allowed, no SNI", "allowed.test:443", None, inner_get("allowed.test"), ("allowed",), True),
    (
        "CONNECT allowed, SNI evil-allowed.test",
        "allowed.test:443",
        "evil-allowed.test",
        inner_get("evil-allowed.test"),
        ("allowed",),
        True,
    ),
    (
        "CONNECT web (intercepted), SNI blocked.test",
        "web.test:443",
        "blocked.test",
        inner_get("blocked.test"),
        ("web",),
        True,
    ),
    ("CONNECT web, inner Host blocked.test", "web.test:443", "web.test", inner_get("blocked.test"), ("web",), True),
    (
        "CONNECT web, inner absolute-form to blocked",
        "web.test:443",
        "web.test",
        b"GET http://blocked.test/ HTTP/1.1\r\nHost: blocked.test\r\nConnection: close\r\n\r\n",
        ("web",),
        True,
    ),
    ("CONNECT web, no SNI", "web.test:443", None, inner_get("web.test"), ("web",), True),
    ("CONNECT blocked, SNI allowed.test", "blocked.test:443", "allowed.test", inner_get("allowed.test"), (), True),
    (
        "CONNECT 127.0.0.2 (allowed.test's address), SNI allowed.test",
        "127.0.0.2:443",
        "allowed.test",
        inner_get("allowed.test"),
        (),
        True,
    ),
    ("CONNECT model, SNI web.test", "api.model.test:443", "web.test", inner_get("web.test", "/v1/x"), ("model",), True),
    (
        "CONNECT allowed, plain http inside to blocked",
        "allowed.test:443",
        None,
        inner_get("blocked.test"),
        ("allowed",),
        False,
    ),
    ("CONNECT web :443, plain http inside", "web.test:443", None, inner_get("web.test"), ("web",), False),
    (
        "CONNECT a.wild.test, SNI x.y.wild.test",
        "a.wild.test:443",
        "x.y.wild.test",
        inner_get("x.y.wild.test"),
        ("wild-ok",),
        True,
    ),
):
    head = connect(authority, "Host: blocked.test\r\n" if "Host header" in desc else "")
    add(
        Case(
            f"mismatch-{slug(desc)}",
            "mismatch",
            desc,
            "connect",
            head,
            inner,
            tls,
            sni,
            reach,
            client=ANY if reach else DENIED,
            key_ok=reach == ("model",),
        )
    )

# ---- smuggling -----------------------------------------------------------------------------------
SMUGGLED = b"GET http://blocked.test/smuggled HTTP/1.1\r\nHost: blocked.test\r\n\r\n"


def post(headers: str, body: bytes, host: str = "web.test") -> bytes:
    return f"POST http://{host}/ HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode() + body


smuggle = [
    ("CL and TE chunked", post("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED)),
    ("TE chunked and CL", post("Transfer-Encoding: chunked\r\nContent-Length: 200\r\n", b"0\r\n\r\n" + SMUGGLED)),
    ("two different Content-Lengths", post("Content-Length: 0\r\nContent-Length: 70\r\n", SMUGGLED)),
    ("Content-Length list 0, 70", post("Content-Length: 0, 70\r\n", SMUGGLED)),
    ("TE with leading space", post("Transfer-Encoding:  chunked\r\nContent-Length: 0\r\n", b"0\r\n\r\n" + SMUGGLED)),
    ("TE xchunked", post("Transfer-Encoding: xchunked\r\nContent-Length: 0\r\n", b"0\r\n\r\n" + SMUGGLED)),
    ("TE chunked, identity", post("Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n" + SMUGGLED)),
    ("TE identity, chunked", post("Transfer-Encoding: identity, chunked\r\n", b"0\r\n\r\n" + SMUGGLED)),
    (
        "TE with space before colon",
        post("Transfer-Encoding : chunked\r\nContent-Length: 0\r\n", b"0\r\n\r\n" + SMUGGLED),
    ),
    ("TE obs-folded", post("Transfer-Encoding:\r\n chunked\r\nContent-Length: 0\r\n", b"0\r\n\r\n" + SMUGGLED)),
    ("TE twice", post("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", b"0\r\n\r\n" + SMUGGLED)),
    ("TE CHUNKED upper case", post("Transfer-Encoding: CHUNKED\r\nContent-Length: 0\r\n", b"0\r\n\r\n" + SMUGGLED)),
    ("TE with tab", post("Transfer-Encoding:\tchunked\r\nContent-Length: 0\r\n", b"0\r\n\r\n" + SMUGGLED)),
    ("TE with NUL", post("Transfer-Encoding: chunked\x00\r\nContent-Length: 0\r\n", b"0\r\n\r\n" + SMUGGLED)),
    ("chunk size with extension", post("Transfer-Encoding: chunked\r\n", b"0;ext=1\r\n\r\n" + SMUGGLED)),
    ("chunk size overflow", post("Transfer-Encoding: chunked\r\n", b"ffffffffffffffff1\r\nx\r\n0\r\n\r\n" + SMUGGLED)),
    ("chunk size negative", post("Transfer-Encoding: chunked\r\n", b"-1\r\nx\r\n0\r\n\r\n" + SMUGGLED)),
    ("chunk size with LF only", post("Transfer-Encoding: chunked\r\n", b"0\n\n" + SMUGGLED)),
    ("Content-Length negative", post("Content-Length: -70\r\n", SMUGGLED)),
    ("Content-Length plus sign", post("Content-Length: +0\r\n", SMUGGLED)),
    ("Content-Length hex", post("Content-Length: 0x0\r\n", SMUGGLED)),
    (
        "obs-fold Host onto blocked",
        b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\n blocked.test\r\nConnection: close\r\n\r\n",
    ),
    ("bare LF request to blocked", b"GET http://blocked.test/ HTTP/1.1\nHost: blocked.test\n\n"),
    ("bare LF header line inside", b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\nX: y\r\n\r\n" + SMUGGLED),
    ("bare CR line ends", b"GET http://blocked.test/ HTTP/1.1\rHost: blocked.test\r\r"),
    ("pipelined second request to blocked", get("web.test").replace(b"Connection: close\r\n", b"") + SMUGGLED),
    ("request in a POST body", post(f"Content-Length: {len(SMUGGLED)}\r\n", SMUGGLED)),
    ("HTTP/1.0 keep-alive pipelined", b"GET http://web.test/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + SMUGGLED),
    ("HTTP/0.9 style to blocked", b"GET http://blocked.test/\r\n\r\n"),
    ("double space in request line", b"GET  http://blocked.test/ HTTP/1.1\r\nHost: blocked.test\r\n\r\n"),
    ("tab in request line", b"GET\thttp://blocked.test/\tHTTP/1.1\r\nHost: blocked.test\r\n\r\n"),
    ("lower-case method to blocked", b"get http://blocked.test/ HTTP/1.1\r\nHost: blocked.test\r\n\r\n"),
    (
        "Upgrade h2c then blocked",
        b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\nUpgrade: h2c\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n" + SMUGGLED,
    ),
    ("HTTP/2 preface to the proxy", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SMUGGLED),
    (
        "CONNECT pipelined after GET",
        get("web.test").replace(b"Connection: close\r\n", b"") + connect("blocked.test:443"),
    ),
    ("leading empty lines then blocked", b"\r\n\r\n" + SMUGGLED),
    # Hop-by-hop abuse of the framing headers: a proxy that drops a header Connection names must not drop
    # the framing with it (the body would reach the upstream as a second request).
    (
        "Connection names Content-Length",
        post(f"Connection: Content-Length\r\nContent-Length: {len(SMUGGLED)}\r\n", SMUGGLED),
    ),
    (
        "Connection names Transfer-Encoding",
        post(
            "Connection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n",
            b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n",
        ),
    ),
    ("Connection names Host", get("web.test", headers="Connection: Host\r\n") + SMUGGLED),
]
for desc, raw in smuggle:
    add(
        Case(
            f"smuggling-{slug(desc)}",
            "smuggling",
            desc + ": blocked.test must never be reached",
            "http",
            raw,
            reach=("web",),
            client=ANY,
            no_request="/smuggled",
        )
    )

# ---- header abuse --------------------------------------------------------------------------------
headers = [
    ("oversized header 40 KiB", "X-Big: " + "a" * 40_000 + "\r\n"),
    ("oversized header 70 KiB", "X-Big: " + "a" * 70_000 + "\r\n"),
    ("200 headers", "".join(f"X-H{i}: v\r\n" for i in range(200))),
    ("1000 headers", "".join(f"X-H{i}: v\r\n" for i in range(1000))),
    ("NUL in a value", "X-Nul: a\x00b\r\n"),
    ("CR in a value that forms a Host line", "X-Cr: a\rHost: blocked.test\r\n"),
    ("LF in a value that forms a request", "X-Lf: a\nGET http://blocked.test/smuggled HTTP/1.1\r\n"),
    ("header name with a space", "Bad Name: v\r\n"),
    ("header name with a colon first", ": v\r\n"),
    ("header without a colon", "NoColon\r\n"),
    ("Connection names Host", "Connection: close, Host\r\n"),
    ("Connection names Content-Length", "Connection: Content-Length\r\nContent-Length: 5\r\n"),
    ("Connection names X-Api-Key", "Connection: X-Api-Key\r\nX-Api-Key: proxy-managed\r\n"),
    ("Max-Forwards 0", "Max-Forwards: 0\r\n"),
    ("Expect 100-continue", "Expect: 100-continue\r\n"),
    ("Via loop header", "Via: 1.1 blastradius-gateway\r\n"),
    ("non-ASCII value", "X-Utf: \u00e9\u00e8\r\n"),
    ("very long request target 60 KiB", None),
]
for desc, extra in headers:
    raw = get("web.test", f"http://web.test/{'a' * 60_000}") if extra is None else get("web.test", headers=extra)
    add(
        Case(
            f"headers-{slug(desc)}",
            "headers",
            desc + " to web.test",
            "http",
            raw,
            reach=("web",),
            client=ANY,
            no_request="blocked.test",
        )
    )
for name in (
    "Proxy-Authorization: Basic dXNlcjpzZWNyZXQtcHJveHktcGFzcw==",
    "Proxy-Authenticate: Basic realm=x",
    "Proxy-Connection: keep-alive",
):
    header = name.split(":")[0]
    add(
        Case(
            f"headers-{slug(header)}-stripped",
            "headers",
            f"{header} must not reach the upstream",
            "http",
            get("web.test", headers=name + "\r\n"),
            reach=("web",),
            client=ANY,
            forbid=(name.split(": ")[1].encode(),) if header != "Proxy-Connection" else (),
        )
    )
add(
    Case(
        "headers-proxy-authorization-in-tunnel-connect",
        "headers",
        "Proxy-Authorization on CONNECT must not enter the tunnel",
        "connect",
        connect("allowed.test:443", "Proxy-Authorization: Basic dXNlcjpzZWNyZXQtcHJveHktcGFzcw==\r\n"),
        inner_get("allowed.test"),
        True,
        "allowed.test",
        ("allowed",),
        client=ANY,
        forbid=(b"dXNlcjpzZWNyZXQtcHJveHktcGFzcw==",),
    )
)

# ---- credential binding --------------------------------------------------------------------------
for hdr in ("x-api-key: proxy-managed", "Authorization: Bearer proxy-managed", "X-API-KEY: proxy-managed", ""):
    h = hdr + "\r\n" if hdr else ""
    tag = slug(hdr.split(":")[0]) if hdr else "no-header"
    add(
        Case(
            f"credentials-model-tls-{tag}",
            "credentials",
            f"control: the model API over verified TLS ({tag})",
            "connect",
            connect("api.model.test:443"),
            inner_get("api.model.test", "/v1/messages", h),
            True,
            "api.model.test",
            ("model",),
            True,
            TUNNEL_OK,
            key_ok=True,
        )
    )
    add(
        Case(
            f"credentials-model-plain-{tag}",
            "credentials",
            "plain http to the model host: never the key in clear",
            "http",
            get("api.model.test", "http://api.model.test/v1/messages", h),
            reach=("model",),
            client=ANY,
        )
    )
    for host, canary, tls in (
        ("web.test", "web", True),
        ("allowed.test", "allowed", True),
        ("a.wild.test", "wild-ok", True),
    ):
        add(
            Case(
                f"credentials-other-host-{slug(host)}-{tag}",
                "credentials",
                f"{host}: never the model key",
                "connect",
                connect(f"{host}:443"),
                inner_get(host, "/v1/messages", h),
                tls,
                host,
                (canary,),
                client=ANY,
            )
        )
    add(
        Case(
            f"credentials-web-plain-{tag}",
            "credentials",
            "plain http to web.test: never the model key",
            "http",
            get("web.test", "http://web.test/v1/messages", h),
            reach=("web",),
            client=ANY,
        )
    )
for desc, authority, sni, host in (
    ("CONNECT allowed.test, SNI api.model.test", "allowed.test:443", "api.model.test", "api.model.test"),
    ("CONNECT model :443 over plain http inside", "api.model.test:443", None, "api.model.test"),
    ("CONNECT model host upper case", "API.MODEL.TEST:443", "api.model.test", "api.model.test"),
    ("CONNECT model host trailing dot", "api.model.test.:443", "api.model.test", "api.model.test"),
    ("CONNECT model by address", "127.0.0.3:443", "api.model.test", "api.model.test"),
    ("CONNECT model :8443", "api.model.test:8443", "api.model.test", "api.model.test"),
    ("CONNECT look-alike model host", "api.model.test.evil.test:443", "api.model.test.evil.test", "api.model.test"),
):
    tls = sni is not None
    reach = (
        ("allowed",)
        if authority.startswith("allowed")
        else ("model",)
        if "evil" not in authority and "127" not in authority and "8443" not in authority
        else ()
    )
    add(
        Case(
            f"credentials-{slug(desc)}",
            "credentials",
            desc,
            "connect",
            connect(authority),
            inner_get(host, "/v1/messages", "x-api-key: proxy-managed\r\n"),
            tls,
            sni,
            reach,
            client=ANY,
            key_ok=tls and reach == ("model",) and "8443" not in authority,
        )
    )
for target in (
    "http://api.model.test:443/v1/messages",
    "http://API.MODEL.TEST/v1/messages",
    "http://api.model.test./v1/messages",
):
    add(
        Case(
            f"credentials-plain-{slug(target)}",
            "credentials",
            f"GET {target}: the key never in clear",
            "http",
            get("api.model.test", target, "x-api-key: proxy-managed\r\n"),
            reach=("model",),
            client=ANY,
        )
    )

# ---- path rules ----------------------------------------------------------------------------------
PATHS = [
    ("/v1/messages", True),
    ("/v1/./messages", None),
    ("/v1//messages", None),
    ("/v1/messages?x=/../admin", None),
    ("/v1", None),
    ("/admin", False),
    ("/", False),
    ("/v1/../admin", False),
    ("/v1/%2e%2e/admin", False),
    ("/v1/%2E%2E/admin", False),
    ("/v1/.%2e/admin", False),
    ("/v1/..%2fadmin", False),
    ("/v1%2f..%2fadmin", False),
    ("/v1/%2e%2e%2fadmin", False),
    ("/v1/..;/admin", False),
    ("/v1/..\\admin", False),
    ("/v1/%5c..%5cadmin", False),
    ("/v1/%252e%252e/admin", None),
    ("/./v1/../admin", False),
    ("//admin", False),
    ("//v1/../admin", False),
    ("/V1/messages", False),
    ("/%76%31/messages", None),
    ("/v1/../v1/ok", None),
    ("/v1/%00/../admin", False),
    ("/v1/\u2025/admin", None),
    ("admin", False),
    ("*", False),
    ("/v1/%2e%2e", False),
    ("/v1/..", False),
]
for path, verdict in PATHS:
    client_tls = TUNNEL_OK if verdict else ANY
    add(
        Case(
            f"paths-tls-{slug(path)}",
            "paths",
            f"model API over TLS, path {path!r} (only /v1/** open)",
            "connect",
            connect("api.model.test:443"),
            inner_get("api.model.test", path),
            True,
            "api.model.test",
            ("model",),
            bool(verdict),
            client_tls,
            key_ok=True,
            paths_under="/v1",
            requires=("paths",),
        )
    )
    add(
        Case(
            f"paths-plain-{slug(path)}",
            "paths",
            f"model API in plain http, path {path!r} (only /v1/** open)",
            "http",
            get("api.model.test", "http://api.model.test" + path if path.startswith("/") else path),
            reach=("model",),
            must_reach=bool(verdict),
            client=OK if verdict else ANY,
            paths_under="/v1",
            requires=("paths",),
        )
    )

# ---- known-key exfiltration ----------------------------------------------------------------------
BODY_HEAD = b"Content-Length: {CL}\r\nConnection: close\r\n\r\n"
FORMS = ("{KEY}", "{KEY_B64}", "{KEY_HEX}", "{KEY_PCT}")
for form in FORMS:
    name = form.strip("{}").lower().replace("_", "-")
    places = {
        "query": ("/upload?k=" + form, ""),
        "path": ("/upload/" + form, ""),
        "header": ("/upload", "X-Debug: " + form + "\r\n"),
        "cookie": ("/upload", "Cookie: s=" + form + "\r\n"),
        "body": ("/upload", None),
    }
    for place, (path, header) in places.items():
        if header is None:
            body = ("data=" + form).encode()
            plain = f"POST http://web.test{path} HTTP/1.1\r\nHost: web.test\r\n".encode() + BODY_HEAD + body
            inner = f"POST {path} HTTP/1.1\r\nHost: web.test\r\n".encode() + BODY_HEAD + body
        else:
            plain = get("web.test", "http://web.test" + path, header)
            inner = inner_get("web.test", path, header)
        add(
            Case(
                f"exfiltration-plain-{place}-{name}",
                "exfiltration",
                f"the known key ({name}) in the {place}, plain http",
                "http",
                plain,
                reach=("web",),
                client=DENIED,
                requires=("exfiltration",),
            )
        )
        add(
            Case(
                f"exfiltration-tls-{place}-{name}",
                "exfiltration",
                f"the known key ({name}) in the {place}, inside TLS",
                "connect",
                connect("web.test:443"),
                inner,
                True,
                "web.test",
                ("web",),
                client=(*DENIED, "tunnel:4xx", "tunnel:5xx", "tunnel:reset", "tunnel:closed"),
                requires=("exfiltration", "paths"),
            )
        )
for desc, raw in (
    ("the key as host labels", get("{KEY_HEX_LABELS}.web.test")),
    (
        "the key to the model host in plain http",
        get("api.model.test", "http://api.model.test/v1/x", "x-api-key: {KEY}\r\n"),
    ),
    ("the key as userinfo", get("web.test", "http://{KEY}@web.test/")),
):
    add(
        Case(
            f"exfiltration-{slug(desc)}",
            "exfiltration",
            desc,
            "http",
            raw,
            reach=("web", "model"),
            client=DENIED,
            requires=("exfiltration",),
        )
    )

# ---- resource abuse (bounded) --------------------------------------------------------------------
add(
    Case(
        "resources-64-concurrent-blocked",
        "resources",
        "64 connections at once to blocked.test: all denied",
        "concurrent",
        get("blocked.test"),
        count=64,
    )
)
add(
    Case(
        "resources-64-concurrent-connect-blocked",
        "resources",
        "64 CONNECTs at once to blocked.test:443",
        "concurrent",
        connect("blocked.test:443"),
        count=64,
    )
)
add(
    Case(
        "resources-64-concurrent-web",
        "resources",
        "64 connections at once to web.test: allowed, nothing else reached",
        "concurrent",
        get("web.test"),
        reach=("web",),
        client=ANY,
        count=64,
    )
)
add(
    Case(
        "resources-slow-headers-blocked",
        "resources",
        "headers to blocked.test dribbled over 1.2 s",
        "slow",
        get("blocked.test"),
        client=(*DENIED, "timeout"),
        count=6,
    )
)
add(
    Case(
        "resources-slow-headers-web",
        "resources",
        "headers to web.test dribbled over 1.2 s",
        "slow",
        get("web.test"),
        reach=("web",),
        client=ANY,
        count=6,
    )
)
add(
    Case(
        "resources-huge-content-length-blocked",
        "resources",
        "Content-Length 10^12 and no body, to blocked.test",
        "http",
        post("Content-Length: 1000000000000\r\n", b"", "blocked.test"),
        client=(*DENIED, "timeout"),
    )
)
add(
    Case(
        "resources-1mib-body-web",
        "resources",
        "a 1 MiB body to web.test",
        "http",
        post("Content-Length: 1048576\r\nConnection: close\r\n", b"a" * 1048576),
        reach=("web",),
        client=ANY,
    )
)
add(
    Case(
        "resources-many-requests-one-connection",
        "resources",
        "100 pipelined requests to blocked.test",
        "http",
        SMUGGLED * 100,
        client=(*DENIED, "timeout"),
    )
)

# ---- DNS (where the egress offers a resolver) ----------------------------------------------------
for name, answer in (
    ("allowed.test", True),
    ("web.test", True),
    ("api.model.test", True),
    ("a.wild.test", True),
    ("a.b.c.deep.test", True),
    ("range.test", True),
    ("blocked.test", False),
    ("evil-allowed.test", False),
    ("allowed.test.evil.test", False),
    ("x.y.wild.test", False),
    ("deep.test", False),
    ("wild.test", False),
    ("example.com", False),
    ("evil.test", False),
    ("localhost", False),
    ("{KEY_HEX_LABELS}.allowed.test", False),
    ("{KEY_HEX_LABELS}.web.test", False),
    ("ALLOWED.TEST", None),
    ("allowed.test.", True),
    ("1.0.0.127.in-addr.arpa", False),
    ("xallowed.test", False),
    ("api.model.test.evil.test", False),
):
    add(
        Case(
            f"dns-{slug(name)}",
            "dns",
            f"resolve {name}: {'answered' if answer else 'refused' if answer is False else 'either'}",
            "dns",
            name.encode(),
            client=("answer",)
            if answer
            else ("answer", "refused", "nxdomain", "empty")
            if answer is None
            else ("refused", "nxdomain", "empty", "rcode-2", "rcode-1"),
            requires=("dns",),
        )
    )


def check_corpus() -> None:
    ids = [c.id for c in CASES]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, duplicates
    assert {c.family for c in CASES} == set(FAMILIES)
