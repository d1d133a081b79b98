"""The identity phase's one small interface.

An :class:`IdentityMethod` looks at a request for one kind of credential (a JWT, an
API key, an mTLS peer certificate …) and answers in one of three ways:

- an :class:`Identity` — the credential is present and valid;
- ``None`` — the request carries no credential of this kind (the next method is tried;
  when none answers, the request is unauthenticated);
- raises :class:`AuthenticationError` — a credential of this kind is present but not
  acceptable. The request is then rejected; later methods are not consulted, so a bad
  token can never fall through to a weaker method.

A new method is a new module implementing ``authenticate``; the decision code does not
change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from authz.request import AuthzRequest


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is asking: what RBAC bindings match against."""

    subject: str
    groups: tuple[str, ...] = ()
    #: The identity method that vouched for it: ``jwt``, later ``api_key``, ``mtls``.
    method: str = ""
    #: Who issued the credential (a JWT ``iss``, a CA, …); informational.
    issuer: str = ""


class AuthenticationError(Exception):
    """A credential is present but not acceptable.

    ``reason`` is one of :data:`authz.reasons.INVALID_CREDENTIAL`; ``description`` is a
    short fixed phrase safe to show the client (RFC 6750 ``error_description``): never
    key material, token contents or policy text.
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
