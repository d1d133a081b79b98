"""Decision order, CheckResponse shape (statuses, headers, body) and the request view."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from opentelemetry.sdk.trace import TracerProvider

from authz import reasons
from authz.check import Checker
from authz.compiled import CompiledPolicy, compile_policy
from authz.decision import Decision, decide
from authz.identity.base import Identity
from authz.request import AuthzRequest
from authz.response import to_check_response
from meshward.policy.model import Policy
from tests import authz_helpers as testing

NOW = 1_800_000_000.0
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@pytest.fixture(scope="module")
def key() -> testing.SigningKey:
    return testing.rsa_key()


@pytest.fixture(scope="module")
def policy(key: testing.SigningKey) -> Policy:
    return testing.demo_policy(testing.jwks(key))


@pytest.fixture(scope="module")
def compiled(policy: Policy) -> CompiledPolicy:
    return compile_policy(policy)


def bearer(key: testing.SigningKey, subject: str, groups: list[str], **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {key.sign(testing.claims(subject, groups, now=NOW, **kw))}"}


def decide_for(compiled: CompiledPolicy, message: external_auth_pb2.CheckRequest) -> Decision:
    return decide(AuthzRequest.from_check_request(message), compiled, NOW)


def headers_of(options: Any) -> dict[str, tuple[str, int]]:
    return {o.header.key: (o.header.value, o.append_action) for o in options}


# -- decision order -------------------------------------------------------------


def test_no_route_is_denied_before_anything(
    compiled: CompiledPolicy, key: testing.SigningKey
) -> None:
    message = testing.check_request("GET", "/orders", bearer(key, "alice", []), route=None)
    decision = decide_for(compiled, message)
    assert (decision.allowed, decision.http_status, decision.reason) == (
        False,
        403,
        reasons.NO_ROUTE,
    )
    assert decision.subject == ""  # the token was not even looked at


def test_missing_token(compiled: CompiledPolicy) -> None:
    decision = decide_for(compiled, testing.check_request("GET", "/orders"))
    assert (decision.http_status, decision.reason) == (401, reasons.MISSING_TOKEN)
    assert decision.www_authenticate == 'Bearer realm="meshward"'


def test_non_bearer_credential_counts_as_missing(compiled: CompiledPolicy) -> None:
    message = testing.check_request("GET", "/orders", {"authorization": "Basic YTpi"})
    assert decide_for(compiled, message).reason == reasons.MISSING_TOKEN


@pytest.mark.parametrize(
    ("claims", "reason", "description"),
    [
        ({"ttl": -60}, reasons.TOKEN_EXPIRED, "token expired"),
        ({"issuer": "https://nope"}, reasons.UNKNOWN_ISSUER, "unknown issuer"),
        ({"audience": "nope"}, reasons.BAD_AUDIENCE, "token audience not accepted"),
    ],
)
def test_invalid_token_is_401_with_rfc6750_challenge(
    compiled: CompiledPolicy,
    key: testing.SigningKey,
    claims: dict[str, Any],
    reason: str,
    description: str,
) -> None:
    message = testing.check_request("GET", "/orders", bearer(key, "alice", [], **claims))
    decision = decide_for(compiled, message)
    assert (decision.allowed, decision.http_status, decision.reason) == (False, 401, reason)
    assert decision.auth_method == "jwt"
    assert decision.www_authenticate == (
        f'Bearer realm="meshward", error="invalid_token", error_description="{description}"'
    )


def test_garbage_token_is_invalid_token(compiled: CompiledPolicy) -> None:
    message = testing.check_request("GET", "/orders", {"authorization": "Bearer not-a-jwt"})
    decision = decide_for(compiled, message)
    assert (decision.http_status, decision.reason) == (401, reasons.INVALID_TOKEN)


def test_valid_without_permission_is_forbidden(
    compiled: CompiledPolicy, key: testing.SigningKey
) -> None:
    message = testing.check_request("GET", "/orders", bearer(key, "bob", ["customers"]))
    decision = decide_for(compiled, message)
    assert (decision.allowed, decision.http_status, decision.reason) == (
        False,
        403,
        reasons.FORBIDDEN,
    )
    assert (decision.subject, decision.auth_method, decision.matched_rule) == ("bob", "jwt", "")
    assert decision.www_authenticate == ""


def test_allowed_names_the_rule_and_context(
    compiled: CompiledPolicy, key: testing.SigningKey, policy: Policy
) -> None:
    message = testing.check_request(
        "POST", "/orders/7?dry=1", bearer(key, "alice", []), policy_version="proxy-v1"
    )
    decision = decide_for(compiled, message)
    assert decision.allowed and decision.http_status == 200
    assert decision.reason == reasons.ALLOWED
    assert decision.matched_rule == "alice-runs-orders/orders-admin#0"
    assert (decision.route, decision.service, decision.gateway) == ("orders-api", "orders", "edge")
    assert decision.policy_version == policy.version
    assert decision.proxy_policy_version == "proxy-v1"
    assert len(decision.decision_id) == 16


def test_group_grant_and_service_from_context(
    compiled: CompiledPolicy, key: testing.SigningKey
) -> None:
    message = testing.check_request(
        "GET", "/catalog/items", bearer(key, "carol", ["customers"]), route="catalog-api",
        service="catalog",
    )  # fmt: skip
    decision = decide_for(compiled, message)
    assert decision.allowed and decision.matched_rule == "everyone-reads-catalog/catalog-reader#0"


def test_decide_is_a_pure_function(compiled: CompiledPolicy, key: testing.SigningKey) -> None:
    request = AuthzRequest.from_check_request(
        testing.check_request("GET", "/orders", bearer(key, "bob", ["staff"]))
    )
    first = decide(request, compiled, NOW, decision_id="d1")
    assert first == decide(request, compiled, NOW, decision_id="d1")
    assert first.allowed
    assert decide(request, compiled, NOW + 10 * 3600, decision_id="d1").reason == (
        reasons.TOKEN_EXPIRED
    )


def test_a_bad_token_never_falls_through_to_a_later_method(
    compiled: CompiledPolicy, key: testing.SigningKey
) -> None:
    class Anyone:
        name = "anyone"

        def authenticate(self, request: AuthzRequest, now: float) -> Identity | None:
            return Identity("alice", (), "anyone")

    lenient = replace(compiled, user_methods=(*compiled.user_methods, Anyone()))
    bad = testing.check_request("GET", "/orders", bearer(key, "alice", [], audience="x"))
    assert decide_for(lenient, bad).reason == reasons.BAD_AUDIENCE
    none = testing.check_request("GET", "/orders")
    assert decide_for(lenient, none).auth_method == "anyone"


# -- CheckResponse ----------------------------------------------------------------


def test_deny_response_401(compiled: CompiledPolicy, key: testing.SigningKey) -> None:
    message = testing.check_request("GET", "/orders", bearer(key, "alice", [], ttl=-60))
    decision = decide_for(compiled, message)
    response = to_check_response(decision)
    assert response.status.code == 16  # UNAUTHENTICATED
    assert response.WhichOneof("http_response") == "denied_response"
    denied = response.denied_response
    assert denied.status.code == 401
    headers = headers_of(denied.headers)
    assert headers["content-type"] == ("application/json", OVERWRITE)
    assert headers["www-authenticate"][0] == (
        'Bearer realm="meshward", error="invalid_token", error_description="token expired"'
    )
    assert denied.body == (
        f'{{"decision":"deny","reason":"token_expired","decision_id":"{decision.decision_id}"}}'
    )


def test_deny_response_401_without_token_has_bare_challenge(compiled: CompiledPolicy) -> None:
    response = to_check_response(decide_for(compiled, testing.check_request("GET", "/orders")))
    assert response.status.code == 16
    assert headers_of(response.denied_response.headers)["www-authenticate"][0] == (
        'Bearer realm="meshward"'
    )


@pytest.mark.parametrize("route", [None, "orders-api"])
def test_deny_response_403(
    compiled: CompiledPolicy, key: testing.SigningKey, route: str | None
) -> None:
    message = testing.check_request("GET", "/orders", bearer(key, "bob", []), route=route)
    decision = decide_for(compiled, message)
    response = to_check_response(decision)
    assert response.status.code == 7  # PERMISSION_DENIED
    denied = response.denied_response
    assert denied.status.code == 403
    headers = headers_of(denied.headers)
    assert "www-authenticate" not in headers
    body = json.loads(denied.body)
    assert list(body) == ["decision", "reason", "decision_id"]
    assert body == {
        "decision": "deny",
        "reason": decision.reason,
        "decision_id": decision.decision_id,
    }
    assert denied.body == json.dumps(body, separators=(",", ":"))
    assert "orders" not in denied.body and "Traceback" not in denied.body


def test_allow_response_overwrites_client_subject(
    compiled: CompiledPolicy, key: testing.SigningKey
) -> None:
    spoofed = {**bearer(key, "alice", []), "x-meshward-subject": "root"}
    message = testing.check_request("DELETE", "/orders/1", spoofed)
    decision = decide_for(compiled, message)
    response = to_check_response(decision)
    assert response.status.code == 0
    assert response.WhichOneof("http_response") == "ok_response"
    headers = headers_of(response.ok_response.headers)
    assert headers == {
        "x-meshward-subject": ("alice", OVERWRITE),
        "x-meshward-decision-id": (decision.decision_id, OVERWRITE),
    }
    assert "root" not in str(response)


# -- request view -----------------------------------------------------------------


def test_request_view_parses_once() -> None:
    message = testing.check_request(
        "get",
        "/orders/1?q=2#frag",
        {"X-Request-Id": "rid-1", "Authorization": "Bearer t"},
        principal="spiffe://mesh/ns/a",
        policy_version="pv",
    )
    request = AuthzRequest.from_check_request(message)
    assert request.method == "GET"
    assert request.path == "/orders/1"
    assert request.request_id == "rid-1"
    assert request.headers["authorization"] == "Bearer t"
    assert request.source_principal == "spiffe://mesh/ns/a"
    assert (request.route, request.service, request.gateway, request.proxy_policy_version) == (
        "orders-api",
        "orders",
        "edge",
        "pv",
    )


def test_request_view_reads_header_map_when_headers_is_empty() -> None:
    message = testing.check_request("GET", "/x#y")
    header_map = message.attributes.request.http.header_map
    header_map.headers.add(key="Authorization", raw_value=b"Bearer raw")
    header_map.headers.add(key="x-a", value="1")
    header_map.headers.add(key="x-a", value="2")
    request = AuthzRequest.from_check_request(message)
    assert request.path == "/x"
    assert request.headers == {"authorization": "Bearer raw", "x-a": "1,2"}


def test_empty_check_request_is_no_route(compiled: CompiledPolicy) -> None:
    decision = decide_for(compiled, external_auth_pb2.CheckRequest())
    assert (decision.allowed, decision.reason) == (False, reasons.NO_ROUTE)


# -- fail closed -------------------------------------------------------------------


def test_checker_denies_undecodable_and_internal_errors(compiled: CompiledPolicy) -> None:
    tracer = TracerProvider().get_tracer("test")
    checker = Checker(compiled, tracer)
    malformed = checker.check(None)
    assert malformed.status.code == 7
    assert json.loads(malformed.denied_response.body)["reason"] == reasons.MALFORMED_REQUEST

    class Broken:
        name = "broken"

        def authenticate(self, request: AuthzRequest, now: float) -> Identity | None:
            raise RuntimeError("secret internal detail")

    checker.policy = replace(compiled, user_methods=(Broken(),))
    response = checker.check(testing.check_request("GET", "/orders"))
    assert response.status.code == 7
    assert response.denied_response.status.code == 500
    assert json.loads(response.denied_response.body)["reason"] == reasons.INTERNAL_ERROR
    assert "secret" not in str(response)


# -- workload identity (mTLS) --------------------------------------------------------

ORDERS = testing.spiffe("orders")
CONSOLE = testing.spiffe("console")


@pytest.fixture(scope="module")
def mesh(key: testing.SigningKey) -> CompiledPolicy:
    return compile_policy(testing.workload_policy(testing.jwks(key)))


def catalog(headers: dict[str, str] | None = None, principal: str = "", **kw: Any) -> Any:
    return testing.check_request(
        "GET", "/catalog/items", headers, route="catalog-api", service="catalog",
        principal=principal, **kw,
    )  # fmt: skip


def outcome(decision: Decision) -> tuple[bool, int, str, str, str, str]:
    return (
        decision.allowed,
        decision.http_status,
        decision.reason,
        decision.auth_method,
        decision.subject,
        decision.workload,
    )


def test_workload_only_binding_allows_the_peer_alone(mesh: CompiledPolicy) -> None:
    decision = decide_for(mesh, catalog(principal=ORDERS))
    assert outcome(decision) == (True, 200, reasons.ALLOWED, "mtls", ORDERS, ORDERS)
    assert decision.matched_rule == "orders-reads-catalog/catalog-reader#0"
    assert decision.www_authenticate == ""


def test_trailing_wildcard_binding(mesh: CompiledPolicy) -> None:
    job = testing.spiffe("nightly", namespace="batch")
    decision = decide_for(mesh, testing.check_request("GET", "/orders/1", principal=job))
    assert decision.allowed and decision.matched_rule == "batch-reads-orders/orders-reader#0"
    no_segment = "spiffe://meshward.local/ns/batch"
    decision = decide_for(mesh, testing.check_request("GET", "/orders/1", principal=no_segment))
    assert (decision.http_status, decision.reason) == (401, reasons.MISSING_TOKEN)


def test_workload_without_a_match_and_without_token_is_missing_token(
    mesh: CompiledPolicy,
) -> None:
    decision = decide_for(mesh, testing.check_request("DELETE", "/orders/1", principal=ORDERS))
    assert outcome(decision) == (False, 401, reasons.MISSING_TOKEN, "mtls", ORDERS, ORDERS)
    assert decision.www_authenticate == 'Bearer realm="meshward"'


def test_workload_and_token_without_a_match_is_forbidden(
    mesh: CompiledPolicy, key: testing.SigningKey
) -> None:
    message = testing.check_request(
        "DELETE", "/orders/1", bearer(key, "bob", ["customers"]), principal=ORDERS
    )
    decision = decide_for(mesh, message)
    assert outcome(decision) == (False, 403, reasons.FORBIDDEN, "mtls+jwt", "bob", ORDERS)
    assert decision.www_authenticate == ""


def test_binding_with_users_and_workloads_needs_both(
    mesh: CompiledPolicy, key: testing.SigningKey
) -> None:
    ops = bearer(key, "dave", ["ops"])
    alone = decide_for(mesh, testing.check_request("DELETE", "/orders/1", principal=CONSOLE))
    assert (alone.http_status, alone.reason) == (401, reasons.MISSING_TOKEN)
    user_alone = decide_for(mesh, testing.check_request("DELETE", "/orders/1", ops))
    assert outcome(user_alone) == (False, 403, reasons.FORBIDDEN, "jwt", "dave", "")
    other_peer = decide_for(
        mesh, testing.check_request("DELETE", "/orders/1", ops, principal=ORDERS)
    )
    assert other_peer.reason == reasons.FORBIDDEN
    both = decide_for(mesh, testing.check_request("DELETE", "/orders/1", ops, principal=CONSOLE))
    assert outcome(both) == (True, 200, reasons.ALLOWED, "mtls+jwt", "dave", CONSOLE)
    assert both.matched_rule == "ops-via-console/orders-admin#0"


def test_user_binding_still_allows_with_a_workload_present(
    mesh: CompiledPolicy, key: testing.SigningKey
) -> None:
    message = testing.check_request("POST", "/orders", bearer(key, "alice", []), principal=ORDERS)
    decision = decide_for(mesh, message)
    assert outcome(decision) == (True, 200, reasons.ALLOWED, "mtls+jwt", "alice", ORDERS)
    assert decision.matched_rule == "alice-runs-orders/orders-admin#0"


@pytest.mark.parametrize(
    "principal",
    [
        "spiffe://example.org/ns/default/sa/orders",
        "orders.default.svc",
        "spiffe://meshward.local/ns/../sa/orders",
    ],
)
def test_untrusted_workload_is_403_even_with_a_valid_token(
    mesh: CompiledPolicy, key: testing.SigningKey, principal: str
) -> None:
    alone = decide_for(mesh, catalog(principal=principal))
    assert outcome(alone) == (False, 403, reasons.UNTRUSTED_WORKLOAD, "mtls", "", principal)
    assert alone.www_authenticate == "" and alone.matched_rule == ""
    message = testing.check_request(
        "POST", "/orders", bearer(key, "alice", []), principal=principal
    )
    with_token = decide_for(mesh, message)
    assert outcome(with_token) == (
        False, 403, reasons.UNTRUSTED_WORKLOAD, "mtls+jwt", "alice", principal,
    )  # fmt: skip
    response = to_check_response(with_token)
    assert response.status.code == 7
    assert json.loads(response.denied_response.body)["reason"] == "untrusted_workload"


def test_bad_token_wins_over_untrusted_workload_and_no_route_over_both(
    mesh: CompiledPolicy, key: testing.SigningKey
) -> None:
    untrusted = "spiffe://example.org/ns/default/sa/orders"
    expired = bearer(key, "alice", [], ttl=-60)
    decision = decide_for(
        mesh, testing.check_request("GET", "/orders", expired, principal=untrusted)
    )
    assert (decision.http_status, decision.reason, decision.auth_method) == (
        401,
        reasons.TOKEN_EXPIRED,
        "mtls+jwt",
    )
    assert decision.www_authenticate.startswith('Bearer realm="meshward", error="invalid_token"')
    valid_peer_bad_token = decide_for(
        mesh, testing.check_request("GET", "/orders", expired, principal=ORDERS)
    )
    assert outcome(valid_peer_bad_token) == (
        False, 401, reasons.TOKEN_EXPIRED, "mtls+jwt", ORDERS, ORDERS,
    )  # fmt: skip
    no_route = decide_for(
        mesh, testing.check_request("GET", "/orders", expired, route=None, principal=untrusted)
    )
    assert outcome(no_route) == (False, 403, reasons.NO_ROUTE, "", "", "")


def test_no_credential_at_all_is_auth_method_none(mesh: CompiledPolicy) -> None:
    decision = decide_for(mesh, catalog())
    assert outcome(decision) == (False, 401, reasons.MISSING_TOKEN, "none", "", "")


def test_allow_response_sets_workload_header_overwriting_the_client(
    mesh: CompiledPolicy, key: testing.SigningKey
) -> None:
    spoofed = {"x-meshward-workload": testing.spiffe("admin"), "x-meshward-subject": "root"}
    decision = decide_for(mesh, catalog(spoofed, principal=ORDERS))
    response = to_check_response(decision)
    assert response.status.code == 0
    assert headers_of(response.ok_response.headers) == {
        "x-meshward-subject": (ORDERS, OVERWRITE),
        "x-meshward-decision-id": (decision.decision_id, OVERWRITE),
        "x-meshward-workload": (ORDERS, OVERWRITE),
    }
    # never forwarded: the API key header, and a client's groups when there are none
    assert list(response.ok_response.headers_to_remove) == ["x-api-key", "x-meshward-groups"]
    both = decide_for(
        mesh,
        testing.check_request(
            "DELETE", "/orders/1", {**bearer(key, "dave", ["ops"]), **spoofed}, principal=CONSOLE
        ),
    )
    values = headers_of(to_check_response(both).ok_response.headers)
    assert values["x-meshward-subject"] == ("dave", OVERWRITE)
    assert values["x-meshward-workload"] == (CONSOLE, OVERWRITE)
    assert values["x-meshward-groups"] == ("ops", OVERWRITE)


def test_allow_without_workload_removes_a_client_workload_header(
    mesh: CompiledPolicy, key: testing.SigningKey
) -> None:
    spoofed = {**bearer(key, "alice", []), "x-meshward-workload": ORDERS}
    response = to_check_response(
        decide_for(mesh, testing.check_request("POST", "/orders", spoofed))
    )
    assert response.status.code == 0
    assert "x-meshward-workload" not in headers_of(response.ok_response.headers)
    assert list(response.ok_response.headers_to_remove) == [
        "x-api-key",
        "x-meshward-groups",
        "x-meshward-workload",
    ]
