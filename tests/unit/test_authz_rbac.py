"""RBAC index: methods, path patterns, services, subjects, groups, default deny."""

from __future__ import annotations

import pytest

from authz.authorization.rbac import RbacIndex, RuleMatch, is_plain_path
from authz.identity.base import Identity
from meshward.policy.model import Binding, Permission, Policy, Role


def index(*roles: Role, bindings: tuple[Binding, ...]) -> RbacIndex:
    return RbacIndex(Policy.build(roles=roles, bindings=bindings))


ALICE = Identity("alice", (), "jwt")
BOB_STAFF = Identity("bob", ("staff",), "jwt")
CAROL = Identity("carol", ("customers",), "jwt")


@pytest.fixture(scope="module")
def rbac() -> RbacIndex:
    return index(
        Role("reader", (Permission(("GET",), ("/orders", "/orders/*")),)),
        Role("admin", (Permission((), ("*",)),)),
        Role("catalog", (Permission(("GET", "HEAD"), ("/items/*",), ("catalog",)),)),
        bindings=(
            Binding("staff-read", "reader", groups=("staff",)),
            Binding("alice-admin", "admin", subjects=("alice",)),
            Binding("customers-catalog", "catalog", groups=("customers", "staff")),
        ),
    )


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/orders", True),  # exact
        ("GET", "/orders/", True),  # prefix "/orders/" itself
        ("GET", "/orders/42/lines", True),  # deep prefix
        ("GET", "/ordersX", False),  # neither exact nor under "/orders/"
        ("GET", "/order", False),
        ("GET", "/", False),
        ("POST", "/orders", False),  # method not granted
        ("DELETE", "/orders/1", False),
    ],
)
def test_methods_and_path_patterns(rbac: RbacIndex, method: str, path: str, allowed: bool) -> None:
    match = rbac.match(BOB_STAFF, method, path, "orders")
    assert (match is not None) is allowed
    if allowed:
        assert match == RuleMatch("staff-read", "reader", 0)


def test_any_path_and_any_method_for_subject(rbac: RbacIndex) -> None:
    for method, path in [("DELETE", "/anything"), ("PATCH", "/"), ("GET", "/a/../b")]:
        assert rbac.match(ALICE, method, path, "whatever") == RuleMatch("alice-admin", "admin", 0)


def test_subject_binding_is_by_subject_not_group(rbac: RbacIndex) -> None:
    impostor = Identity("mallory", ("alice",), "jwt")
    assert rbac.match(impostor, "GET", "/x", "orders") is None


def test_group_binding_is_by_group_not_subject(rbac: RbacIndex) -> None:
    named_staff = Identity("staff", (), "jwt")
    assert rbac.match(named_staff, "GET", "/orders", "orders") is None


def test_services_restrict_a_permission(rbac: RbacIndex) -> None:
    assert rbac.match(CAROL, "GET", "/items/1", "catalog") == RuleMatch(
        "customers-catalog", "catalog", 0
    )
    assert rbac.match(CAROL, "GET", "/items/1", "orders") is None
    assert rbac.match(CAROL, "GET", "/items/1", "") is None
    assert rbac.match(CAROL, "HEAD", "/items/1", "catalog") is not None


def test_no_binding_denies(rbac: RbacIndex) -> None:
    assert rbac.match(Identity("nobody", ("nogroup",), "jwt"), "GET", "/orders", "o") is None
    assert index(bindings=()).match(ALICE, "GET", "/", "orders") is None


def test_first_matching_binding_in_policy_order_is_reported() -> None:
    rbac = index(
        Role("r1", (Permission(("POST",), ("/a",)), Permission(("GET",), ("/a",)))),
        Role("r2", (Permission(("GET",), ("*",)),)),
        bindings=(
            Binding("by-group", "r1", groups=("g",)),
            Binding("by-subject", "r2", subjects=("s",)),
        ),
    )
    identity = Identity("s", ("g",), "jwt")
    # by-group comes first in the policy, even though subject grants are looked at first.
    assert rbac.match(identity, "GET", "/a", "svc") == RuleMatch("by-group", "r1", 1)
    assert rbac.match(identity, "GET", "/b", "svc") == RuleMatch("by-subject", "r2", 0)


def test_unknown_role_grants_nothing() -> None:
    rbac = index(bindings=(Binding("b", "missing-role", subjects=("alice",)),))
    assert rbac.match(ALICE, "GET", "/", "svc") is None


@pytest.mark.parametrize(
    "path",
    [
        "/orders/../admin",
        "/orders/./x",
        "/orders/%2e%2e/admin",
        "/orders/%2E./admin",
        "/orders/..",
        "/orders/x%2f..%2fadmin",
        "/orders\\..\\admin",
    ],
)
def test_dot_segments_never_match_a_prefix(rbac: RbacIndex, path: str) -> None:
    assert not is_plain_path(path)
    assert rbac.match(BOB_STAFF, "GET", path, "orders") is None


@pytest.mark.parametrize("path", ["/orders/v1.2/x", "/orders/a..b", "/orders/.well", "/o%20x"])
def test_dots_inside_segments_are_fine(path: str) -> None:
    assert is_plain_path(path)


def test_rule_match_str() -> None:
    assert str(RuleMatch("b", "r", 2)) == "b/r#2"


def test_authorize_reads_method_path_and_service_of_the_request(rbac: RbacIndex) -> None:
    from authz.request import AuthzRequest
    from tests import authz_helpers as testing

    def request(method: str, path: str, service: str) -> AuthzRequest:
        message = testing.check_request(method, path, route="r", service=service)
        return AuthzRequest.from_check_request(message)

    assert rbac.authorize(CAROL, request("get", "/items/9?x=1", "catalog")) == RuleMatch(
        "customers-catalog", "catalog", 0
    )
    assert rbac.authorize(CAROL, request("GET", "/items/9", "orders")) is None
    assert rbac.authorize(CAROL, request("POST", "/items/9", "catalog")) is None
