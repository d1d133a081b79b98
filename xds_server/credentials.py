"""Where the xDS server's certificates come from: the PKI, per policy, and when to rotate.

The translator is pure: it takes a :class:`~xds_server.translator.Credentials` value.
:class:`CredentialSource` builds that value for a policy from a
:class:`meshward.pki.CredentialStore` (the store issues on first use and re-issues at
half-life; this module only asks it for exactly what
:func:`~xds_server.translator.credential_needs` says the policy references, and tells
it to forget the rest). With the PKI wired, the Envoy → authz hop is mTLS too, so every
policy needs at least authz's SVID (workload :data:`~xds_server.translator.AUTHZ_GROUP`,
``spiffe://<td>/ns/<ns>/sa/meshward-authz``) and one per gateway; they are issued and
rotated like the others. Issuing happens in the xDS server process, in memory: the
only files the PKI ever writes are the CA's own (``ca.crt``, ``ca.key`` on first run).
Private keys leave this process only inside SDS responses to proxies; they are never
logged and never shown on status pages (only serials, SPIFFE IDs, names and dates).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from meshward.pki import CredentialStore, IssuedCert, PkiError, utc_now
from meshward.policy.model import Policy
from xds_server.translator import Credentials, credential_needs

log = logging.getLogger("meshward.xds")


class CredentialSource:
    """Turns a policy into the :class:`Credentials` its translation needs.

    ``clock`` must be the store's clock (it is what :meth:`seconds_to_renewal` measures
    against). Not thread-safe beyond what the store guarantees: use from the event loop.
    """

    def __init__(self, store: CredentialStore, clock: Callable[[], datetime] = utc_now) -> None:
        self.store = store
        self._clock = clock
        self._current: Credentials | None = None
        self._spiffe_ids: dict[str, str] = {}
        #: The store may hold credentials newer than the served ones (see abandon()).
        self._rebuild = False

    @property
    def trust_domain(self) -> str:
        return str(self.store.ca.trust_domain)

    @property
    def current(self) -> Credentials | None:
        """The credentials being served (the last :meth:`commit`), ``None`` before."""
        return self._current

    @property
    def bundle_pem(self) -> bytes:
        return bytes(self.store.ca.bundle_pem)

    def issue(self, policy: Policy) -> Credentials | None:
        """The credentials ``policy`` needs (always at least authz's SVID: the
        Envoy → authz hop is mTLS), issuing or re-issuing what is missing or past
        half-life. Nothing is dropped and the served
        state is unchanged until :meth:`commit` (the policy may still be refused).

        Raises ``ValueError`` (with the PKI's message) when the PKI cannot issue them,
        e.g. the policy's trust domain is not the CA's.
        """
        needs = credential_needs(policy, authz_mtls=True)
        if policy.mesh.trust_domain != self.trust_domain:
            raise ValueError(
                f"mesh.trust_domain is {policy.mesh.trust_domain!r} but the CA serves "
                f"{self.trust_domain!r}; restart `meshward xds` to use the policy's trust "
                "domain (with a CA for it), or keep the trust domain"
            )
        try:
            svids = {w: self.store.svid(policy.spiffe_id(w)) for w in needs.svids}
            servers = {
                g: self.store.server_cert(g, names) for g, names in needs.server_certs.items()
            }
        except PkiError as exc:
            raise ValueError(f"cannot issue certificates: {exc}") from None
        return Credentials(self.bundle_pem, svids, servers, self.store.generation())

    def commit(self, policy: Policy, issued: Credentials | None) -> Credentials | None:
        """``policy`` is being served with ``issued``: forget every other credential and
        return ``issued`` with the resulting generation (what the snapshot version
        carries)."""
        if issued is None:
            self.store.forget_unused(())
            self._current = None
            self._spiffe_ids = {}
            self._rebuild = False
            return None
        spiffe_ids = {w: policy.spiffe_id(w) for w in issued.svids}
        self.store.forget_unused({*spiffe_ids.values(), *issued.server_certs})
        self._current = Credentials(
            issued.bundle_pem, issued.svids, issued.server_certs, self.store.generation()
        )
        self._spiffe_ids = spiffe_ids
        self._rebuild = False
        return self._current

    def abandon(self) -> None:
        """The policy :meth:`issue` was called for was refused: drop whatever was issued
        for it alone, keeping what the served policy uses.

        :meth:`issue` may also have renewed a credential the served policy uses (one
        that was due): the store then holds a newer one than the proxies have, so the
        served policy is marked for a rebuild at the next rotation check."""
        current = self._current
        if current is None:
            self.store.forget_unused(())
        else:
            self.store.forget_unused({*self._spiffe_ids.values(), *current.server_certs})
        self._rebuild = current is not None

    def rotation_due(self) -> bool:
        """True once any issued credential reached half its lifetime (or the served
        credentials must be rebuilt after a refused policy, see :meth:`abandon`)."""
        return self._rebuild or bool(self.store.rotate_due())

    def seconds_to_renewal(self) -> float | None:
        """Seconds until the earliest renewal (≤ 0: due now); ``None``: nothing issued."""
        if self._rebuild:
            return 0.0
        renewal = self.store.next_renewal()
        if renewal is None:
            return None
        return (renewal - self._clock()).total_seconds()

    def status(self) -> dict[str, Any]:
        """JSON-able: the CA, the generation and every served certificate (no keys)."""
        out: dict[str, Any] = {
            "trust_domain": self.trust_domain,
            "generation": self._current.generation if self._current else None,
            "next_renewal": _iso(self.store.next_renewal()),
            "svids": {},
            "server_certs": {},
        }
        if self._current is not None:
            out["svids"] = {
                w: {"spiffe_id": self._spiffe_ids.get(w), **_cert_status(c)}
                for w, c in self._current.svids.items()
                if isinstance(c, IssuedCert)
            }
            out["server_certs"] = {
                g: {"dns_names": list(c.dns_names), **_cert_status(c)}
                for g, c in self._current.server_certs.items()
                if isinstance(c, IssuedCert)
            }
        return out

    def serials(self) -> dict[str, str]:
        """``svid:<workload>`` / ``server:<gateway>`` → serial (hex), for logs."""
        if self._current is None:
            return {}
        out = {
            f"svid:{w}": c.serial_hex()
            for w, c in self._current.svids.items()
            if isinstance(c, IssuedCert)
        }
        out.update(
            {
                f"server:{g}": c.serial_hex()
                for g, c in self._current.server_certs.items()
                if isinstance(c, IssuedCert)
            }
        )
        return out


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _cert_status(cert: IssuedCert) -> dict[str, Any]:
    return {
        "serial": cert.serial_hex(),
        "not_before": cert.not_before.isoformat(),
        "not_after": cert.not_after.isoformat(),
        "renew_at": cert.renew_at().isoformat(),
    }
