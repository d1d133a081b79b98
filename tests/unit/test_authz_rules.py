"""The new rule kinds end to end: permissions, principals, conditions, deny/audit rules,
step-up MFA and the headers an allowed request carries upstream."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2

from authz import reasons
from authz.authorization.rbac import Evaluation, RbacIndex, RuleMatch
from authz.compiled import CompiledPolicy, compile_policy
from authz.decision import Decision, decide
from authz.identity.base import Identities, Identity
from authz.request import AuthzRequest
from authz.response import to_check_response
from meshward.policy.model import (
    ApiKey,
    Binding,
    ClaimCondition,
    Endpoint,
    Gateway,
    HeaderMatch,
    Issuer,
    MfaRequirement,
    Permission,
    Policy,
    Responses,
    Role,
    Route,
    RouteMatch,
    Service,
)
from tests import authz_helpers as testing

NOW = 1_800_000_000.0
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
MAIN = testing.DEMO_ISSUER
OTHER = "https://other.test"
MAIN_KEY = testing.ec_key("main-1")
OTHER_KEY = testing.ec_key("other-1")
BOT_KEY = "mk_bot_0123456789abcdef"
EDGE = testing.spiffe("edge")
CONSOLE = testing.spiffe("console")
BATCH_JOB = testing.spiffe("job-7", namespace="batch")

ISSUERS = (
    Issuer(
        name="main",
        issuer=MAIN,
        audiences=(testing.DEMO_AUDIENCE,),
        jwks=testing.jwks(MAIN_KEY),
        acr_levels=("bronze", "silver", "gold"),
    ),
    Issuer(
        name="other",
        issuer=OTHER,
        audiences=(testing.DEMO_AUDIENCE,),
        jwks=testing.jwks(OTHER_KEY),
        acr_levels=("silver", "platinum"),
    ),
)

#: Route name → its MFA demand (None: none).
ROUTE_MFA: dict[str, MfaRequirement | None] = {
    "api": None,
    "mfa-amr": MfaRequirement(amr=("otp", "hwk")),
    "mfa-acr": MfaRequirement(min_acr="silver"),
    "mfa-fresh": MfaRequirement(amr=("mfa",), max_age_seconds=300),
    "mfa-all": MfaRequirement(amr=("hwk",), min_acr="gold", max_age_seconds=60),
}

ANY = Role("any", (Permission(),))
DEFAULT_RESPONSES = Responses()


def build(
    *bindings: Binding,
    roles: tuple[Role, ...] = (),
    responses: Responses = DEFAULT_RESPONSES,
) -> Policy:
    routes = tuple(
        Route(name, RouteMatch(prefix="/"), "orders", mfa=mfa) for name, mfa in ROUTE_MFA.items()
    )
    return Policy.build(
        services=(Service("orders", (Endpoint("127.0.0.1", 10101),)),),
        gateways=(Gateway("edge", 10000, routes),),
        issuers=ISSUERS,
        roles=(ANY, *roles),
        bindings=bindings,
        api_keys=(ApiKey("bot", hashlib.sha256(BOT_KEY.encode()).hexdigest(), "bot", ("ci",)),),
        responses=responses,
    )


def compiled(
    *bindings: Binding, roles: tuple[Role, ...] = (), responses: Responses = DEFAULT_RESPONSES
) -> CompiledPolicy:
    return compile_policy(build(*bindings, roles=roles, responses=responses))


def token(
    subject: str = "alice",
    groups: tuple[str, ...] = (),
    *,
    issuer: str = MAIN,
    **extra: Any,
) -> str:
    key = MAIN_KEY if issuer == MAIN else OTHER_KEY
    return key.sign(testing.claims(subject, list(groups), issuer=issuer, now=NOW - 10, **extra))


def bearer(subject: str = "alice", groups: tuple[str, ...] = (), **extra: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {token(subject, groups, **extra)}"}


API_KEY = {"x-api-key": BOT_KEY}


def request(
    method: str = "GET",
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    *,
    route: str = "api",
    host: str = "api.example.com",
    principal: str = "",
    source_ip: str = "",
    port: int = 0,
) -> AuthzRequest:
    message = testing.check_request(
        method, path, headers, route=route, service="orders", host=host, principal=principal
    )
    if source_ip:
        message.attributes.source.address.socket_address.address = source_ip
    if port:
        message.attributes.destination.address.socket_address.port_value = port
    return AuthzRequest.from_check_request(message)


def decide_on(policy: CompiledPolicy, req: AuthzRequest) -> Decision:
    return decide(req, policy, NOW, decision_id="d-1")


def outcome(decision: Decision) -> tuple[bool, int, str]:
    return decision.allowed, decision.http_status, decision.reason


ALLOWED = (True, 200, reasons.ALLOWED)
FORBIDDEN = (False, 403, reasons.FORBIDDEN)
MISSING = (False, 401, reasons.MISSING_TOKEN)
DENIED = (False, 403, reasons.DENIED_BY_RULE)
STEP_UP = (False, 401, reasons.INSUFFICIENT_USER_AUTHENTICATION)


# ---- RbacIndex: identities in, rules out --------------------------------------------------


def user(
    subject: str = "alice",
    groups: tuple[str, ...] = (),
    claims: Mapping[str, Any] | None = None,
    method: str = "jwt",
) -> Identity:
    return Identity(subject, groups, method, MAIN, {"sub": subject, **(claims or {})})


def api_user(subject: str = "bot", groups: tuple[str, ...] = ()) -> Identity:
    return Identity(subject, groups, "api_key", "bot", None)


def workload(spiffe_id: str) -> Identity:
    return Identity(spiffe_id, (), "mtls", testing.DEMO_TRUST_DOMAIN)


def evaluate(
    policy: Policy,
    *,
    who: Identity | None = None,
    peer: Identity | None = None,
    method: str = "GET",
    path: str = "/",
    **kw: Any,
) -> Evaluation:
    return RbacIndex(policy).evaluate(Identities(peer, who), AuthzRequest.of(method, path, **kw))


def allows(policy: Policy, **kw: Any) -> bool:
    return evaluate(policy, **kw).allow is not None


def one_permission(permission: Permission) -> Policy:
    return build(Binding("alice-may", "r", subjects=("alice",)), roles=(Role("r", (permission,)),))


ALICE = user()


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.example.com", True),
        ("API.EXAMPLE.COM:8443", True),
        ("x.internal.test", True),
        ("a.b.internal.test:80", True),
        ("internal.test", False),
        ("www.example.com", False),
        ("", False),
    ],
)
def test_permission_hosts(host: str, expected: bool) -> None:
    policy = one_permission(Permission(hosts=("api.example.com", "*.internal.test")))
    assert allows(policy, who=ALICE, host=host) is expected


@pytest.mark.parametrize(
    ("port", "expected"), [(8443, True), (9443, True), (80, False), (0, False)]
)
def test_permission_ports_are_the_destination_port(port: int, expected: bool) -> None:
    policy = one_permission(Permission(ports=(8443, 9443)))
    assert allows(policy, who=ALICE, destination_port=port) is expected
    # and through a CheckRequest: attributes.destination.address.socket_address.port_value
    rbac = RbacIndex(policy)
    assert (rbac.authorize(Identities(None, ALICE), request(port=port)) is not None) is expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-tenant": "acme", "x-env": "prod-eu", "x-debug": ""}, True),
        ({"x-tenant": "acme", "x-env": "prod-", "x-debug": "1"}, True),
        ({"x-tenant": "acme", "x-env": "prod-eu"}, False),  # x-debug missing
        ({"x-tenant": "acme-corp", "x-env": "prod-eu", "x-debug": "1"}, False),  # not exact
        ({"x-tenant": "Acme", "x-env": "prod-eu", "x-debug": "1"}, False),  # case matters
        ({"x-tenant": "acme", "x-env": "staging", "x-debug": "1"}, False),  # prefix
        ({"x-tenant": "acme", "x-env": "prod", "x-debug": "1"}, False),
        ({}, False),
    ],
)
def test_permission_headers_all_required(headers: dict[str, str], expected: bool) -> None:
    policy = one_permission(
        Permission(
            headers=(
                HeaderMatch("x-tenant", "acme"),
                HeaderMatch("x-env", "prod-*"),
                HeaderMatch("x-debug", "*"),
            )
        )
    )
    assert allows(policy, who=ALICE, headers=headers) is expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/orders/42/items", True),
        ("/orders/42/items/7", False),
        ("/orders//items", False),
        ("/files/", True),
        ("/files/a/b", True),
        ("/files", False),
        ("/files/../orders/1/items", False),
    ],
)
def test_permission_path_templates(path: str, expected: bool) -> None:
    policy = one_permission(Permission(paths=("/orders/{*}/items", "/files/{**}")))
    assert allows(policy, who=ALICE, path=path) is expected


def test_every_aspect_of_a_permission_must_match_and_any_permission_grants() -> None:
    role = Role(
        "r",
        (
            Permission(("GET",), ("/a/*",), ("orders",), ("api.example.com",), (443,)),
            Permission(("POST",), ("/b",), headers=(HeaderMatch("x-csrf", "*"),)),
        ),
    )
    policy = build(Binding("alice-r", "r", subjects=("alice",)), roles=(role,))
    base = {"who": ALICE, "service": "orders", "host": "api.example.com", "destination_port": 443}
    assert evaluate(policy, path="/a/1", **base).allow == RuleMatch("alice-r", "r", 0)
    for change in (
        {"method": "PUT"},
        {"path": "/a"},
        {"service": "catalog"},
        {"host": "other.example.com"},
        {"destination_port": 80},
    ):
        assert not allows(policy, **{**base, "path": "/a/1", **change}), change
    assert evaluate(policy, method="POST", path="/b", headers={"x-csrf": "1"}, **base).allow == (
        RuleMatch("alice-r", "r", 1)
    )
    assert not allows(policy, method="POST", path="/b", **base)


# -- principals


def test_star_subject_is_any_user_identity_but_not_a_workload_or_nobody() -> None:
    policy = build(Binding("users", "any", subjects=("*",)))
    assert allows(policy, who=user("anyone"))
    assert allows(policy, who=api_user())
    assert allows(policy, who=user("anyone"), peer=workload(EDGE))
    assert not allows(policy, peer=workload(EDGE))
    assert not allows(policy)


def test_groups_are_any_of() -> None:
    policy = build(Binding("staff", "any", groups=("staff", "ops")))
    assert allows(policy, who=user("bob", ("ops",)))
    assert allows(policy, who=user("bob", ("x", "staff")))
    assert allows(policy, who=api_user("bot", ("staff",)))
    assert not allows(policy, who=user("bob", ("customers",)))
    assert not allows(policy, who=user("staff"))  # a subject is no group
    assert not allows(policy, peer=workload(EDGE))


@pytest.mark.parametrize(
    ("pattern", "spiffe_id", "expected"),
    [
        (EDGE, EDGE, True),
        (EDGE, CONSOLE, False),
        ("spiffe://meshward.local/ns/*/sa/edge", EDGE, True),
        ("spiffe://meshward.local/ns/*/sa/edge", "spiffe://meshward.local/ns/x/sa/edge", True),
        ("spiffe://meshward.local/ns/*/sa/edge", CONSOLE, False),
        ("spiffe://meshward.local/ns/batch/*", BATCH_JOB, True),
        ("spiffe://meshward.local/ns/batch/*", "spiffe://meshward.local/ns/batch/sa", True),
        ("spiffe://meshward.local/ns/batch/*", "spiffe://meshward.local/ns/batch", False),
        ("spiffe://meshward.local/ns/batch/*", EDGE, False),
        ("spiffe://other.local/ns/batch/*", BATCH_JOB, False),
    ],
)
def test_workload_patterns(pattern: str, spiffe_id: str, expected: bool) -> None:
    policy = build(Binding("w", "any", workloads=(pattern,)))
    assert allows(policy, peer=workload(spiffe_id)) is expected
    # A workload-only binding ignores an extra user identity, and never grants a user alone.
    assert allows(policy, peer=workload(spiffe_id), who=ALICE) is expected
    assert not allows(policy, who=user(spiffe_id))


def test_a_binding_naming_both_kinds_needs_both() -> None:
    policy = build(Binding("ops-via-console", "any", groups=("ops",), workloads=(CONSOLE,)))
    ops = user("olga", ("ops",))
    assert allows(policy, who=ops, peer=workload(CONSOLE))
    assert not allows(policy, who=ops)
    assert not allows(policy, peer=workload(CONSOLE))
    assert not allows(policy, who=ops, peer=workload(EDGE))
    assert not allows(policy, who=user("bob", ("staff",)), peer=workload(CONSOLE))


def test_a_user_binding_ignores_an_extra_workload_identity() -> None:
    policy = build(Binding("alice", "any", subjects=("alice",)))
    assert allows(policy, who=ALICE, peer=workload(EDGE))


def test_an_allow_binding_naming_no_principal_grants_nobody() -> None:
    # The loader rejects it ("grants its role to nobody"); a policy built in code or
    # decoded from the wire must not read it as "everyone".
    policy = build(Binding("nobody", "any"))
    assert not allows(policy)
    assert not allows(policy, who=ALICE)
    assert not allows(policy, peer=workload(EDGE))
    audited = build(Binding("nobody", "any", mode="audit"))
    assert evaluate(audited, who=ALICE).audit_allow is None


# -- conditions


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),
        ("2001:db8::5", True),
        ("10.9.0.1", False),  # in source_ips, but also in not_source_ips
        ("192.168.1.1", False),
        ("", False),  # unknown: in no block, so an allow limited to blocks fails
        ("garbage", False),
    ],
)
def test_allow_source_ips_and_not_source_ips(ip: str, expected: bool) -> None:
    policy = build(
        Binding(
            "office",
            "any",
            subjects=("alice",),
            source_ips=("10.0.0.0/8", "2001:db8::/32"),
            not_source_ips=("10.9.0.0/16",),
        )
    )
    assert allows(policy, who=ALICE, source_ip=ip) is expected


def test_not_source_ips_alone() -> None:
    policy = build(Binding("not-dmz", "any", subjects=("alice",), not_source_ips=("10.9.0.0/16",)))
    assert not allows(policy, who=ALICE, source_ip="10.9.1.1")
    assert allows(policy, who=ALICE, source_ip="10.1.1.1")
    # unknown: the allow cannot know the address is outside the excluded block
    assert not allows(policy, who=ALICE, source_ip="")
    assert not allows(policy, who=ALICE, source_ip="garbage")


@pytest.mark.parametrize(("ip", "denied"), [("10.1.2.3", True), ("8.8.8.8", False), ("", True)])
def test_deny_from_a_block_applies_to_an_unknown_address(ip: str, denied: bool) -> None:
    policy = build(
        Binding("users", "any", subjects=("*",)),
        Binding("lab", "any", effect="deny", source_ips=("10.0.0.0/8",)),
    )
    assert (evaluate(policy, who=ALICE, source_ip=ip).deny is not None) is denied


@pytest.mark.parametrize(("ip", "denied"), [("10.1.2.3", False), ("8.8.8.8", True), ("", True)])
def test_deny_from_outside_applies_to_an_unknown_address(ip: str, denied: bool) -> None:
    policy = build(
        Binding("users", "any", subjects=("*",)),
        Binding("outside", "any", effect="deny", not_source_ips=("10.0.0.0/8",)),
    )
    result = evaluate(policy, who=ALICE, source_ip=ip)
    assert (result.deny is not None) is denied
    assert (result.allow is not None) is not denied
    # through the whole decision, with the address from the CheckRequest
    decision = decide_on(compile_policy(policy), request(headers=bearer(), source_ip=ip))
    assert outcome(decision) == (DENIED if denied else ALLOWED)


CLAIMS = {
    "realm_access": {"roles": ["staff", "admin"]},
    "email_verified": True,
    "tenant": "acme",
    "level": 3,
    "https://example.com/team.v1": "blue",
}


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ((ClaimCondition("tenant", ("acme",)),), True),
        ((ClaimCondition("tenant", ("other", "acme")),), True),
        ((ClaimCondition("tenant", ("other",)),), False),
        ((ClaimCondition("realm_access.roles", ("admin",)),), True),  # nested path, list
        ((ClaimCondition("realm_access.roles", ("root",)),), False),
        ((ClaimCondition("email_verified", ("true",)),), True),  # bool as JSON text
        ((ClaimCondition("email_verified", ("false",)),), False),
        ((ClaimCondition("level", ("3",)),), True),  # number as JSON text
        ((ClaimCondition("https://example.com/team.v1", ("blue",)),), True),
        ((ClaimCondition("missing", ("x",)),), False),
        ((ClaimCondition("tenant", ("acme",)), ClaimCondition("level", ("3",))), True),
        ((ClaimCondition("tenant", ("acme",)), ClaimCondition("level", ("4",))), False),
    ],
)
def test_claim_conditions(conditions: tuple[ClaimCondition, ...], expected: bool) -> None:
    policy = build(Binding("claims", "any", subjects=("*",), claims=conditions))
    assert allows(policy, who=user("alice", claims=CLAIMS)) is expected
    # an API key carries no token claims: a claim condition never holds for it
    assert not allows(policy, who=api_user())


def test_claim_conditions_on_real_tokens() -> None:
    policy = compiled(
        Binding(
            "verified-admins",
            "any",
            subjects=("*",),
            claims=(
                ClaimCondition("realm_access.roles", ("admin",)),
                ClaimCondition("email_verified", ("true",)),
            ),
        )
    )
    good = bearer(realm_access={"roles": ["admin"]}, email_verified=True)
    assert outcome(decide_on(policy, request(headers=good))) == ALLOWED
    unverified = bearer(realm_access={"roles": ["admin"]}, email_verified=False)
    assert outcome(decide_on(policy, request(headers=unverified))) == FORBIDDEN
    string_true = bearer(realm_access={"roles": ["admin"]}, email_verified="yes")
    assert outcome(decide_on(policy, request(headers=string_true))) == FORBIDDEN
    assert outcome(decide_on(policy, request(headers=API_KEY))) == FORBIDDEN


def test_claims_on_a_workload_only_binding_read_the_user_token() -> None:
    policy = build(
        Binding(
            "edge-acme", "any", workloads=(EDGE,), claims=(ClaimCondition("tenant", ("acme",)),)
        )
    )
    assert not allows(policy, peer=workload(EDGE))
    assert allows(policy, peer=workload(EDGE), who=user("alice", claims=CLAIMS))


# ---- decide(): deny before allow, default deny ----------------------------------------------

ADMIN_PATHS = Role("admin-paths", (Permission(paths=("/admin/*",)),))


@pytest.mark.parametrize("deny_first", [True, False])
def test_deny_wins_whatever_the_binding_order(deny_first: bool) -> None:
    allow = Binding("alice-all", "any", subjects=("alice",))
    deny = Binding("no-admin", "admin-paths", subjects=("alice",), effect="deny")
    bindings = (deny, allow) if deny_first else (allow, deny)
    policy = compiled(*bindings, roles=(ADMIN_PATHS,))
    decision = decide_on(policy, request(path="/admin/users", headers=bearer()))
    assert outcome(decision) == DENIED
    assert decision.matched_rule == "no-admin/admin-paths#0"
    assert decision.subject == "alice"
    assert decision.www_authenticate == ""
    assert outcome(decide_on(policy, request(path="/orders", headers=bearer()))) == ALLOWED


def test_the_first_applying_deny_in_policy_order_is_named() -> None:
    policy = compiled(
        Binding("alice-all", "any", subjects=("alice",)),
        Binding("deny-admin-paths", "admin-paths", groups=("contractors",), effect="deny"),
        Binding("deny-everything", "any", subjects=("alice",), effect="deny"),
        roles=(ADMIN_PATHS,),
    )
    decision = decide_on(
        policy, request(path="/admin/x", headers=bearer("alice", ("contractors",)))
    )
    assert decision.matched_rule == "deny-admin-paths/admin-paths#0"
    decision = decide_on(policy, request(path="/admin/x", headers=bearer("alice")))
    assert decision.matched_rule == "deny-everything/any#0"


def test_a_deny_naming_nobody_applies_to_everyone_even_unauthenticated() -> None:
    policy = compiled(
        Binding("users", "any", subjects=("*",)),
        Binding("edge-all", "any", workloads=(EDGE,)),
        Binding("no-admin", "admin-paths", effect="deny"),
        roles=(ADMIN_PATHS,),
    )
    for headers, principal in ((None, ""), (bearer(), ""), (API_KEY, ""), (None, EDGE)):
        decision = decide_on(policy, request(path="/admin/x", headers=headers, principal=principal))
        # 403 denied_by_rule, not a 401 asking for a token that could not help
        assert outcome(decision) == DENIED, (headers, principal)
        assert decision.matched_rule == "no-admin/admin-paths#0"
        assert decision.www_authenticate == ""
    assert outcome(decide_on(policy, request(path="/x", headers=bearer()))) == ALLOWED


def test_a_deny_for_one_kind_does_not_touch_the_other() -> None:
    policy = compiled(
        Binding("users", "any", subjects=("*",)),
        Binding("edge-all", "any", workloads=(EDGE,)),
        Binding("no-edge", "admin-paths", workloads=(EDGE,), effect="deny"),
        roles=(ADMIN_PATHS,),
    )
    assert outcome(decide_on(policy, request(path="/admin/x", headers=bearer()))) == ALLOWED
    denied = decide_on(policy, request(path="/admin/x", principal=EDGE))
    assert outcome(denied) == DENIED
    both = decide_on(policy, request(path="/admin/x", headers=bearer(), principal=EDGE))
    assert outcome(both) == DENIED


def test_default_deny() -> None:
    policy = compiled()
    assert outcome(decide_on(policy, request())) == MISSING
    assert decide_on(policy, request()).www_authenticate == 'Bearer realm="meshward"'
    assert outcome(decide_on(policy, request(headers=bearer()))) == FORBIDDEN
    assert outcome(decide_on(policy, request(headers=API_KEY))) == FORBIDDEN
    # a workload alone, allowed nothing: a user token might still help
    assert outcome(decide_on(policy, request(principal=EDGE))) == MISSING
    assert outcome(decide_on(policy, request(principal=EDGE, headers=bearer()))) == FORBIDDEN


def test_an_invalid_credential_is_reported_before_any_rule() -> None:
    policy = compiled(Binding("no-admin", "admin-paths", effect="deny"), roles=(ADMIN_PATHS,))
    garbage = {"authorization": "Bearer not.a.token"}
    assert decide_on(policy, request(path="/admin/x", headers=garbage)).http_status == 401
    unknown_key = {"x-api-key": "nope"}
    assert decide_on(policy, request(path="/admin/x", headers=unknown_key)).reason == (
        reasons.INVALID_API_KEY
    )


# ---- audit rules -------------------------------------------------------------------------


def test_audit_deny_on_an_allowed_request_would_deny() -> None:
    policy = compiled(
        Binding("alice-all", "any", subjects=("alice",)),
        Binding("dry-no-admin", "admin-paths", subjects=("*",), effect="deny", mode="audit"),
        roles=(ADMIN_PATHS,),
    )
    decision = decide_on(policy, request(path="/admin/x", headers=bearer()))
    assert outcome(decision) == ALLOWED
    assert decision.matched_rule == "alice-all/any#0"
    assert decision.audit == ("deny:dry-no-admin/admin-paths#0",)
    assert decision.audit_outcome == "would_deny"
    # not applying: no audit at all
    other = decide_on(policy, request(path="/orders", headers=bearer()))
    assert (other.audit, other.audit_outcome) == ((), "")


def test_audit_allow_on_a_forbidden_or_unauthenticated_request_would_allow() -> None:
    policy = compiled(Binding("dry-users", "any", subjects=("*",), mode="audit"))
    forbidden = decide_on(policy, request(headers=bearer()))
    assert outcome(forbidden) == FORBIDDEN
    assert forbidden.audit == ("allow:dry-users/any#0",)
    assert forbidden.audit_outcome == "would_allow"
    assert forbidden.matched_rule == ""

    edge_policy = compiled(Binding("dry-edge", "any", workloads=(EDGE,), mode="audit"))
    missing = decide_on(edge_policy, request(principal=EDGE))
    assert outcome(missing) == MISSING
    assert (missing.audit, missing.audit_outcome) == (("allow:dry-edge/any#0",), "would_allow")


def test_audit_allow_does_not_claim_to_override_an_enforced_deny() -> None:
    policy = compiled(
        Binding("no-admin", "admin-paths", effect="deny"),
        Binding("dry-users", "any", subjects=("*",), mode="audit"),
        roles=(ADMIN_PATHS,),
    )
    decision = decide_on(policy, request(path="/admin/x", headers=bearer()))
    assert outcome(decision) == DENIED
    assert decision.audit == ("allow:dry-users/any#0",)
    assert decision.audit_outcome == ""


def test_audit_rules_that_agree_with_the_outcome_change_nothing() -> None:
    policy = compiled(
        Binding("alice-all", "any", subjects=("alice",)),
        Binding("dry-alice", "any", subjects=("alice",), mode="audit"),
        Binding("dry-deny-bob", "any", subjects=("bob",), effect="deny", mode="audit"),
    )
    allowed = decide_on(policy, request(headers=bearer()))
    assert (allowed.audit, allowed.audit_outcome) == (("allow:dry-alice/any#0",), "")
    bob = decide_on(policy, request(headers=bearer("bob")))
    assert outcome(bob) == FORBIDDEN
    assert (bob.audit, bob.audit_outcome) == (("deny:dry-deny-bob/any#0",), "")


def test_both_audit_kinds_are_listed_deny_first() -> None:
    policy = compiled(
        Binding("dry-users", "any", subjects=("*",), mode="audit"),
        Binding("dry-deny", "any", subjects=("*",), effect="deny", mode="audit"),
    )
    decision = decide_on(policy, request(headers=bearer()))
    assert outcome(decision) == FORBIDDEN
    assert decision.audit == ("deny:dry-deny/any#0", "allow:dry-users/any#0")
    assert decision.audit_outcome == "would_allow"


def test_audit_bindings_never_change_the_decision() -> None:
    enforced = (
        Binding("alice-all", "any", subjects=("alice",)),
        Binding("staff-admin", "admin-paths", groups=("staff",)),
        Binding("no-admin-outside", "admin-paths", effect="deny", not_source_ips=("10.0.0.0/8",)),
    )
    audited = (
        Binding("dry-all", "any", subjects=("*",), mode="audit"),
        Binding("dry-deny-all", "any", effect="deny", mode="audit"),
        Binding("dry-edge", "any", workloads=(EDGE,), mode="audit"),
    )
    plain = compiled(*enforced, roles=(ADMIN_PATHS,))
    with_audit = compiled(*audited[:1], *enforced, *audited[1:], roles=(ADMIN_PATHS,))
    for req in (
        request(),
        request(headers=bearer()),
        request(headers=bearer("bob", ("staff",)), path="/admin/x", source_ip="10.0.0.1"),
        request(headers=bearer("bob", ("staff",)), path="/admin/x", source_ip="8.8.8.8"),
        request(headers=bearer("carol")),
        request(headers=API_KEY),
        request(principal=EDGE),
        request(route="mfa-amr", headers=bearer()),
    ):
        a, b = decide_on(plain, req), decide_on(with_audit, req)
        assert (a.allowed, a.http_status, a.reason, a.matched_rule, a.www_authenticate) == (
            b.allowed,
            b.http_status,
            b.reason,
            b.matched_rule,
            b.www_authenticate,
        )
        assert a.audit == () and b.audit != ()


# ---- MFA (RFC 9470 step-up) -------------------------------------------------------------

MFA_POLICY = compiled(
    Binding("users", "any", subjects=("*",)),
    Binding("edge-all", "any", workloads=(EDGE,)),
)


def step_up(route: str, headers: Mapping[str, str] | None, principal: str = "") -> Decision:
    return decide_on(MFA_POLICY, request(route=route, headers=headers, principal=principal))


@pytest.mark.parametrize(
    ("amr", "expected"),
    [
        (["pwd", "otp"], ALLOWED),
        (["hwk"], ALLOWED),
        (["pwd"], STEP_UP),
        ([], STEP_UP),
        (None, STEP_UP),
        ("otp", STEP_UP),  # amr is a list (RFC 8176), not a string
        ([["otp"]], STEP_UP),
    ],
)
def test_mfa_amr_is_any_of(amr: Any, expected: tuple[bool, int, str]) -> None:
    extra = {} if amr is None else {"amr": amr}
    decision = step_up("mfa-amr", bearer(**extra))
    assert outcome(decision) == expected
    if expected == STEP_UP:
        assert decision.matched_rule == "users/any#0"  # the rule that would have allowed
        assert decision.www_authenticate == (
            'Bearer realm="meshward", error="insufficient_user_authentication", '
            'error_description="this route requires multi-factor authentication"'
        )


@pytest.mark.parametrize(
    ("issuer", "acr", "expected"),
    [
        (MAIN, "silver", ALLOWED),
        (MAIN, "gold", ALLOWED),
        (MAIN, "bronze", STEP_UP),
        (MAIN, "platinum", STEP_UP),  # above silver only in the other issuer's ladder
        (MAIN, None, STEP_UP),
        (MAIN, 2, STEP_UP),
        (OTHER, "silver", ALLOWED),
        (OTHER, "platinum", ALLOWED),
        (OTHER, "gold", STEP_UP),  # a level of another issuer's ladder does not count
        (OTHER, "bronze", STEP_UP),
    ],
)
def test_mfa_min_acr_per_issuer_ladder(
    issuer: str, acr: Any, expected: tuple[bool, int, str]
) -> None:
    extra = {} if acr is None else {"acr": acr}
    decision = step_up("mfa-acr", bearer(issuer=issuer, **extra))
    assert outcome(decision) == expected
    if expected == STEP_UP:
        # every acceptable level of every issuer, lowest first, without repeats
        assert decision.www_authenticate == (
            'Bearer realm="meshward", error="insufficient_user_authentication", '
            'error_description="this route requires a higher authentication level", '
            'acr_values="silver gold platinum"'
        )


@pytest.mark.parametrize(
    ("auth_time", "expected"),
    [
        (NOW - 10, ALLOWED),
        (NOW - 300, ALLOWED),
        (NOW - 301, STEP_UP),
        (NOW - 86400, STEP_UP),
        (None, STEP_UP),
        ("yesterday", STEP_UP),
        (True, STEP_UP),
    ],
)
def test_mfa_max_age_reads_auth_time(auth_time: Any, expected: tuple[bool, int, str]) -> None:
    extra = {} if auth_time is None else {"auth_time": auth_time}
    decision = step_up("mfa-fresh", bearer(amr=["mfa"], **extra))
    assert outcome(decision) == expected
    if expected == STEP_UP:
        assert decision.www_authenticate == (
            'Bearer realm="meshward", error="insufficient_user_authentication", '
            'error_description="this route requires a more recent sign-in", max_age="300"'
        )


def test_mfa_challenge_names_acr_values_and_max_age() -> None:
    decision = step_up("mfa-all", bearer(amr=["pwd"]))
    assert outcome(decision) == STEP_UP
    assert decision.www_authenticate == (
        'Bearer realm="meshward", error="insufficient_user_authentication", '
        'error_description="this route requires multi-factor authentication", '
        'acr_values="gold", max_age="60"'
    )
    ok = step_up("mfa-all", bearer(amr=["hwk"], acr="gold", auth_time=NOW - 60))
    assert outcome(ok) == ALLOWED
    response = to_check_response(decision)
    assert response.status.code == 16
    challenge = {h.header.key: h.header.value for h in response.denied_response.headers}
    assert challenge["www-authenticate"] == decision.www_authenticate


def test_mfa_an_api_key_never_meets_a_demand() -> None:
    decision = step_up("mfa-amr", API_KEY)
    assert outcome(decision) == STEP_UP
    assert "token from multi-factor sign-in" in decision.www_authenticate
    assert outcome(step_up("api", API_KEY)) == ALLOWED


def test_mfa_a_workload_alone_still_needs_a_user_token() -> None:
    assert outcome(step_up("api", None, EDGE)) == ALLOWED
    decision = step_up("mfa-amr", None, EDGE)
    assert outcome(decision) == MISSING
    assert decision.www_authenticate == 'Bearer realm="meshward"'
    with_token = step_up("mfa-amr", bearer(amr=["otp"]), EDGE)
    assert outcome(with_token) == ALLOWED


def test_mfa_a_user_not_allowed_at_all_gets_forbidden_not_a_challenge() -> None:
    policy = compiled(Binding("alice-only", "any", subjects=("alice",)))
    decision = decide_on(policy, request(route="mfa-amr", headers=bearer("mallory")))
    assert outcome(decision) == FORBIDDEN
    assert decision.www_authenticate == ""
    denied = compiled(Binding("users", "any", subjects=("*",)), Binding("no", "any", effect="deny"))
    assert outcome(decide_on(denied, request(route="mfa-amr", headers=bearer()))) == DENIED


def test_mfa_a_dry_run_allow_would_allow_only_if_the_step_up_demand_is_met() -> None:
    policy = compiled(Binding("try-mallory", "any", subjects=("mallory",), mode="audit"))
    weak = decide_on(policy, request(route="mfa-amr", headers=bearer("mallory", amr=["pwd"])))
    assert outcome(weak) == FORBIDDEN
    assert weak.audit == ("allow:try-mallory/any#0",)
    assert weak.audit_outcome == ""  # enforcing it would give a step-up 401, not an allow
    strong = decide_on(policy, request(route="mfa-amr", headers=bearer("mallory", amr=["otp"])))
    assert (outcome(strong), strong.audit_outcome) == (FORBIDDEN, "would_allow")
    plain = decide_on(policy, request(route="api", headers=bearer("mallory")))
    assert plain.audit_outcome == "would_allow"


# ---- responses: what an allowed request carries upstream ---------------------------------


def allowed_response(
    responses: Responses, headers: Mapping[str, str] | None, principal: str = ""
) -> tuple[dict[str, tuple[str, int]], list[str]]:
    policy = compiled(
        Binding("users", "any", subjects=("*",)),
        Binding("edge-all", "any", workloads=(EDGE,)),
        responses=responses,
    )
    decision = decide_on(policy, request(headers=headers, principal=principal))
    assert decision.allowed
    ok = to_check_response(decision, responses).ok_response
    sent = {h.header.key: (h.header.value, h.append_action) for h in ok.headers}
    return sent, list(ok.headers_to_remove)


def test_custom_header_names_overwrite_client_values() -> None:
    responses = Responses(subject_header="x-user", groups_header="x-roles", workload_header="x-via")
    sent, removed = allowed_response(responses, bearer("alice", ("staff", "ops")), EDGE)
    assert sent == {
        "x-meshward-decision-id": ("d-1", OVERWRITE),
        "x-user": ("alice", OVERWRITE),
        "x-roles": ("staff,ops", OVERWRITE),
        "x-via": (EDGE, OVERWRITE),
    }
    assert removed == ["x-api-key"]


def test_facts_without_a_value_remove_the_client_header() -> None:
    responses = Responses(subject_header="x-user", groups_header="x-roles", workload_header="x-via")
    sent, removed = allowed_response(responses, bearer("alice"))
    assert sent["x-user"] == ("alice", OVERWRITE)
    assert "x-roles" not in sent and "x-via" not in sent
    assert removed == ["x-api-key", "x-roles", "x-via"]
    # a workload alone: its SPIFFE ID is the subject too
    sent, removed = allowed_response(responses, None, EDGE)
    assert sent["x-user"] == (EDGE, OVERWRITE) and sent["x-via"] == (EDGE, OVERWRITE)
    assert removed == ["x-api-key", "x-roles"]


def test_disabled_headers_are_neither_sent_nor_removed() -> None:
    responses = Responses(subject_header="", groups_header="", workload_header="")
    sent, removed = allowed_response(responses, bearer("alice", ("staff",)), EDGE)
    assert sent == {"x-meshward-decision-id": ("d-1", OVERWRITE)}
    assert removed == ["x-api-key"]


def test_groups_with_a_comma_or_control_character_are_left_out() -> None:
    groups = ("staff", "a,b", "", "tab\there", "new\nline", "del\x7f", "ops", "space ok")
    sent, _ = allowed_response(Responses(), bearer("alice", groups))
    assert sent["x-meshward-groups"] == ("staff,ops,space ok", OVERWRITE)
    sent, removed = allowed_response(Responses(), bearer("alice", ("a,b", "c\r\n")))
    assert "x-meshward-groups" not in sent
    assert "x-meshward-groups" in removed


def test_remove_authorization() -> None:
    _, removed = allowed_response(Responses(remove_authorization=True), bearer())
    assert "authorization" in removed
    _, removed = allowed_response(Responses(), bearer())
    assert "authorization" not in removed
    # an API key is never passed upstream, whatever the setting
    _, removed = allowed_response(Responses(), {"authorization": f"ApiKey {BOT_KEY}"})
    assert {"authorization", "x-api-key"} <= set(removed)
