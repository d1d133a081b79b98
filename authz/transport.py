"""authz's transport security: mTLS with SPIFFE identities on the Envoy → authz hop.

With ``--xds`` authz receives its X.509-SVID (``svid``: chain + key, for
``spiffe://<td>/ns/<ns>/sa/meshward-authz``) and the mesh CA bundle (``trust-bundle``)
as SDS ``Secret`` resources on its ADS stream (:mod:`authz.policy_source`), exactly as
Envoy does. :class:`ServerTls` turns them into gRPC server credentials made with
``grpc.dynamic_ssl_server_credentials``: a client certificate is *required* and must
chain to the bundle, and grpcio asks :meth:`ServerTls.fetch` before every new
handshake, so a rotated SVID or bundle applies to new connections without a restart
(established connections keep theirs until they close). Until the first SVID arrives
the server holds a throw-away self-signed certificate that is also its only trust
root: no client can complete a handshake (fail closed).

Chaining to the bundle is not enough: every call also checks that the peer's
certificate carries a URI SAN in the trust domain (``spiffe://<td>/``),
:func:`peer_spiffe_ids`; others are refused with ``PERMISSION_DENIED``.

Standalone (``--policy``) authz serves plaintext unless given ``--tls-cert``,
``--tls-key`` and ``--tls-ca`` PEM files (:func:`load_pem_files`): static mTLS.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

#: SDS secret names authz subscribes to (the names Envoy's node groups use too).
SVID_SECRET = "svid"  # noqa: S105 (a secret name, not a secret)
TRUST_BUNDLE_SECRET = "trust-bundle"  # noqa: S105
SECRET_NAMES = (SVID_SECRET, TRUST_BUNDLE_SECRET)
#: The SDS resource type (``envoy.extensions.transport_sockets.tls.v3.Secret``).
SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105

#: gRPC auth context properties that hold the peer certificate's SANs.
_SAN_PROPERTIES = ("peer_uri", "x509_subject_alternative_name")


class TlsMaterialError(ValueError):
    """PEM material that cannot serve TLS (says which part and why)."""


@dataclass(frozen=True)
class TlsMaterial:
    """What authz serves TLS with: its certificate chain and key, and the CA bundle
    client certificates must chain to (all PEM). ``key_pem`` is never shown."""

    chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    bundle_pem: bytes = field(repr=False)
    #: The SPIFFE ID of the certificate (``None`` for a certificate without one).
    spiffe_id: str | None = None
    serial: str = ""

    @classmethod
    def parse(cls, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> TlsMaterial:
        """Validate the PEM material (the key must match the leaf; the bundle must hold
        certificates); raises :class:`TlsMaterialError`."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
        except ValueError as exc:
            raise TlsMaterialError(f"certificate chain is not PEM certificates: {exc}") from None
        try:
            x509.load_pem_x509_certificates(bundle_pem)
        except ValueError as exc:
            raise TlsMaterialError(f"CA bundle is not PEM certificates: {exc}") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise TlsMaterialError(f"private key is not an unencrypted PEM key: {exc}") from None
        leaf = chain[0]
        raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if leaf.public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
            raise TlsMaterialError("private key does not match the certificate")
        spiffe_id = None
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
            spiffe_id = next((u for u in uris if u.startswith("spiffe://")), None)
        except x509.ExtensionNotFound:
            pass
        return cls(
            bytes(chain_pem),
            bytes(key_pem),
            bytes(bundle_pem),
            spiffe_id,
            format(leaf.serial_number, "x"),
        )

    @property
    def trust_domain(self) -> str | None:
        """The trust domain of :attr:`spiffe_id` (``None`` without one)."""
        if self.spiffe_id is None:
            return None
        return self.spiffe_id.removeprefix("spiffe://").split("/", 1)[0]

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key_pem, self.chain_pem)], root_certificates=self.bundle_pem
        )


def load_pem_files(cert: Path, key: Path, ca: Path) -> TlsMaterial:
    """Static material from ``--tls-cert``/``--tls-key``/``--tls-ca``; raises
    :class:`TlsMaterialError` naming the file that is missing or wrong."""
    data: dict[str, bytes] = {}
    for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        try:
            data[flag] = path.read_bytes()
        except OSError as exc:
            raise TlsMaterialError(f"{flag} {path}: {exc.strerror or exc}") from None
    try:
        return TlsMaterial.parse(data["--tls-cert"], data["--tls-key"], data["--tls-ca"])
    except TlsMaterialError as exc:
        raise TlsMaterialError(f"--tls-cert/--tls-key/--tls-ca: {exc}") from None


class ServerTls:
    """The current TLS material of one gRPC server, swappable while it serves.

    :meth:`server_credentials` once (when binding), :meth:`set` on every new SVID or
    bundle (from any thread); grpcio calls :meth:`fetch` before each handshake.
    """

    def __init__(self, material: TlsMaterial | None = None) -> None:
        self._lock = threading.Lock()
        self._material = material
        self._generation = 0 if material is None else 1
        self._fetched = -1

    @property
    def material(self) -> TlsMaterial | None:
        with self._lock:
            return self._material

    @property
    def ready(self) -> bool:
        """True once there is a certificate to serve (before: every handshake fails)."""
        return self.material is not None

    def set(self, material: TlsMaterial) -> None:
        """Serve ``material`` to new connections from now on."""
        with self._lock:
            if material == self._material:
                return
            self._material = material
            self._generation += 1

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpcio's certificate fetcher: the new configuration if it changed since the
        last handshake, else ``None`` (keep the current one)."""
        with self._lock:
            if self._material is None or self._fetched == self._generation:
                return None
            self._fetched = self._generation
            return self._material.configuration()

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials requiring a client certificate that chains to the bundle."""
        with self._lock:
            material = self._material
            if material is not None:
                self._fetched = self._generation
        initial = material.configuration() if material is not None else _unusable()
        return grpc.dynamic_ssl_server_credentials(
            initial, self.fetch, require_client_authentication=True
        )


def peer_spiffe_ids(auth_context: Mapping[str, Sequence[bytes]]) -> list[str]:
    """The ``spiffe://`` URI SANs of the verified peer certificate (from gRPC's auth
    context); empty for a plaintext peer."""
    ids: list[str] = []
    for prop in _SAN_PROPERTIES:
        for value in auth_context.get(prop, ()):
            text = value.decode("utf-8", "replace")
            if text.startswith("spiffe://") and text not in ids:
                ids.append(text)
    return ids


def _unusable() -> grpc.ServerCertificateConfiguration:
    """A throw-away self-signed certificate that is also the only trust root: no client
    certificate chains to it, so no handshake completes before the first SVID."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshward-authz (no SVID yet)")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], cert_pem)
