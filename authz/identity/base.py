"""The identity phase's one small interface.

A request can carry two kinds of identity at once:

- a *workload* identity: the mTLS peer (a SPIFFE ID), vouched for by the transport;
- a *user* identity: an end user's credential (a JWT, later an API key …).

An :class:`IdentityMethod` looks at a request for one kind of credential and answers
in one of three ways:

- an :class:`Identity` — the credential is present and valid;
- ``None`` — the request carries no credential of this kind (the next method of the
  same kind is tried; when none answers, the request has no identity of that kind);
- raises :class:`AuthenticationError` — a credential of this kind is present but not
  acceptable. The request is then rejected; later methods are not consulted, so a bad
  token can never fall through to a weaker method.

Which kind a method establishes is decided by where :mod:`authz.compiled` puts it
(``workload_methods`` or ``user_methods``), not by the method itself. The result of
the phase is one :class:`Identities`. A new method is a new module implementing
``authenticate``; the decision code does not change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from authz.request import AuthzRequest


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is asking: what RBAC bindings match against."""

    #: A user's subject, or a workload's SPIFFE ID.
    subject: str
    groups: tuple[str, ...] = ()
    #: The identity method that vouched for it: ``jwt``, ``mtls``, later ``api_key``.
    method: str = ""
    #: Who issued the credential (a JWT ``iss``, a trust domain, …); informational.
    issuer: str = ""
    #: The verified token's claims (JWT only; None for other methods): what claim
    #: conditions and MFA requirements read. Never logged or traced whole.
    claims: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)


class Identities(NamedTuple):
    """Everything the identity phase established about one request.

    (A named tuple: made once per Check, and cheaper to make than a frozen dataclass.)
    """

    #: The mTLS peer (``subject`` is its SPIFFE ID), when the connection has one.
    workload: Identity | None = None
    #: The end user (a verified JWT …), when the request carries a credential.
    user: Identity | None = None

    @property
    def subject(self) -> str:
        """The user's subject if any, else the workload's SPIFFE ID, else empty."""
        if self.user is not None:
            return self.user.subject
        return self.workload.subject if self.workload is not None else ""


NO_IDENTITIES = Identities()


class AuthenticationError(Exception):
    """A credential is present but not acceptable.

    ``reason`` is one of :data:`authz.reasons.INVALID_CREDENTIAL` (user credentials) or
    :data:`authz.reasons.UNTRUSTED_WORKLOAD` (the mTLS peer); ``description`` is a short
    fixed phrase safe to show the client (RFC 6750 ``error_description``): never key
    material, token contents or policy text.
    """

    def __init__(self, reason: str, description: str) -> None:
        super().__init__(f"{reason}: {description}")
        self.reason = reason
        self.description = description


class IdentityMethod(Protocol):
    """One way to establish who is asking. Implementations must be thread-safe."""

    #: Short name recorded in decisions and spans (``meshward.auth_method``).
    name: str

    def authenticate(self, request: AuthzRequest, now: float) -> Identity | None:
        """The request's identity, ``None`` without a credential of this kind.

        ``now`` is the decision's clock (Unix seconds), passed in so decisions stay a
        pure function of their inputs. Raises :class:`AuthenticationError`.
        """
        ...
