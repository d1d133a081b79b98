"""The credentials a policy's node groups need, issued on demand and rotated at half-life.

The xDS translator asks the store for each workload's SVID and each TLS gateway's
server certificate while building a snapshot; :meth:`CredentialStore.generation` goes
into the snapshot version so that a re-issued credential makes a new snapshot, and
:meth:`CredentialStore.next_renewal` tells the server when to rebuild.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from meshward.pki.ca import MAX_SERVER_LIFETIME, MAX_SVID_LIFETIME, MIN_LIFETIME
from meshward.pki.errors import PkiError
from meshward.pki.issued import IssuedCert, utc_now

if TYPE_CHECKING:
    from meshward.pki.ca import CertificateAuthority
    from meshward.policy.model import Policy


def _check_lifetime(name: str, value: timedelta, maximum: timedelta) -> None:
    if not MIN_LIFETIME <= value <= maximum:
        raise PkiError(f"{name} {value} is out of range; use between {MIN_LIFETIME} and {maximum}")


class CredentialStore:
    """Issues and caches the credentials a policy's node groups need; rotates at half-life.

    A cached credential is returned until ``clock()`` reaches its ``renew_at()`` (half
    its lifetime), then a new one (new key, new serial) replaces it. Certificates are
    issued relative to ``clock()``, so an injected clock drives the whole life cycle.
    Thread-safe.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        svid_lifetime: timedelta = timedelta(hours=1),
        server_lifetime: timedelta = timedelta(hours=24),
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        _check_lifetime("svid_lifetime", svid_lifetime, MAX_SVID_LIFETIME)
        _check_lifetime("server_lifetime", server_lifetime, MAX_SERVER_LIFETIME)
        self.ca = ca
        self._svid_lifetime = svid_lifetime
        self._server_lifetime = server_lifetime
        self._clock = clock
        self._lock = threading.Lock()
        self._svids: dict[str, IssuedCert] = {}
        #: gateway → (the names it was issued for, the certificate)
        self._servers: dict[str, tuple[tuple[tuple[str, ...], str | None], IssuedCert]] = {}

    def svid(self, spiffe_id: str) -> IssuedCert:
        """The current SVID for ``spiffe_id``; issued on first use and at half-life."""
        with self._lock:
            now = self._clock()
            cached = self._svids.get(spiffe_id)
            if cached is None or now >= cached.renew_at():
                cached = self.ca.issue_svid(spiffe_id, self._svid_lifetime, now=now)
                self._svids[spiffe_id] = cached
            return cached

    def server_cert(
        self, gateway: str, dns_names: Sequence[str], *, spiffe_id: str | None = None
    ) -> IssuedCert:
        """The current server certificate of ``gateway`` for ``dns_names``.

        Cached per gateway and names: a change of names (or of ``spiffe_id``) issues a
        new certificate that replaces the gateway's previous one.
        """
        wanted = (tuple(dns_names), spiffe_id)
        with self._lock:
            now = self._clock()
            entry = self._servers.get(gateway)
            if entry is None or entry[0] != wanted or now >= entry[1].renew_at():
                cert = self.ca.issue_server(
                    dns_names, self._server_lifetime, spiffe_id=spiffe_id, now=now
                )
                entry = (wanted, cert)
                self._servers[gateway] = entry
            return entry[1]

    def _all(self) -> list[IssuedCert]:
        return [*self._svids.values(), *(cert for _, cert in self._servers.values())]

    def rotate_due(self) -> bool:
        """True if any cached credential is at or past its ``renew_at()``."""
        with self._lock:
            now = self._clock()
            return any(now >= cert.renew_at() for cert in self._all())

    def next_renewal(self) -> datetime | None:
        """The earliest ``renew_at()`` of the cached credentials (None when empty)."""
        with self._lock:
            return min((cert.renew_at() for cert in self._all()), default=None)

    def forget_unused(self, keep: Iterable[str]) -> None:
        """Drop credentials that the policy no longer needs.

        ``keep`` holds the SPIFFE IDs and the gateway names still in use (see
        :func:`identities_in`): SVIDs whose ID and server certificates whose gateway
        is not in ``keep`` are dropped.
        """
        wanted = set(keep)
        with self._lock:
            self._svids = {k: v for k, v in self._svids.items() if k in wanted}
            self._servers = {k: v for k, v in self._servers.items() if k in wanted}

    def generation(self) -> str:
        """A short hash of every cached credential's serial.

        It changes whenever a credential is issued, re-issued or dropped, so the xDS
        snapshot version that includes it changes with the secrets.
        """
        with self._lock:
            parts = [f"svid {k} {v.serial_hex()}" for k, v in sorted(self._svids.items())]
            parts += [f"server {k} {v[1].serial_hex()}" for k, v in sorted(self._servers.items())]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def identities_in(policy: Policy) -> frozenset[str]:
    """What :meth:`CredentialStore.forget_unused` should keep for ``policy``: the SPIFFE
    ID of every node group's workload and the name of every gateway."""
    ids = {policy.spiffe_id(workload) for workload in policy.node_groups().values()}
    return frozenset(ids | {g.name for g in policy.gateways})
