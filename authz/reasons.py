"""Reason codes: the one word that says why a request was allowed or denied.

They appear in the deny body, in spans (``meshward.reason``), in decision logs and as
a metrics label, so the set is closed and small. Every code but ``allowed`` is a deny.
"""

# ruff: noqa: S105  (reason codes, not passwords)

from __future__ import annotations

#: An identity with a matching permission.
ALLOWED = "allowed"
#: The request matched no meshward route (no ``meshward.route`` context extension).
NO_ROUTE = "no_route"
#: No credential of any supported kind was presented.
MISSING_TOKEN = "missing_token"
#: The credential is malformed, lacks a required claim, or has claims of the wrong type.
INVALID_TOKEN = "invalid_token"
#: ``exp`` is in the past.
TOKEN_EXPIRED = "token_expired"
#: ``nbf`` is in the future.
TOKEN_NOT_YET_VALID = "token_not_yet_valid"
#: ``iss`` names no issuer of the policy.
UNKNOWN_ISSUER = "unknown_issuer"
#: ``aud`` does not name any audience the issuer accepts.
BAD_AUDIENCE = "bad_audience"
#: ``alg`` is ``none`` or not one the issuer allows.
UNSUPPORTED_ALGORITHM = "unsupported_algorithm"
#: ``kid`` names no key of the issuer's JWKS (or no key fits the algorithm).
UNKNOWN_KEY = "unknown_key"
#: The signature does not verify with the issuer's key.
BAD_SIGNATURE = "bad_signature"
#: An API key (``x-api-key`` / ``Authorization: ApiKey``) that the policy does not know.
INVALID_API_KEY = "invalid_api_key"
#: Both a bearer token and an API key: authz will not choose between two identities.
AMBIGUOUS_CREDENTIALS = "ambiguous_credentials"
#: A valid identity without a permission for this method, path and service.
FORBIDDEN = "forbidden"
#: An enforced ``effect: deny`` binding applies (HTTP 403; deny rules win over allows).
DENIED_BY_RULE = "denied_by_rule"
#: Allowed by a rule, but the route demands stronger or fresher authentication than the
#: token shows (``amr``/``acr``/``auth_time``): HTTP 401, RFC 9470 challenge.
INSUFFICIENT_USER_AUTHENTICATION = "insufficient_user_authentication"
#: The mTLS peer's principal is not a well-formed SPIFFE ID of the policy's trust
#: domain (HTTP 403: the connection itself is not from a trusted workload).
UNTRUSTED_WORKLOAD = "untrusted_workload"
#: The CheckRequest could not be decoded.
MALFORMED_REQUEST = "malformed_request"
#: authz failed internally; it fails closed.
INTERNAL_ERROR = "internal_error"
#: authz has no policy yet (waiting for the first one from the xDS server): HTTP 503.
NO_POLICY = "no_policy"

#: Codes that mean "a credential was presented but is not acceptable" (HTTP 401 with
#: ``error="invalid_token"``).
INVALID_CREDENTIAL = frozenset(
    {
        INVALID_TOKEN,
        TOKEN_EXPIRED,
        TOKEN_NOT_YET_VALID,
        UNKNOWN_ISSUER,
        BAD_AUDIENCE,
        UNSUPPORTED_ALGORITHM,
        UNKNOWN_KEY,
        BAD_SIGNATURE,
    }
)

#: Every reason code.
ALL = frozenset(
    {
        ALLOWED,
        NO_ROUTE,
        MISSING_TOKEN,
        FORBIDDEN,
        DENIED_BY_RULE,
        INSUFFICIENT_USER_AUTHENTICATION,
        UNTRUSTED_WORKLOAD,
        MALFORMED_REQUEST,
        INTERNAL_ERROR,
        NO_POLICY,
        INVALID_API_KEY,
        AMBIGUOUS_CREDENTIALS,
    }
    | INVALID_CREDENTIAL
)
