"""The built-in CA and X.509-SVIDs, with real crypto: cryptography's verifier and real TLS
handshakes (Python's ssl over a socketpair) between certificates the CA issued."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from meshward.pki import CertificateAuthority, IssuedCert, PkiError, utc_now
from meshward.pki import ca as ca_module

TD = "example.org"
WEB = f"spiffe://{TD}/ns/shop/sa/web"
API = f"spiffe://{TD}/ns/shop/sa/api"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(TD)


@pytest.fixture(scope="module")
def other_ca() -> CertificateAuthority:
    """A CA for the same trust domain that nobody trusts."""
    return CertificateAuthority.generate(TD)


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """Run with umask 0, so any mode that is right was set explicitly."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def verify_client(ca: CertificateAuthority, issued: IssuedCert) -> list[x509.GeneralName]:
    verifier = PolicyBuilder().store(Store([ca.certificate])).build_client_verifier()
    return list(verifier.verify(load(issued.cert_pem), []).subjects or [])


# ------------------------------------------------------------------------- real TLS


@dataclass
class Exchange:
    server_error: BaseException | None = None
    client_error: BaseException | None = None
    server_saw: dict[str, Any] | None = None
    client_saw: dict[str, Any] | None = None
    reply: bytes = b""


def write_creds(tmp_path: Path, issued: IssuedCert, name: str) -> tuple[str, str]:
    chain, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    chain.write_bytes(issued.chain_pem)
    key.write_bytes(issued.key_pem)
    key.chmod(0o600)
    return str(chain), str(key)


def context(
    side: int,
    bundle: bytes,
    creds: tuple[str, str] | None,
    *,
    check_hostname: bool = False,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    if side == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=bundle.decode())
    if creds:
        ctx.load_cert_chain(*creds)
    return ctx


def tls_exchange(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str | None = None
) -> Exchange:
    """A TLS handshake and one round trip over a socketpair; records what each end saw."""
    result = Exchange()
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(5)
    client_sock.settimeout(5)

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(server_sock, server_side=True) as tls:
                result.server_saw = tls.getpeercert()
                tls.sendall(tls.recv(4).upper())
        except (ssl.SSLError, OSError) as err:
            result.server_error = err
        finally:
            server_sock.close()

    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(serve)
        try:
            with client_ctx.wrap_socket(client_sock, server_hostname=server_hostname) as tls:
                result.client_saw = tls.getpeercert()
                tls.sendall(b"ping")
                result.reply = tls.recv(4)
        except (ssl.SSLError, OSError) as err:
            result.client_error = err
        finally:
            client_sock.close()
        done.result()
    return result


def uri_sans(peer: dict[str, Any] | None) -> list[str]:
    assert peer is not None
    return [value for kind, value in peer.get("subjectAltName", ()) if kind == "URI"]


# ------------------------------------------------------------------------- CA files


def test_first_run_creates_private_files_and_a_spiffe_root(
    tmp_path: Path, umask_zero: None
) -> None:
    directory = tmp_path / "state" / "ca"
    ca = CertificateAuthority.load_or_create(directory, TD)

    assert mode(directory) == 0o700
    assert mode(directory / "ca.key") == 0o600
    assert mode(directory / "ca.crt") == 0o644
    assert sorted(p.name for p in directory.iterdir()) == ["ca.crt", "ca.key"]
    assert (directory / "ca.crt").read_bytes() == ca.bundle_pem
    assert ca.trust_domain == TD

    root = load(ca.bundle_pem)
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}"]
    cn = root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == f"meshward CA {TD}"
    assert root.subject == root.issuer
    public = root.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    root.verify_directly_issued_by(root)
    lifetime = root.not_valid_after_utc - root.not_valid_before_utc
    assert timedelta(days=3649) < lifetime < timedelta(days=3652)
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    assert key.public_key() == public


def test_ca_key_is_created_exclusively_with_mode_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def recording_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        opened.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", recording_open)
    CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    monkeypatch.undo()

    key_opens = [(f, m) for p, f, m in opened if p.endswith("ca.key")]
    assert len(key_opens) == 1
    flags, key_mode = key_opens[0]
    assert flags & os.O_CREAT and flags & os.O_EXCL
    assert key_mode == 0o600


def test_reload_gives_the_same_ca(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    key_before = (tmp_path / "ca" / "ca.key").read_bytes()
    second = CertificateAuthority.load_or_create(tmp_path / "ca", TD)

    assert second.bundle_pem == first.bundle_pem
    assert (tmp_path / "ca" / "ca.key").read_bytes() == key_before
    # The reloaded CA signs with the same key: its SVIDs verify against the first bundle.
    assert verify_client(first, second.issue_svid(WEB)) == [x509.UniformResourceIdentifier(WEB)]


def test_concurrent_first_runs_agree_on_one_ca(tmp_path: Path) -> None:
    start = threading.Barrier(4)

    def first_run() -> bytes:
        start.wait()
        return CertificateAuthority.load_or_create(tmp_path / "ca", TD).bundle_pem

    with ThreadPoolExecutor(4) as pool:
        bundles = list(pool.map(lambda _: first_run(), range(4)))
    assert len(set(bundles)) == 1
    assert bundles[0] == (tmp_path / "ca" / "ca.crt").read_bytes()
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["ca.crt", "ca.key"]


def test_trust_domain_mismatch_names_the_file_and_the_fix(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    with pytest.raises(PkiError) as err:
        CertificateAuthority.load_or_create(tmp_path / "ca", "other.org")
    message = str(err.value)
    assert str(tmp_path / "ca" / "ca.crt") in message
    assert "'example.org'" in message and "'other.org'" in message
    assert "mesh.trust_domain" in message


def test_key_without_certificate_is_an_error_and_the_key_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ca_module, "PAIR_WAIT_SECONDS", 0.1)
    CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    (tmp_path / "ca" / "ca.crt").unlink()
    key_before = (tmp_path / "ca" / "ca.key").read_bytes()
    with pytest.raises(PkiError, match=r"ca\.crt: missing"):
        CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    assert (tmp_path / "ca" / "ca.key").read_bytes() == key_before


@pytest.mark.parametrize("bad", ["Example.org", "", "exa mple.org", "example.org:8443"])
def test_invalid_trust_domain_is_rejected(tmp_path: Path, bad: str) -> None:
    with pytest.raises(PkiError, match="not a valid SPIFFE trust domain"):
        CertificateAuthority.load_or_create(tmp_path / "ca", bad)
    assert not (tmp_path / "ca").exists()


# ------------------------------------------------------------------------- operator CA


def make_ca_files(
    tmp_path: Path,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    is_ca: bool = True,
    uri: str | None = None,
) -> tuple[Path, Path]:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Operator Root")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if uri:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False
        )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    cert = builder.sign(key, hashes.SHA256())
    cert_file, key_file = tmp_path / "op-ca.pem", tmp_path / "op-ca.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


@pytest.mark.parametrize("kind", ["rsa", "ecdsa"])
def test_operator_ca_issues_verifiable_svids(tmp_path: Path, kind: str) -> None:
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP384R1())
    )
    cert_file, key_file = make_ca_files(tmp_path, key)
    ca = CertificateAuthority.from_pem_files(cert_file, key_file, TD)

    assert ca.bundle_pem == cert_file.read_bytes()
    svid = ca.issue_svid(WEB)
    assert svid.chain_pem == svid.cert_pem + cert_file.read_bytes()
    assert verify_client(ca, svid) == [x509.UniformResourceIdentifier(WEB)]
    public = load(svid.cert_pem).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"


def test_operator_leaf_certificate_is_not_a_ca(tmp_path: Path) -> None:
    cert_file, key_file = make_ca_files(
        tmp_path, ec.generate_private_key(ec.SECP256R1()), is_ca=False
    )
    with pytest.raises(PkiError) as err:
        CertificateAuthority.from_pem_files(cert_file, key_file, TD)
    assert str(cert_file) in str(err.value)
    assert "not a CA certificate" in str(err.value)


def test_operator_key_that_does_not_match(tmp_path: Path) -> None:
    cert_file, _ = make_ca_files(tmp_path, ec.generate_private_key(ec.SECP256R1()))
    wrong_key = tmp_path / "wrong.key"
    wrong_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(PkiError) as err:
        CertificateAuthority.from_pem_files(cert_file, wrong_key, TD)
    assert str(wrong_key) in str(err.value)
    assert "does not belong to the certificate" in str(err.value)


def test_operator_ca_of_another_trust_domain(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert_file, key_file = make_ca_files(tmp_path, key, uri="spiffe://other.org")
    with pytest.raises(PkiError, match=r"trust domain 'other\.org'") as err:
        CertificateAuthority.from_pem_files(cert_file, key_file, TD)
    assert str(cert_file) in str(err.value)


def test_operator_files_that_are_not_pem_or_missing(tmp_path: Path) -> None:
    cert_file, key_file = make_ca_files(tmp_path, ec.generate_private_key(ec.SECP256R1()))
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(PkiError, match=f"{junk}: not a PEM certificate"):
        CertificateAuthority.from_pem_files(junk, key_file, TD)
    with pytest.raises(PkiError, match=f"{junk}: not a PEM private key"):
        CertificateAuthority.from_pem_files(cert_file, junk, TD)
    with pytest.raises(PkiError, match="not found"):
        CertificateAuthority.from_pem_files(tmp_path / "absent.pem", key_file, TD)


def test_operator_encrypted_key_says_to_decrypt(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert_file, key_file = make_ca_files(tmp_path, key)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(PkiError, match="encrypted"):
        CertificateAuthority.from_pem_files(cert_file, key_file, TD)


# ------------------------------------------------------------------------- SVIDs


def test_svid_follows_the_x509_svid_profile(ca: CertificateAuthority) -> None:
    before = utc_now()
    svid = ca.issue_svid(WEB)
    cert = load(svid.cert_pem)

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(WEB)]  # one URI SAN, nothing else
    assert svid.uris == (WEB,) and svid.dns_names == () and svid.ip_addresses == ()
    assert svid.spiffe_id == WEB
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, TD)])
    assert cert.issuer == ca.certificate.subject

    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature and usage.value.key_encipherment
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}

    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    key = serialization.load_pem_private_key(svid.key_pem, None)
    assert svid.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert key.public_key() == public
    assert svid.chain_pem == svid.cert_pem + ca.bundle_pem

    assert cert.serial_number == svid.serial
    assert svid.not_before == cert.not_valid_before_utc
    assert svid.not_after == cert.not_valid_after_utc
    # Back-dated 60 s for clock skew; valid for the lifetime from the issue time.
    assert svid.not_after - svid.not_before == timedelta(hours=1, seconds=60)
    issued_at = svid.not_before + timedelta(seconds=60)
    assert before.replace(microsecond=0) <= issued_at <= utc_now()
    # Half-way from *issue* (not the back-dated not_before) to expiry: lifetime / 2.
    assert svid.issued_at == svid.not_before + timedelta(seconds=60)
    assert svid.renew_at() == svid.issued_at + (svid.not_after - svid.issued_at) / 2

    assert verify_client(ca, svid) == [x509.UniformResourceIdentifier(WEB)]


def test_serials_are_random_positive_128_bit_and_distinct(ca: CertificateAuthority) -> None:
    serials = [ca.issue_svid(WEB).serial for _ in range(20)]
    assert len(set(serials)) == 20
    assert all(0 < s < 2**128 for s in serials)
    assert max(s.bit_length() for s in serials) > 100


@pytest.mark.parametrize(
    ("serial", "text"),
    [(0xABC, "0abc"), (0x1234, "1234"), (0xFF, "ff"), (0x100, "0100"), (0x0F00AB, "0f00ab")],
)
def test_serial_hex_matches_envoy_admin_certs(serial: int, text: str) -> None:
    # Envoy prints BN_bn2hex lower-cased: whole bytes, leading zero bytes stripped.
    now = utc_now()
    cert = IssuedCert(b"", b"", b"", serial, now, now, (), ())
    assert cert.serial_hex() == text


def test_serial_hex_of_an_issued_cert_is_the_der_serial(ca: CertificateAuthority) -> None:
    svid = ca.issue_svid(WEB)
    text = svid.serial_hex()
    assert text == text.lower() and len(text) % 2 == 0 and int(text, 16) == svid.serial
    assert not text.startswith("00")


@pytest.mark.parametrize(
    ("spiffe_id", "reason"),
    [
        ("spiffe://other.org/ns/shop/sa/web", "this CA serves 'example.org'"),
        ("https://example.org/ns/shop/sa/web", "does not start with 'spiffe://'"),
        ("SPIFFE://example.org/ns/shop/sa/web", "does not start with 'spiffe://'"),
        ("spiffe://example.org", "has no path"),
        ("spiffe://example.org/", "has no path"),
        ("spiffe://example.org/ns/shop/", "empty path segment"),
        ("spiffe://example.org/ns//sa/web", "empty path segment"),
        ("spiffe://example.org/ns/../sa/web", "'..' path segment"),
        ("spiffe://example.org/ns/shop/sa/web?x=1", "query or fragment"),
        ("spiffe://example.org:443/ns/shop", "port"),
        ("spiffe://user@example.org/ns/shop", "user info"),
        ("spiffe://Example.org/ns/shop", "invalid trust domain"),
        ("spiffe://example.org/ns/sh%20op", "characters outside"),
        ("spiffe://example.org/" + "a" * 2100, "longer than 2048 bytes"),
    ],
)
def test_invalid_spiffe_ids_are_rejected(
    ca: CertificateAuthority, spiffe_id: str, reason: str
) -> None:
    with pytest.raises(PkiError) as err:
        ca.issue_svid(spiffe_id)
    assert reason in str(err.value)
    assert f"spiffe://{TD}/ns/default/sa/<workload>" in str(err.value)  # the fix


@pytest.mark.parametrize("lifetime", [timedelta(seconds=59), timedelta(hours=24, seconds=1)])
def test_svid_lifetime_out_of_range(ca: CertificateAuthority, lifetime: timedelta) -> None:
    with pytest.raises(PkiError, match=r"lifetime .* out of range"):
        ca.issue_svid(WEB, lifetime)


@pytest.mark.parametrize("lifetime", [timedelta(seconds=60), timedelta(hours=24)])
def test_svid_lifetime_bounds_are_accepted(ca: CertificateAuthority, lifetime: timedelta) -> None:
    svid = ca.issue_svid(WEB, lifetime)
    assert svid.not_after - svid.not_before == lifetime + timedelta(seconds=60)


def test_naive_not_before_is_rejected(ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="no time zone"):
        ca.issue_svid(WEB, not_before=datetime(2020, 1, 1))


def test_expired_svid_can_be_minted_and_fails_verification(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    start = utc_now() - timedelta(hours=2)
    expired = ca.issue_svid(WEB, timedelta(minutes=5), not_before=start)
    assert expired.not_before == start.replace(microsecond=0)
    assert expired.not_after == expired.not_before + timedelta(minutes=5)
    assert expired.is_expired(utc_now())
    with pytest.raises(VerificationError, match="not valid at validation time"):
        verify_client(ca, expired)

    server = context(ssl.PROTOCOL_TLS_SERVER, ca.bundle_pem, write_creds(tmp_path, expired, "s"))
    client = context(ssl.PROTOCOL_TLS_CLIENT, ca.bundle_pem, None)
    result = tls_exchange(server, client)
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    assert "certificate has expired" in str(result.client_error)


def test_repr_never_contains_the_key(ca: CertificateAuthority) -> None:
    svid = ca.issue_svid(WEB)
    body = svid.key_pem.decode().splitlines()[1]
    for text in (repr(svid), str(svid), f"{svid}", repr(ca)):
        assert "PRIVATE KEY" not in text
        assert body not in text
    assert str(svid.serial) in repr(svid)
    assert WEB in repr(svid)


# ------------------------------------------------------------------------- real mTLS


def test_mtls_handshake_between_two_svids(ca: CertificateAuthority, tmp_path: Path) -> None:
    server = context(
        ssl.PROTOCOL_TLS_SERVER, ca.bundle_pem, write_creds(tmp_path, ca.issue_svid(API), "api")
    )
    client = context(
        ssl.PROTOCOL_TLS_CLIENT, ca.bundle_pem, write_creds(tmp_path, ca.issue_svid(WEB), "web")
    )
    result = tls_exchange(server, client)
    assert result.server_error is None and result.client_error is None
    assert result.reply == b"PING"
    assert uri_sans(result.server_saw) == [WEB]  # the server authenticated the client
    assert uri_sans(result.client_saw) == [API]


def test_mtls_rejects_a_client_svid_from_another_ca(
    ca: CertificateAuthority, other_ca: CertificateAuthority, tmp_path: Path
) -> None:
    server = context(
        ssl.PROTOCOL_TLS_SERVER, ca.bundle_pem, write_creds(tmp_path, ca.issue_svid(API), "api")
    )
    intruder = write_creds(tmp_path, other_ca.issue_svid(WEB), "intruder")
    client = context(ssl.PROTOCOL_TLS_CLIENT, ca.bundle_pem, intruder)
    result = tls_exchange(server, client)
    assert isinstance(result.server_error, ssl.SSLError)
    assert "certificate verify failed" in str(result.server_error)
    assert result.reply == b""


def test_mtls_rejects_a_server_svid_from_another_ca(
    ca: CertificateAuthority, other_ca: CertificateAuthority, tmp_path: Path
) -> None:
    server = context(
        ssl.PROTOCOL_TLS_SERVER,
        ca.bundle_pem,
        write_creds(tmp_path, other_ca.issue_svid(API), "impostor"),
    )
    client = context(
        ssl.PROTOCOL_TLS_CLIENT, ca.bundle_pem, write_creds(tmp_path, ca.issue_svid(WEB), "web")
    )
    result = tls_exchange(server, client)
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    assert result.reply == b""


def test_mtls_requires_a_client_certificate(ca: CertificateAuthority, tmp_path: Path) -> None:
    server = context(
        ssl.PROTOCOL_TLS_SERVER, ca.bundle_pem, write_creds(tmp_path, ca.issue_svid(API), "api")
    )
    client = context(ssl.PROTOCOL_TLS_CLIENT, ca.bundle_pem, None)
    result = tls_exchange(server, client)
    assert isinstance(result.server_error, ssl.SSLError)
    assert "peer did not return a certificate" in str(result.server_error)


# ------------------------------------------------------------------------- server certs


def test_server_cert_sans_and_usage(ca: CertificateAuthority) -> None:
    issued = ca.issue_server(["GW.example.test", "*.apps.example.test", "127.0.0.1", "::1"])
    cert = load(issued.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.example.test", "*.apps.example.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == []
    assert issued.dns_names == ("gw.example.test", "*.apps.example.test")
    assert issued.ip_addresses == ("127.0.0.1", "::1")
    assert issued.uris == () and issued.spiffe_id is None
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    assert issued.not_after - issued.not_before == timedelta(hours=24, seconds=60)

    verifier = (
        PolicyBuilder()
        .store(Store([ca.certificate]))
        .build_server_verifier(x509.DNSName("gw.example.test"))
    )
    assert verifier.verify(cert, [])[-1] == ca.certificate


def test_server_cert_can_carry_the_gateway_spiffe_id(ca: CertificateAuthority) -> None:
    gateway = f"spiffe://{TD}/ns/shop/sa/edge"
    issued = ca.issue_server(["gw.example.test"], spiffe_id=gateway)
    assert issued.uris == (gateway,) and issued.dns_names == ("gw.example.test",)
    with pytest.raises(PkiError, match="this CA serves"):
        ca.issue_server(["gw.example.test"], spiffe_id="spiffe://other.org/sa/edge")


@pytest.mark.parametrize(
    ("names", "reason"),
    [
        ([], "at least one DNS name"),
        ("gw.example.test", "single string"),
        (["gw_example.test"], "not a valid DNS name"),
        (["-gw.example.test"], "not a valid DNS name"),
        (["gw.example.test."], "not a valid DNS name"),
        (["*"], "not a valid DNS name"),
        (["bücher.example"], "xn--"),
    ],
)
def test_server_cert_bad_names(ca: CertificateAuthority, names: Any, reason: str) -> None:
    with pytest.raises(PkiError, match=reason):
        ca.issue_server(names)


def test_https_to_the_gateway_cert_checks_the_hostname(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    creds = write_creds(tmp_path, ca.issue_server(["gw.example.test", "127.0.0.1"]), "gw")
    server = context(ssl.PROTOCOL_TLS_SERVER, ca.bundle_pem, creds)
    server.verify_mode = ssl.CERT_NONE  # outside clients bring no certificate
    client = context(ssl.PROTOCOL_TLS_CLIENT, ca.bundle_pem, None, check_hostname=True)

    for name in ("gw.example.test", "127.0.0.1"):
        result = tls_exchange(server, client, server_hostname=name)
        assert result.client_error is None, name
        assert result.reply == b"PING"

    wrong = tls_exchange(server, client, server_hostname="other.example.test")
    assert isinstance(wrong.client_error, ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in str(wrong.client_error)
