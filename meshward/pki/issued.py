"""An issued certificate with its private key, as the xDS translator and SDS need it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime


def utc_now() -> datetime:
    """The current time as an aware UTC datetime (the PKI's default clock)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class IssuedCert:
    """A leaf certificate, its key and its chain, all PEM.

    ``key_pem`` (unencrypted PKCS#8) is excluded from ``repr``/``str`` so that logging
    an ``IssuedCert`` never leaks the key (the PEM certificates are left out too, to keep
    log lines short: the serial, SANs and validity identify the certificate).
    ``chain_pem`` is the leaf followed by the issuing CA certificate: what a TLS server
    or client presents.
    """

    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    chain_pem: bytes = field(repr=False)
    serial: int
    not_before: datetime
    not_after: datetime
    uris: tuple[str, ...]
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...] = ()
    #: When it was issued; ``not_before`` is back-dated by the clock skew allowance.
    issued_at: datetime | None = None

    def renew_at(self) -> datetime:
        """When to replace this certificate: half-way from issue to expiry.

        Measured from the issue time, not from the back-dated ``not_before``: otherwise a
        short lifetime L would renew after (L - skew) / 2, immediately at L = 60 s.
        """
        start = self.issued_at or self.not_before
        return start + (self.not_after - start) / 2

    def serial_hex(self) -> str:
        """The serial as Envoy's admin ``/certs`` prints ``serial_number``.

        Envoy uses BoringSSL's ``BN_bn2hex`` lower-cased: whole bytes (so an even
        number of digits), leading zero bytes stripped, no separators.
        """
        if self.serial == 0:
            return "0"
        return self.serial.to_bytes((self.serial.bit_length() + 7) // 8, "big").hex()

    @property
    def spiffe_id(self) -> str | None:
        """The SPIFFE ID (the ``spiffe://`` URI SAN), or None for a plain server cert."""
        return next((u for u in self.uris if u.startswith("spiffe://")), None)

    def is_expired(self, now: datetime) -> bool:
        """True once ``now`` is at or past ``not_after``."""
        return now >= self.not_after
