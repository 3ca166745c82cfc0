"""Per-install CA and leaf certificates minted per host, plus the TLS contexts built from them.

The CA's private key stays in ca_dir (mode 0600); only its certificate goes to guests. Leaf
certificates share one EC key (minting is then a signature, not a key generation) and their
server contexts are cached per host and guest-facing TLS profile (a property of the sandbox's listener).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harness.gateway.errors import SetupError
from harness.gateway.names import HostError, is_ip, normalise_host

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
CA_VALIDITY_DAYS = 3650
LEAF_VALIDITY_DAYS = 30
# Back-date certificates so a guest whose clock lags the host still accepts them.
CLOCK_SKEW = dt.timedelta(days=1)
LEAF_CONTEXT_CACHE = 512
ALPN = ["http/1.1"]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "blastradius"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )


def make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    leaf_key: ec.EllipticCurvePrivateKey,
    names: list[str],
) -> x509.Certificate:
    """A server certificate for names (host names or IP literals), signed by the CA."""
    sans: list[x509.GeneralName] = []
    for name in names:
        if is_ip(name):
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        else:
            sans.append(x509.DNSName(name))
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=LEAF_VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


GUEST_FACING_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""Only forward-secret AEAD suites for TLS 1.2 (TLS 1.3's suites are all of that kind already)."""
STRICT = "strict"
"""The default: TLS 1.2+, those suites, OpenSSL's default security level (no SHA-1 signatures, as upstream)."""
SHA1_COMPAT = "sha1-compat"
"""Those suites at SECLEVEL 0, only for busybox's ssl_client: no signature_algorithms, so TLS 1.2 signs SHA-1."""
TLS_PROFILES = (STRICT, SHA1_COMPAT)
"""The guest-facing TLS profiles, one per sandbox listener (they differ only to a TLS 1.2 client)."""
PROFILE_CIPHERS: dict[str, str] = {STRICT: GUEST_FACING_CIPHERS, SHA1_COMPAT: GUEST_FACING_CIPHERS + ":@SECLEVEL=0"}
"""Each profile's OpenSSL cipher string, which carries its security level."""


class TlsProfileError(SetupError):
    """A guest-facing TLS profile that is not one of TLS_PROFILES."""


def check_profile(profile: str) -> str:
    """profile itself if it is one of TLS_PROFILES; else TlsProfileError naming them."""
    if profile not in TLS_PROFILES:
        raise TlsProfileError(f"unknown TLS profile {profile!r}: use one of {', '.join(TLS_PROFILES)}")
    return profile


def server_context_from_pem(cert_chain_pem: bytes, key_pem: bytes, scratch_dir: Path, profile: str) -> ssl.SSLContext:
    """A server context of a TLS profile. ssl can only load a key from a file: write it privately, load it,
    delete it at once."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(PROFILE_CIPHERS[check_profile(profile)])
    ctx.set_alpn_protocols(ALPN)
    scratch_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=scratch_dir, suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(cert_chain_pem + key_pem)
        ctx.load_cert_chain(name)
    finally:
        os.unlink(name)
    return ctx


# Called with the normalised SNI (or None) and the expected host; returns True to accept.
SniCheck = Callable[[str | None, str], bool]


@dataclass
class SniResult:
    """What the client asked for in its ClientHello, recorded for the audit log."""

    server_name: str | None = None
    ok: bool = False


def attach_sni_check(ctx: ssl.SSLContext, expected_host: str) -> None:
    """Refuse the handshake unless the ClientHello names exactly expected_host.

    A missing or different SNI to an intercepted host is how a client would get our leaf for
    one name while talking about another; it is refused during the handshake.
    """

    def callback(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        result = SniResult(server_name=server_name)
        sslobj.blastradius_sni = result  # type: ignore[attr-defined]
        if server_name is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        try:
            normal = normalise_host(server_name)
        except HostError:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        if normal != expected_host:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        result.ok = True
        return None

    ctx.sni_callback = callback


class CertificateAuthority:
    """The per-install CA. load_or_create() is idempotent: the same ca_dir gives the same CA."""

    def __init__(self, ca_dir: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.ca_dir = ca_dir
        self._key = key
        self.cert = cert
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = _pem_key(self._leaf_key)
        self._contexts: OrderedDict[tuple[str, str], ssl.SSLContext] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def load_or_create(cls, ca_dir: Path, common_name: str = "blastradius gateway CA") -> CertificateAuthority:
        ca_dir.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = ca_dir / CA_CERT_FILE, ca_dir / CA_KEY_FILE
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path}: expected an EC key")
            return cls(ca_dir, key, cert)
        key, cert = make_ca(common_name)
        _write_private(key_path, _pem_key(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(ca_dir, key, cert)

    def leaf_pem(self, names: list[str]) -> bytes:
        leaf = issue_leaf(self._key, self.cert, self._leaf_key, names)
        return leaf.public_bytes(serialization.Encoding.PEM) + self.cert_pem

    def server_context(self, host: str, profile: str) -> ssl.SSLContext:
        """A server context of `profile` presenting a leaf for host, refusing any other (or no) SNI."""
        key = (host, profile)
        with self._lock:
            ctx = self._contexts.get(key)
            if ctx is not None:
                self._contexts.move_to_end(key)
                return ctx
        ctx = server_context_from_pem(self.leaf_pem([host]), self._leaf_key_pem, self.ca_dir / "tmp", profile)
        attach_sni_check(ctx, host)
        with self._lock:
            self._contexts[key] = ctx
            while len(self._contexts) > LEAF_CONTEXT_CACHE:
                self._contexts.popitem(last=False)
        return ctx


def upstream_client_context(extra_ca_file: Path | None = None) -> ssl.SSLContext:
    """How the gateway verifies real upstreams: system trust plus an optional extra CA file."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    if extra_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(extra_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise SetupError(
                f"upstream CA {extra_ca_file}: cannot load it ({exc}); pass a PEM CA certificate file"
            ) from None
    return ctx
