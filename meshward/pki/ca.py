"""The mesh certificate authority: issues SPIFFE X.509-SVIDs and gateway server certs.

X.509-SVID rules followed (SPIFFE X509-SVID spec): a leaf carries exactly one URI SAN,
its SPIFFE ID, in the CA's trust domain; it is ``CA:FALSE`` with ``digitalSignature``
(never ``keyCertSign``/``cRLSign``); meshward SVIDs carry no DNS SANs and a subject of
``O=<trust domain>`` only, because identity lives in the SAN. The signing certificate is
``CA:TRUE`` with ``keyCertSign`` and, for the built-in CA, the trust domain's own ID
``spiffe://<trust domain>`` as URI SAN. Every leaf gets a fresh ECDSA P-256 key and a
random 128-bit serial; its ``not_before`` is back-dated 60 s for clock skew.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshward.pki import files
from meshward.pki.errors import PkiError
from meshward.pki.files import CaKey
from meshward.pki.issued import IssuedCert, utc_now
from meshward.pki.spiffe import trust_domain_of, validate_trust_domain, validate_workload_id

log = logging.getLogger("meshward.pki")

CA_LIFETIME = timedelta(days=3650)
CLOCK_SKEW = timedelta(seconds=60)
MIN_LIFETIME = timedelta(seconds=60)
MAX_SVID_LIFETIME = timedelta(hours=24)
MAX_SERVER_LIFETIME = timedelta(days=90)
#: How long a starting process waits for a CA that another process is creating.
PAIR_WAIT_SECONDS = 2.0
#: X.520 upper bound for CN and O.
_NAME_MAX = 64
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

_IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"


def _random_serial() -> int:
    """A random positive serial of up to 128 bits (never zero)."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def _signing_hash(key: CaKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _public_der(key: CaKey | x509.Certificate) -> bytes:
    public = key.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _seconds(moment: datetime) -> datetime:
    """X.509 times have one-second resolution."""
    return moment.replace(microsecond=0)


def _aware(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise PkiError(f"{name} {moment.isoformat()} has no time zone; pass an aware UTC time")
    return moment


def _key_usage(*, digital_signature: bool, key_encipherment: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _spiffe_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


class CertificateAuthority:
    """A signing CA for one SPIFFE trust domain.

    Build it with :meth:`load_or_create` (the built-in CA kept in a directory),
    :meth:`from_pem_files` (an operator-supplied CA) or :meth:`generate` (in memory).
    The private key never leaves this object except into ``ca.key`` on first creation.
    """

    def __init__(self, certificate: x509.Certificate, key: CaKey, trust_domain: str) -> None:
        self.trust_domain = trust_domain
        self._cert = certificate
        self._key = key
        self._bundle_pem = certificate.public_bytes(serialization.Encoding.PEM)

    def __repr__(self) -> str:
        return (
            f"CertificateAuthority(trust_domain={self.trust_domain!r}, "
            f"subject={self._cert.subject.rfc4514_string()!r})"
        )

    # ------------------------------------------------------------------ construction

    @classmethod
    def generate(cls, trust_domain: str, *, now: datetime | None = None) -> CertificateAuthority:
        """A new self-signed ECDSA P-256 root CA, in memory only (10 years, pathlen 0)."""
        validate_trust_domain(trust_domain)
        key = ec.generate_private_key(ec.SECP256R1())
        start = _seconds(_aware(now, "now") if now else utc_now())
        common_name = f"meshward CA {trust_domain}"
        attributes = [
            x509.NameAttribute(
                NameOID.COMMON_NAME,
                common_name if len(common_name) <= _NAME_MAX else "meshward CA",
            )
        ]
        if len(trust_domain) <= _NAME_MAX:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain))
        name = x509.Name(attributes)
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(_random_serial())
            .not_valid_before(start - CLOCK_SKEW)
            .not_valid_after(start + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                _key_usage(digital_signature=False, key_encipherment=False, ca=True),
                critical=True,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, trust_domain)

    @classmethod
    def load_or_create(cls, directory: Path, trust_domain: str) -> CertificateAuthority:
        """The built-in CA kept in ``directory`` (``ca.crt`` 0644, ``ca.key`` 0600).

        The first run creates the directory (0700) and a new root CA; later runs load
        it. Safe against a concurrent first run of another meshward process: the key is
        created with ``O_CREAT|O_EXCL`` (mode 0600 from the start) and ``ca.crt`` is
        renamed into place only once the key is complete.
        """
        validate_trust_domain(trust_domain)
        directory = Path(directory)
        cert_file, key_file = directory / CA_CERT_FILE, directory / CA_KEY_FILE
        files.ensure_private_dir(directory)
        if not cert_file.exists() and not key_file.exists():
            ca = cls.generate(trust_domain)
            try:
                ca._write_new(cert_file, key_file)
            except FileExistsError:
                pass  # another process won the race: load its CA below
            except OSError as err:
                raise PkiError(
                    f"{directory}: cannot write the CA files ({err.strerror}); "
                    "make the directory writable by meshward or choose another one"
                ) from None
            else:
                log.info(
                    "created the mesh CA",
                    extra={
                        "ca_cert": str(cert_file),
                        "trust_domain": trust_domain,
                        "serial": format(ca._cert.serial_number, "x"),
                        "not_after": ca.not_after.isoformat(),
                    },
                )
                return ca
        files.wait_for_pair(cert_file, key_file, PAIR_WAIT_SECONDS)
        return cls._load(cert_file, key_file, trust_domain, built_in=True)

    @classmethod
    def from_pem_files(
        cls, cert_file: Path, key_file: Path, trust_domain: str
    ) -> CertificateAuthority:
        """An operator-supplied CA: a PEM CA certificate and its unencrypted PEM key
        (ECDSA or RSA >= 2048 bits). Checks that the certificate is a CA that may sign
        certificates, is not expired, matches the key, and (if it carries a SPIFFE ID)
        belongs to ``trust_domain``."""
        validate_trust_domain(trust_domain)
        return cls._load(Path(cert_file), Path(key_file), trust_domain, built_in=False)

    @classmethod
    def _load(
        cls, cert_file: Path, key_file: Path, trust_domain: str, *, built_in: bool
    ) -> CertificateAuthority:
        cert = files.read_certificate(cert_file, "CA certificate")
        key = files.read_private_key(key_file)
        _check_ca(cert, key, trust_domain, cert_file, key_file, built_in=built_in)
        return cls(cert, key, trust_domain)

    def _write_new(self, cert_file: Path, key_file: Path) -> None:
        key_pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        files.write_new_private_file(key_file, key_pem)
        try:
            files.write_public_file(cert_file, self._bundle_pem)
        except BaseException:
            key_file.unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ properties

    @property
    def bundle_pem(self) -> bytes:
        """The trust bundle: the CA certificate, PEM."""
        return self._bundle_pem

    @property
    def certificate(self) -> x509.Certificate:
        """The CA certificate."""
        return self._cert

    @property
    def not_after(self) -> datetime:
        """When the CA certificate expires."""
        return self._cert.not_valid_after_utc

    # ------------------------------------------------------------------ issuing

    def issue_svid(
        self,
        spiffe_id: str,
        lifetime: timedelta = timedelta(hours=1),
        *,
        not_before: datetime | None = None,
        now: datetime | None = None,
    ) -> IssuedCert:
        """Issue an X.509-SVID for ``spiffe_id`` (a workload ID in this trust domain).

        Valid from ``now - 60 s`` to ``now + lifetime`` (``now`` defaults to the current
        time), or from ``not_before`` to ``not_before + lifetime`` when ``not_before``
        is given (a past ``not_before`` mints an expired certificate, for tests).
        ``lifetime`` must be 60 s to 24 h. EKU serverAuth + clientAuth.
        """
        validate_workload_id(spiffe_id, self.trust_domain)
        start, end, issued_at = self._window(lifetime, MAX_SVID_LIFETIME, "SVID", not_before, now)
        subject = (
            x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain)])
            if len(self.trust_domain) <= _NAME_MAX
            else x509.Name([])
        )
        issued = self._issue(
            subject=subject,
            sans=[x509.UniformResourceIdentifier(spiffe_id)],
            usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            key_encipherment=True,
            not_before=start,
            not_after=end,
            issued_at=issued_at,
        )
        log.debug(
            "issued SVID",
            extra={
                "spiffe_id": spiffe_id,
                "serial": issued.serial_hex(),
                "not_after": issued.not_after.isoformat(),
            },
        )
        return issued

    def issue_server(
        self,
        dns_names: Sequence[str],
        lifetime: timedelta = timedelta(hours=24),
        *,
        spiffe_id: str | None = None,
        now: datetime | None = None,
    ) -> IssuedCert:
        """Issue a gateway server certificate for outside clients.

        ``dns_names`` become DNS SANs (lowercased; ``*.`` wildcards allowed), IP
        literals become IP SANs. With ``spiffe_id`` the certificate also carries the
        gateway's SPIFFE ID as its one URI SAN. EKU serverAuth; lifetime 60 s to 90 days;
        valid from ``now - 60 s``.
        """
        dns, ips = _server_names(dns_names)
        if spiffe_id is not None:
            validate_workload_id(spiffe_id, self.trust_domain)
        start, end, issued_at = self._window(
            lifetime, MAX_SERVER_LIFETIME, "server certificate", None, now
        )
        attributes = []
        if dns and len(dns[0]) <= _NAME_MAX:
            attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, dns[0]))
        if len(self.trust_domain) <= _NAME_MAX:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain))
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
        sans += [x509.IPAddress(ip) for ip in ips]
        if spiffe_id is not None:
            sans.append(x509.UniformResourceIdentifier(spiffe_id))
        issued = self._issue(
            subject=x509.Name(attributes),
            sans=sans,
            usages=[ExtendedKeyUsageOID.SERVER_AUTH],
            key_encipherment=False,
            not_before=start,
            not_after=end,
            issued_at=issued_at,
        )
        log.debug(
            "issued server certificate",
            extra={
                "dns_names": list(dns_names),
                "serial": issued.serial_hex(),
                "not_after": issued.not_after.isoformat(),
            },
        )
        return issued

    def _window(
        self,
        lifetime: timedelta,
        maximum: timedelta,
        what: str,
        not_before: datetime | None,
        now: datetime | None,
    ) -> tuple[datetime, datetime, datetime]:
        """(not_before, not_after, issued_at): back-dated by the clock skew unless given."""
        if not MIN_LIFETIME <= lifetime <= maximum:
            raise PkiError(
                f"{what} lifetime {lifetime} is out of range; use between "
                f"{MIN_LIFETIME} and {maximum}"
            )
        if not_before is not None:
            start = _seconds(_aware(not_before, "not_before"))
            end = start + lifetime
            issued_at = start
        else:
            current = _seconds(_aware(now, "now") if now is not None else utc_now())
            if current >= self.not_after:
                raise PkiError(
                    f"the CA certificate ({self._cert.subject.rfc4514_string()}) expired at "
                    f"{self.not_after.isoformat()}; renew the CA (every proxy must then "
                    "trust the new bundle)"
                )
            start, end, issued_at = current - CLOCK_SKEW, current + lifetime, current
        # A certificate cannot outlive its issuer: clamp to the CA's expiry.
        return start, min(end, self.not_after), issued_at

    def _issue(
        self,
        *,
        subject: x509.Name,
        sans: list[x509.GeneralName],
        usages: list[x509.ObjectIdentifier],
        key_encipherment: bool,
        not_before: datetime,
        not_after: datetime,
        issued_at: datetime,
    ) -> IssuedCert:
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key()
        serial = _random_serial()
        ca_public = self._cert.public_key()
        assert isinstance(ca_public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(public)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(digital_signature=True, key_encipherment=key_encipherment, ca=False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            # RFC 5280 4.2.1.6: the SAN is critical when the subject is empty.
            .add_extension(x509.SubjectAlternativeName(sans), critical=len(subject) == 0)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
            )
            .sign(self._key, _signing_hash(self._key))
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return IssuedCert(
            cert_pem=cert_pem,
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            chain_pem=cert_pem + self._bundle_pem,
            serial=serial,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            uris=tuple(san.get_values_for_type(x509.UniformResourceIdentifier)),
            dns_names=tuple(san.get_values_for_type(x509.DNSName)),
            ip_addresses=tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
            issued_at=issued_at,
        )


def _check_ca(
    cert: x509.Certificate,
    key: CaKey,
    trust_domain: str,
    cert_file: Path,
    key_file: Path,
    *,
    built_in: bool,
) -> None:
    """Raise a :class:`PkiError` unless ``cert``/``key`` form a usable CA for the domain."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise PkiError(
            f"{cert_file}: not a CA certificate (no basicConstraints CA:TRUE); give the "
            "certificate of the CA that signs workload certificates, not a leaf certificate"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_cert_sign:
            raise PkiError(
                f"{cert_file}: the CA certificate's keyUsage lacks keyCertSign, so it may "
                "not sign certificates; give a CA certificate with keyCertSign"
            )
    except x509.ExtensionNotFound:
        pass
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 2048:
        raise PkiError(f"{key_file}: RSA key of {key.key_size} bits is too weak; use >= 2048")
    if _public_der(key) != _public_der(cert):
        raise PkiError(
            f"{key_file}: this private key does not belong to the certificate in "
            f"{cert_file}; give the key that matches the CA certificate"
        )
    for uri in _spiffe_uris(cert):
        domain = trust_domain_of(uri)
        if uri.startswith("spiffe://") and domain != trust_domain:
            fix = (
                f"set mesh.trust_domain to {domain!r}, or move {cert_file.parent} away to "
                f"create a new CA for {trust_domain!r} (every proxy must then trust it)"
                if built_in
                else f"set mesh.trust_domain to {domain!r} or give a CA for {trust_domain!r}"
            )
            raise PkiError(
                f"{cert_file}: the CA belongs to trust domain {domain!r} (URI SAN {uri}), "
                f"but meshward is configured for {trust_domain!r}; {fix}"
            )
    if utc_now() >= cert.not_valid_after_utc:
        raise PkiError(
            f"{cert_file}: the CA certificate expired at "
            f"{cert.not_valid_after_utc.isoformat()}; renew it (or give another CA)"
        )


def _server_names(names: Sequence[str]) -> tuple[list[str], list[_IpAddress]]:
    """Split server names into DNS names (validated, lowercased) and IP addresses."""
    if isinstance(names, str):
        raise PkiError(f"dns_names {names!r} is a single string; pass a list of names")
    dns: list[str] = []
    ips: list[_IpAddress] = []
    for raw in names:
        try:
            ip = ipaddress.ip_address(raw)
        except ValueError:
            pass
        else:
            if ip not in ips:
                ips.append(ip)
            continue
        name = raw.lower()
        labels = name[2:].split(".") if name.startswith("*.") else name.split(".")
        if (
            not name.isascii()
            or len(name) > 253
            or not all(_DNS_LABEL_RE.match(label) for label in labels)
        ):
            raise PkiError(
                f"server name {raw!r} is not a valid DNS name or IP address; use names like "
                "'api.example.com' or '*.example.com' (IDNA 'xn--' form for non-ASCII)"
            )
        if name not in dns:
            dns.append(name)
    if not dns and not ips:
        raise PkiError("a server certificate needs at least one DNS name or IP address")
    return dns, ips
