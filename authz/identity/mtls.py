"""The mTLS peer as a workload identity: its SPIFFE ID.

When a listener requires client certificates, Envoy verifies the peer's certificate
against the mesh CA and puts its identity in ``CheckRequest.attributes.source.principal``
(the URI SAN first, else a DNS SAN, else the subject; empty without a client
certificate). This method accepts it when it is a well-formed SPIFFE ID of the
policy's trust domain:

- ``spiffe://<trust_domain>/<segment>[/<segment>…]`` with exactly the policy's
  ``mesh.trust_domain`` (lower case, as SPIFFE requires; no port, no user info);
- a non-empty path of non-empty segments of ``A-Z a-z 0-9 . - _``, none ``.`` or
  ``..``, no trailing ``/``, no query or fragment; at most 2048 bytes.

An empty principal → no workload identity (``None``), not an error. Anything else
(another trust domain, a DNS name, a malformed URI) raises
:class:`~authz.identity.base.AuthenticationError` with ``untrusted_workload``: the
connection is not from a workload this policy trusts, which RBAC must never see.

Checked without regular expressions; accepted principals (few: one per workload) are
cached, so a repeat costs a dict lookup.
"""

from __future__ import annotations

import threading

from authz import reasons
from authz.identity.base import AuthenticationError, Identity
from authz.request import AuthzRequest

#: Characters allowed in a SPIFFE ID path segment (SPIFFE ID spec §2.2).
SEGMENT_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_"
#: The SPIFFE ID spec's maximum URI length.
MAX_SPIFFE_ID_LENGTH = 2048
SCHEME = "spiffe://"


class MtlsMethod:
    """The ``mtls`` identity method for one trust domain (see the module docstring)."""

    name = "mtls"

    def __init__(self, trust_domain: str, *, cache_size: int = 1024) -> None:
        self.trust_domain = trust_domain
        self._prefix = f"{SCHEME}{trust_domain}/"
        self._cache: dict[str, Identity] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def authenticate(self, request: AuthzRequest, now: float) -> Identity | None:
        principal = request.source_principal
        if not principal:
            return None
        identity = self._cache.get(principal)
        if identity is not None:
            return identity
        problem = self.problem(principal)
        if problem is not None:
            raise AuthenticationError(reasons.UNTRUSTED_WORKLOAD, problem)
        identity = Identity(principal, (), self.name, self.trust_domain)
        if len(self._cache) < self._cache_size:  # full: just stop caching (few workloads)
            with self._lock:
                self._cache[principal] = identity
        return identity

    def problem(self, principal: str) -> str | None:
        """Why ``principal`` is not a SPIFFE ID of the trust domain (None when it is)."""
        if len(principal) > MAX_SPIFFE_ID_LENGTH:
            return "peer identity too long"
        if not principal.startswith(SCHEME):
            return "peer identity is not a SPIFFE ID"
        if not principal.startswith(self._prefix):
            return "peer identity is not of this trust domain"
        for segment in principal[len(self._prefix) :].split("/"):
            if not segment or segment.strip(SEGMENT_CHARS) or segment in (".", ".."):
                return "peer identity is not a well-formed SPIFFE ID"
        return None
