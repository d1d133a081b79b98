"""RBAC index: methods, path patterns, services, subjects, groups, default deny."""

from __future__ import annotations

import pytest

from authz.authorization.rbac import (
    RbacIndex,
    RuleMatch,
    _path_heads,
    is_plain_path,
    workload_pattern_matches,
)
from authz.identity.base import Identities, Identity
from authz.request import AuthzRequest
from meshward.policy.model import Binding, Permission, Policy, Role


def index(*roles: Role, bindings: tuple[Binding, ...]) -> RbacIndex:
    return RbacIndex(Policy.build(roles=roles, bindings=bindings))


def user(subject: str, groups: tuple[str, ...] = ()) -> Identities:
    return Identities(user=Identity(subject, groups, "jwt"))


ALICE = user("alice")
BOB_STAFF = user("bob", ("staff",))
CAROL = user("carol", ("customers",))


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
    impostor = user("mallory", ("alice",))
    assert rbac.match(impostor, "GET", "/x", "orders") is None


def test_group_binding_is_by_group_not_subject(rbac: RbacIndex) -> None:
    named_staff = user("staff")
    assert rbac.match(named_staff, "GET", "/orders", "orders") is None


def test_services_restrict_a_permission(rbac: RbacIndex) -> None:
    assert rbac.match(CAROL, "GET", "/items/1", "catalog") == RuleMatch(
        "customers-catalog", "catalog", 0
    )
    assert rbac.match(CAROL, "GET", "/items/1", "orders") is None
    assert rbac.match(CAROL, "GET", "/items/1", "") is None
    assert rbac.match(CAROL, "HEAD", "/items/1", "catalog") is not None


def test_no_binding_denies(rbac: RbacIndex) -> None:
    assert rbac.match(user("nobody", ("nogroup",)), "GET", "/orders", "o") is None
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
    identity = user("s", ("g",))
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


# -- workload principals (SPIFFE ID patterns) ---------------------------------------

TD = "spiffe://meshward.local"


def workload(spiffe_id: str, user_identity: Identities | None = None) -> Identities:
    return Identities(
        workload=Identity(spiffe_id, (), "mtls", "meshward.local"),
        user=user_identity.user if user_identity is not None else None,
    )


@pytest.mark.parametrize(
    ("pattern", "spiffe_id", "matches"),
    [
        # exact
        (f"{TD}/ns/default/sa/orders", f"{TD}/ns/default/sa/orders", True),
        (f"{TD}/ns/default/sa/orders", f"{TD}/ns/default/sa/orders2", False),
        (f"{TD}/ns/default/sa/orders", f"{TD}/ns/default/sa/orders/x", False),
        # "*" in the middle: exactly one segment
        (f"{TD}/ns/*/sa/orders", f"{TD}/ns/shop/sa/orders", True),
        (f"{TD}/ns/*/sa/orders", f"{TD}/ns/a/b/sa/orders", False),
        (f"{TD}/ns/*/sa/orders", f"{TD}/ns/sa/orders", False),
        (f"{TD}/ns/*/sa/orders", f"{TD}/ns/shop/sa/catalog", False),
        (f"{TD}/*/*", f"{TD}/a/b", True),
        (f"{TD}/*/*", f"{TD}/a", False),
        # trailing "/*": one or more segments
        (f"{TD}/ns/shop/*", f"{TD}/ns/shop/sa", True),
        (f"{TD}/ns/shop/*", f"{TD}/ns/shop/sa/orders", True),
        (f"{TD}/ns/shop/*", f"{TD}/ns/shop", False),  # needs at least one segment
        (f"{TD}/ns/shop/*", f"{TD}/ns/shopping/sa/orders", False),
        (f"{TD}/*", f"{TD}/anything/at/all", True),
        (f"{TD}/ns/*/sa/*", f"{TD}/ns/shop/sa/orders/v2", True),
        (f"{TD}/ns/*/sa/*", f"{TD}/ns/shop/sa", False),
        # never a partial segment: "ord*" is a literal, not a wildcard
        (f"{TD}/ns/default/sa/ord*", f"{TD}/ns/default/sa/orders", False),
        (f"{TD}/ns/def*/sa/orders", f"{TD}/ns/default/sa/orders", False),
        # another trust domain never matches
        ("spiffe://example.org/ns/default/sa/orders", f"{TD}/ns/default/sa/orders", False),
        ("spiffe://example.org/*", f"{TD}/ns/default/sa/orders", False),
        ("spiffe://meshward.local.evil/*", f"{TD}/ns/default/sa/orders", False),
        ("spiffe://meshward/*", f"{TD}/ns/default/sa/orders", False),
    ],
)
def test_workload_patterns(pattern: str, spiffe_id: str, matches: bool) -> None:
    assert workload_pattern_matches(pattern, spiffe_id) is matches
    # … and the compiled index agrees (exact dict or split segments).
    rbac = index(
        Role("any", (Permission((), ("*",)),)),
        bindings=(Binding("b", "any", workloads=(pattern,)),),
    )
    found = rbac.match(workload(spiffe_id), "GET", "/", "svc")
    assert (found == RuleMatch("b", "any", 0)) if matches else (found is None)


@pytest.fixture(scope="module")
def mixed() -> RbacIndex:
    return index(
        Role("read", (Permission(("GET",), ("*",)),)),
        Role("write", (Permission(("POST",), ("*",)),)),
        Role("delete", (Permission(("DELETE",), ("*",)),)),
        bindings=(
            Binding("users-read", "read", subjects=("alice",), groups=("staff",)),
            Binding("orders-writes", "write", workloads=(f"{TD}/ns/default/sa/orders",)),
            Binding(
                "ops-via-console",
                "delete",
                groups=("ops",),
                workloads=(f"{TD}/ns/default/sa/console", f"{TD}/ns/tools/*"),
            ),
        ),
    )


ORDERS = f"{TD}/ns/default/sa/orders"
CONSOLE = f"{TD}/ns/default/sa/console"


def test_user_only_binding_needs_the_user_and_ignores_the_workload(mixed: RbacIndex) -> None:
    assert mixed.match(user("alice"), "GET", "/", "s") == RuleMatch("users-read", "read", 0)
    assert mixed.match(workload(ORDERS, user("bob", ("staff",))), "GET", "/", "s") is not None
    assert mixed.match(workload(ORDERS), "GET", "/", "s") is None  # a workload is no user
    assert mixed.match(Identities(), "GET", "/", "s") is None


def test_workload_only_binding_needs_the_workload_and_ignores_the_user(mixed: RbacIndex) -> None:
    assert mixed.match(workload(ORDERS), "POST", "/", "s") == RuleMatch("orders-writes", "write", 0)
    assert mixed.match(workload(ORDERS, user("mallory")), "POST", "/", "s") is not None
    assert mixed.match(workload(CONSOLE), "POST", "/", "s") is None
    # a user whose subject happens to be the SPIFFE ID is still not that workload
    assert mixed.match(user(ORDERS), "POST", "/", "s") is None


def test_binding_naming_users_and_workloads_requires_both(mixed: RbacIndex) -> None:
    ops = user("dave", ("ops",))
    both = RuleMatch("ops-via-console", "delete", 0)
    assert mixed.match(workload(CONSOLE), "DELETE", "/", "s") is None  # workload alone
    assert mixed.match(ops, "DELETE", "/", "s") is None  # user alone
    assert mixed.match(workload(CONSOLE, ops), "DELETE", "/", "s") == both
    assert mixed.match(workload(f"{TD}/ns/tools/sa/cli", ops), "DELETE", "/", "s") == both
    assert mixed.match(workload(ORDERS, ops), "DELETE", "/", "s") is None  # wrong workload
    assert mixed.match(workload(CONSOLE, user("eve", ("staff",))), "DELETE", "/", "s") is None


def test_policy_order_across_user_and_workload_grants() -> None:
    rbac = index(
        Role("any", (Permission((), ("*",)),)),
        bindings=(
            Binding("first-both", "any", subjects=("s",), workloads=(f"{TD}/*",)),
            Binding("second-workload", "any", workloads=(ORDERS,)),
            Binding("third-user", "any", subjects=("s",)),
        ),
    )
    assert rbac.match(workload(ORDERS, user("s")), "GET", "/", "x") == RuleMatch(
        "first-both", "any", 0
    )
    assert rbac.match(workload(ORDERS), "GET", "/", "x") == RuleMatch("second-workload", "any", 0)
    assert rbac.match(user("s"), "GET", "/", "x") == RuleMatch("third-user", "any", 0)


def test_workload_grants_still_check_method_path_and_service(mixed: RbacIndex) -> None:
    assert mixed.match(workload(ORDERS), "GET", "/", "s") is None
    rbac = index(
        Role("cat", (Permission(("GET",), ("/items/*",), ("catalog",)),)),
        bindings=(Binding("b", "cat", workloads=(ORDERS,)),),
    )
    assert rbac.match(workload(ORDERS), "GET", "/items/1", "catalog") is not None
    assert rbac.match(workload(ORDERS), "GET", "/items/1", "orders") is None
    assert rbac.match(workload(ORDERS), "GET", "/items/../admin", "catalog") is None


def test_workload_lookups_are_cached_and_bounded() -> None:
    rbac = RbacIndex(
        Policy.build(
            roles=(Role("any", (Permission((), ("*",)),)),),
            bindings=(Binding("b", "any", workloads=(f"{TD}/ns/*/sa/orders",)),),
        ),
        workload_cache_size=2,
    )
    ids = [f"{TD}/ns/n{i}/sa/orders" for i in range(4)]
    for _ in range(2):
        for spiffe_id in ids:
            assert rbac.match(workload(spiffe_id), "GET", "/", "s") == RuleMatch("b", "any", 0)
    assert rbac.workload_match(ids[0]) is rbac.workload_match(ids[0])
    assert rbac.match(workload(f"{TD}/ns/n1/sa/catalog"), "GET", "/", "s") is None


@pytest.mark.parametrize(
    ("patterns", "heads"),
    [
        ((("/orders", "/orders/*"),), {"orders"}),
        ((("/a/b",), ("/c/{*}", "/d/{**}")), {"a", "c", "d"}),
        ((("/",),), {""}),
        ((("/a/*",), ("*",)), None),  # one permission open to any path: no pruning
        ((("*.json",),), None),
        ((("/a*",),), None),  # the head may be "a", "ab", ...
        ((("/*",),), None),
        ((("/{**}",),), None),
        ((("/{*}/x",),), None),
        ((), set()),
    ],
)
def test_path_heads_name_every_first_segment_a_rule_can_match(
    patterns: tuple[tuple[str, ...], ...], heads: set[str] | None
) -> None:
    got = _path_heads(patterns)
    assert got == (frozenset(heads) if heads is not None else None)


def test_a_rule_is_skipped_only_for_paths_outside_its_heads() -> None:
    # The reject is a shortcut: the same requests decide the same with and without it
    # (the oracle property test covers the rest); these pin the edge cases.
    policy = Policy(
        roles=(
            Role("orders", (Permission(paths=("/orders/*",)),)),
            Role("deny-admin", (Permission(paths=("/admin/*",)),)),
        ),
        bindings=(
            Binding("ops", "orders", subjects=("alice",)),
            Binding("no-admin", "deny-admin", effect="deny", subjects=("alice",)),
        ),
    )
    index = RbacIndex(policy)
    alice = Identities(None, Identity("alice"))

    def evaluate(path: str) -> tuple[str | None, str | None]:
        evaluation = index.evaluate(alice, AuthzRequest.of("GET", path))
        return (
            evaluation.deny.binding if evaluation.deny else None,
            evaluation.allow.binding if evaluation.allow else None,
        )

    assert evaluate("/orders/1") == (None, "ops")
    assert evaluate("/catalog/1") == (None, None)  # pruned: head "catalog"
    assert evaluate("/admin/x") == ("no-admin", None)
    # Not plain: no head, so no pruning; the deny's wildcard matches it, failing closed.
    assert evaluate("/orders/../admin/x") == ("no-admin", None)
    assert evaluate("orders/1") == (None, None)  # not absolute: no head, no match
