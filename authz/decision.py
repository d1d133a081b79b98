"""The decision: a pure function of the parsed request, the compiled policy and a clock.

Order (the first that applies decides):

1. no ``meshward.route`` context extension → 403 ``no_route`` (Envoy matched no
   meshward route, so there is no policy for it);
2. no credential of any supported kind → 401 ``missing_token``;
3. a credential that is not acceptable → 401 with its reason (``invalid_token``,
   ``token_expired``, ``unknown_issuer``, ``bad_audience``, … see
   :mod:`authz.reasons`) and an RFC 6750 ``error="invalid_token"`` challenge;
4. a valid identity without a matching permission → 403 ``forbidden`` (default deny);
5. otherwise → allow, ``allowed``, naming the rule that matched.

No I/O, no globals, nothing but the inputs (and a random decision id when none is
given), so the serving loop around it can change freely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from authz import reasons
from authz.compiled import CompiledPolicy
from authz.identity.base import AuthenticationError, Identity
from authz.request import AuthzRequest

#: The ``realm`` of every ``WWW-Authenticate`` challenge.
REALM = "meshward"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one Check, and everything spans, logs and responses report."""

    allowed: bool
    http_status: int
    reason: str
    decision_id: str
    subject: str = ""
    auth_method: str = ""
    route: str = ""
    service: str = ""
    gateway: str = ""
    #: The policy version authz decided with.
    policy_version: str = ""
    #: The policy version the proxy's route came from (``meshward.policy_version``).
    proxy_policy_version: str = ""
    #: ``binding/role#permission`` that allowed the request; empty on deny.
    matched_rule: str = ""
    #: The ``WWW-Authenticate`` value for 401 responses, else empty.
    www_authenticate: str = ""


def new_decision_id() -> str:
    """A short random id (16 hex digits) naming one decision in logs, spans and bodies."""
    return os.urandom(8).hex()


def decide(
    request: AuthzRequest,
    policy: CompiledPolicy,
    now: float,
    decision_id: str | None = None,
) -> Decision:
    """Decide ``request`` under ``policy`` at ``now`` (Unix seconds)."""
    did = decision_id if decision_id is not None else new_decision_id()
    common = {
        "decision_id": did,
        "route": request.route,
        "service": request.service,
        "gateway": request.gateway,
        "policy_version": policy.version,
        "proxy_policy_version": request.proxy_policy_version,
    }
    if not request.route:
        return Decision(allowed=False, http_status=403, reason=reasons.NO_ROUTE, **common)

    identity: Identity | None = None
    for method in policy.identity_methods:
        try:
            identity = method.authenticate(request, now)
        except AuthenticationError as error:
            return Decision(
                allowed=False,
                http_status=401,
                reason=error.reason,
                auth_method=method.name,
                www_authenticate=bearer_challenge(error.description),
                **common,
            )
        if identity is not None:
            break
    if identity is None:
        return Decision(
            allowed=False,
            http_status=401,
            reason=reasons.MISSING_TOKEN,
            www_authenticate=bearer_challenge(None),
            **common,
        )

    match = policy.rbac.authorize(identity, request)
    if match is None:
        return Decision(
            allowed=False,
            http_status=403,
            reason=reasons.FORBIDDEN,
            subject=identity.subject,
            auth_method=identity.method,
            **common,
        )
    return Decision(
        allowed=True,
        http_status=200,
        reason=reasons.ALLOWED,
        subject=identity.subject,
        auth_method=identity.method,
        matched_rule=str(match),
        **common,
    )


def failure_decision(reason: str, policy_version: str, http_status: int = 403) -> Decision:
    """A deny for a request that could not be decided (undecodable, internal error)."""
    return Decision(
        allowed=False,
        http_status=http_status,
        reason=reason,
        decision_id=new_decision_id(),
        policy_version=policy_version,
    )


def bearer_challenge(description: str | None) -> str:
    """RFC 6750 §3 challenge: bare when no token was sent, ``invalid_token`` otherwise."""
    if description is None:
        return f'Bearer realm="{REALM}"'
    # error_description allows %x20-21 / %x23-5B / %x5D-7E: no quote, no backslash.
    safe = "".join(c if " " <= c <= "~" and c not in '"\\' else " " for c in description)
    return f'Bearer realm="{REALM}", error="invalid_token", error_description="{safe}"'
