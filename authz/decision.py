"""The decision: a pure function of the parsed request, the compiled policy and a clock.

A request may carry a *workload* identity (the mTLS peer's SPIFFE ID, from
``source.principal``) and a *user* identity (a JWT) at once; both are established
first, then RBAC sees whichever are present. Order (the first that applies decides):

1. no ``meshward.route`` context extension → 403 ``no_route`` (Envoy matched no
   meshward route, so there is no policy for it); credentials are not looked at;
2. a user credential that is present but not acceptable → 401 with its reason
   (``invalid_token``, ``token_expired``, ``unknown_issuer``, ``bad_audience``, … see
   :mod:`authz.reasons`) and an RFC 6750 ``error="invalid_token"`` challenge — even
   when the peer is also untrusted (a bad token is reported as such). An unknown API
   key is ``invalid_api_key`` with an ``ApiKey realm="meshward"`` challenge; an API
   key together with a bearer token is ``ambiguous_credentials``;
3. a peer principal that is not a well-formed SPIFFE ID of the policy's trust domain
   → 403 ``untrusted_workload`` (an empty principal is no workload identity, not an
   error);
4. RBAC with the identities present (see :mod:`authz.authorization.rbac`: a binding
   naming users and workloads needs both). An enforced ``effect: deny`` rule that
   applies → 403 ``denied_by_rule`` naming it, whatever allows;
5. an allow rule that applies → allow, ``allowed``, naming the rule; ``subject`` is the
   user's subject if any, else the SPIFFE ID — unless the route demands MFA
   (:mod:`authz.authorization.mfa`): a user token that does not meet it → 401
   ``insufficient_user_authentication`` with the RFC 9470 challenge (naming the rule
   that would have allowed); no user token at all → step 6;
6. no allow and no user credential → 401 ``missing_token`` with a bare ``Bearer``
   challenge, also when a workload identity is present (a user token might still
   grant access; the rule is kept simple and predictable);
7. no allow with a valid user credential → 403 ``forbidden`` (default deny).

Dry-run rules (``mode: audit``) never change the outcome: the ones that applied are
listed in ``audit``, and ``audit_outcome`` says whether enforcing them would have
(``would_deny`` for an allowed request, ``would_allow`` for one denied in step 6/7).

``auth_method`` names the methods whose credentials were presented (valid or not):
``jwt``, ``api_key``, ``mtls``, ``mtls+jwt``, ``mtls+api_key``, or ``none``; empty
when identity was not looked at.
``workload`` is the peer's SPIFFE ID (on ``untrusted_workload``: the rejected
principal, for the span and decision log only).

No I/O, no globals, nothing but the inputs (and a random decision id when none is
given), so the serving loop around it can change freely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TypedDict

from authz import reasons
from authz.authorization.mfa import CompiledMfa
from authz.authorization.rbac import Evaluation
from authz.compiled import CompiledPolicy
from authz.identity.base import AuthenticationError, Identities, Identity
from authz.identity.mtls import MAX_SPIFFE_ID_LENGTH
from authz.request import AuthzRequest

#: The ``realm`` of every ``WWW-Authenticate`` challenge.
REALM = "meshward"
#: The challenge for an unknown API key.
API_KEY_CHALLENGE = f'ApiKey realm="{REALM}"'


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one Check, and everything spans, logs and responses report."""

    allowed: bool
    http_status: int
    reason: str
    decision_id: str
    #: The user's subject if any, else the workload's SPIFFE ID (see module docstring).
    subject: str = ""
    #: ``jwt``, ``api_key``, ``mtls``, ``mtls+jwt``, ``mtls+api_key`` or ``none`` (empty:
    #: identity not looked at).
    auth_method: str = ""
    #: The mTLS peer's SPIFFE ID, empty without one.
    workload: str = ""
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
    #: The user's groups (what the groups header carries upstream on allow).
    groups: tuple[str, ...] = ()
    #: The user's credential was an API key in the ``Authorization`` header (which the
    #: response then removes: it is meshward's credential, not the upstream's).
    credential_in_authorization: bool = False
    #: Dry-run (``mode: audit``) rules that applied, as ``<effect>:<rule>``.
    audit: tuple[str, ...] = ()
    #: ``would_deny`` / ``would_allow`` when enforcing the audited rules would change
    #: this decision; empty otherwise.
    audit_outcome: str = ""


class _Common(TypedDict):
    """The fields every decision of one request shares (passed as ``**common``)."""

    decision_id: str
    route: str
    service: str
    gateway: str
    policy_version: str
    proxy_policy_version: str


class _Seen(_Common):
    """… plus, once identity was looked at, the methods and the peer."""

    auth_method: str
    workload: str
    credential_in_authorization: bool


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
    common: _Common = {
        "decision_id": did,
        "route": request.route,
        "service": request.service,
        "gateway": request.gateway,
        "policy_version": policy.version,
        "proxy_policy_version": request.proxy_policy_version,
    }
    if not request.route:
        return Decision(allowed=False, http_status=403, reason=reasons.NO_ROUTE, **common)

    # Workload first (cheap, cached), but its error is reported after a bad token's.
    workload: Identity | None = None
    workload_error: AuthenticationError | None = None
    workload_method = ""
    for method in policy.workload_methods:
        try:
            workload = method.authenticate(request, now)
        except AuthenticationError as error:
            workload_error, workload_method = error, method.name
            break
        if workload is not None:
            workload_method = method.name
            break
    if workload is not None:
        peer = workload.subject
    elif workload_error is not None:
        peer = request.source_principal[:MAX_SPIFFE_ID_LENGTH]
    else:
        peer = ""

    user: Identity | None = None
    user_method = ""
    for method in policy.user_methods:
        try:
            user = method.authenticate(request, now)
        except AuthenticationError as error:
            return Decision(
                allowed=False,
                http_status=401,
                reason=error.reason,
                subject=workload.subject if workload is not None else "",
                auth_method=_auth_method(workload_method, method.name),
                workload=peer,
                www_authenticate=_challenge(method.name, error),
                **common,
            )
        if user is not None:
            user_method = method.name
            break

    # Every decision from here on names the same methods and peer.
    seen: _Seen = {
        **common,
        "auth_method": _auth_method(workload_method, user_method),
        "workload": peer,
        # An API key sent as ``Authorization: ApiKey …`` is meshward's credential: the
        # response strips the header; a key in x-api-key leaves it to the upstream.
        "credential_in_authorization": user_method == "api_key"
        and request.headers.get("authorization", "").lstrip()[:7].lower() == "apikey ",
    }
    if workload_error is not None:
        return Decision(
            allowed=False,
            http_status=403,
            reason=workload_error.reason,
            subject=user.subject if user is not None else "",
            **seen,
        )

    identities = Identities(workload, user)
    evaluation = policy.rbac.evaluate(identities, request)
    decision = _rbac_decision(evaluation, identities, request, policy, now=now, seen=seen)
    if not policy.rbac.has_audit:
        return decision
    return _with_audit(decision, evaluation, policy.mfa.get(request.route), user, now)


def _rbac_decision(
    evaluation: Evaluation,
    identities: Identities,
    request: AuthzRequest,
    policy: CompiledPolicy,
    *,
    now: float,
    seen: _Seen,
) -> Decision:
    """Steps 4-7 of the module docstring: deny rules, allow rules, MFA, default deny."""
    user = identities.user
    groups = user.groups if user is not None else ()
    if evaluation.deny is not None:
        return Decision(
            allowed=False,
            http_status=403,
            reason=reasons.DENIED_BY_RULE,
            subject=identities.subject,
            groups=groups,
            matched_rule=str(evaluation.deny),
            **seen,
        )
    allow = evaluation.allow
    if allow is not None:
        mfa = policy.mfa.get(request.route)
        if mfa is not None and user is not None:
            problem = mfa.problem(user, now)
            if problem is not None:
                return Decision(
                    allowed=False,
                    http_status=401,
                    reason=reasons.INSUFFICIENT_USER_AUTHENTICATION,
                    subject=user.subject,
                    groups=groups,
                    matched_rule=str(allow),
                    www_authenticate=mfa.challenge(REALM, problem),
                    **seen,
                )
        if mfa is None or user is not None:
            return Decision(
                allowed=True,
                http_status=200,
                reason=reasons.ALLOWED,
                subject=identities.subject,
                groups=groups,
                matched_rule=str(allow),
                **seen,
            )
        # An MFA route allowed to a workload alone: it still needs a user's token.
    if user is None:
        return Decision(
            allowed=False,
            http_status=401,
            reason=reasons.MISSING_TOKEN,
            subject=identities.subject,
            www_authenticate=bearer_challenge(None),
            **seen,
        )
    return Decision(
        allowed=False,
        http_status=403,
        reason=reasons.FORBIDDEN,
        subject=user.subject,
        groups=groups,
        **seen,
    )


def _with_audit(
    decision: Decision,
    evaluation: Evaluation,
    mfa: CompiledMfa | None,
    user: Identity | None,
    now: float,
) -> Decision:
    """Record the audited rules that applied, and whether enforcing them would change
    the outcome (a dry-run deny on an allowed request, a dry-run allow on a request
    denied for want of a grant — when the route's MFA demand, if any, is met too)."""
    audit = tuple(
        f"{m.effect}:{m}" for m in (evaluation.audit_deny, evaluation.audit_allow) if m is not None
    )
    if not audit:
        return decision
    outcome = ""
    if decision.allowed and evaluation.audit_deny is not None:
        outcome = "would_deny"
    elif (
        not decision.allowed
        and evaluation.audit_allow is not None
        and decision.reason in (reasons.FORBIDDEN, reasons.MISSING_TOKEN)
        # … and would get through the route's step-up demand (checked only here).
        and (mfa is None or (user is not None and mfa.problem(user, now) is None))
    ):
        outcome = "would_allow"
    return replace(decision, audit=audit, audit_outcome=outcome)


def _auth_method(workload_method: str, user_method: str) -> str:
    """``mtls+jwt``, ``mtls``, ``jwt`` … or ``none``: the methods that saw a credential."""
    if workload_method and user_method:
        return f"{workload_method}+{user_method}"
    return workload_method or user_method or "none"


def failure_decision(reason: str, policy_version: str, http_status: int = 403) -> Decision:
    """A deny for a request that could not be decided (undecodable, internal error)."""
    return Decision(
        allowed=False,
        http_status=http_status,
        reason=reason,
        decision_id=new_decision_id(),
        policy_version=policy_version,
    )


def _challenge(method: str, error: AuthenticationError) -> str:
    """The ``WWW-Authenticate`` value for a rejected user credential."""
    if error.reason == reasons.AMBIGUOUS_CREDENTIALS:
        return f'Bearer realm="{REALM}", {API_KEY_CHALLENGE}'
    if method == "api_key":
        return API_KEY_CHALLENGE
    return bearer_challenge(error.description)


def bearer_challenge(description: str | None) -> str:
    """RFC 6750 §3 challenge: bare when no token was sent, ``invalid_token`` otherwise."""
    if description is None:
        return f'Bearer realm="{REALM}"'
    # error_description allows %x20-21 / %x23-5B / %x5D-7E: no quote, no backslash.
    safe = "".join(c if " " <= c <= "~" and c not in '"\\' else " " for c in description)
    return f'Bearer realm="{REALM}", error="invalid_token", error_description="{safe}"'
