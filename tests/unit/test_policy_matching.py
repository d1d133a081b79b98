"""meshward.policy.matching: what path, host, header, CIDR and claim patterns mean."""

from __future__ import annotations

from typing import Any

import pytest

from meshward.policy.matching import (
    CidrSet,
    HostSet,
    PathSet,
    cidr_problem,
    claim_at,
    claim_matches,
    claim_text,
    header_name_problem,
    header_value_matches,
    host_pattern_problem,
    is_plain_path,
    normalize_cidr,
    path_pattern_problem,
    request_host,
)


def path_matches(patterns: tuple[str, ...], path: str) -> bool:
    for pattern in patterns:
        assert path_pattern_problem(pattern) is None, pattern
    return PathSet(patterns).matches(path, is_plain_path(path))


# ---- paths ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        # exact
        ("/orders", "/orders", True),
        ("/orders", "/orders/", False),
        ("/orders", "/orders/1", False),
        ("/orders", "/Orders", False),
        ("/orders", "/order", False),
        # prefix: "/orders/" and below, not "/orders" itself
        ("/orders/*", "/orders/", True),
        ("/orders/*", "/orders/1", True),
        ("/orders/*", "/orders/1/lines/2", True),
        ("/orders/*", "/orders", False),
        ("/orders/*", "/ordersX", False),
        ("/orders*", "/ordersX", True),
        ("/orders*", "/orders", True),
        # suffix
        ("*.json", "/a/b.json", True),
        ("*.json", "/.json", True),
        ("*.json", "/a/b.jsonx", False),
        ("*.json", "/a/json", False),
        # any
        ("*", "/", True),
        ("*", "/anything/at/all", True),
        ("*", "", True),
        # {*}: exactly one non-empty segment
        ("/orders/{*}/items", "/orders/42/items", True),
        ("/orders/{*}/items", "/orders/a.b-c/items", True),
        ("/orders/{*}/items", "/orders//items", False),
        ("/orders/{*}/items", "/orders/1/2/items", False),
        ("/orders/{*}/items", "/orders/items", False),
        ("/orders/{*}/items", "/orders/42/items/", False),
        ("/orders/{*}", "/orders/42", True),
        ("/orders/{*}", "/orders/", False),
        ("/orders/{*}", "/orders/42/x", False),
        ("/{*}", "/x", True),
        ("/{*}", "/", False),
        # {**}: the rest of the path, possibly empty
        ("/static/{**}", "/static/", True),
        ("/static/{**}", "/static/a", True),
        ("/static/{**}", "/static/a/b/c.css", True),
        ("/static/{**}", "/static/a//b", True),
        ("/static/{**}", "/static", False),
        ("/static/{**}", "/staticx/a", False),
        ("/static/{**}", "/other/static/a", False),
        # mixed
        ("/t/{*}/files/{**}", "/t/acme/files/", True),
        ("/t/{*}/files/{**}", "/t/acme/files/a/b", True),
        ("/t/{*}/files/{**}", "/t/files/a", False),
        ("/t/{*}/files/{**}", "/t/acme/other/a", False),
        # literal template segments are literal, not regular expressions
        ("/v1.0/{*}", "/v1.0/x", True),
        ("/v1.0/{*}", "/v1x0/x", False),
        ("/a+b/{*}", "/a+b/x", True),
        ("/a+b/{*}", "/aab/x", False),
        ("/(x)/{*}", "/(x)/y", True),
    ],
)
def test_path_patterns(pattern: str, path: str, expected: bool) -> None:
    assert path_matches((pattern,), path) is expected


def test_several_patterns_any_one_matches() -> None:
    patterns = ("/a", "/b/*", "*.png", "/c/{*}/d", "/e/{**}")
    for path in ("/a", "/b/x", "/x/y.png", "/c/1/d", "/e/", "/e/f/g"):
        assert path_matches(patterns, path), path
    for path in ("/b", "/c/1/e", "/x/y.gif", "/e", "/ab"):
        assert not path_matches(patterns, path), path


def test_several_templates_are_each_matched_whole() -> None:
    # One regular expression for all templates: each alternative must match the whole path.
    patterns = ("/a/{*}", "/a/{*}/b/{*}")
    assert path_matches(patterns, "/a/1")
    assert path_matches(patterns, "/a/1/b/2")
    assert not path_matches(patterns, "/a/1/b")
    assert not path_matches(patterns, "/a/1/c/2")


NON_PLAIN = [
    "/orders/../admin",
    "/orders/./x",
    "/orders/..",
    "/orders/.",
    "/orders/%2e%2e/admin",
    "/orders/%2E%2E/admin",
    "/orders/.%2e/admin",
    "/orders/%2e/x",
    "/orders/x%2f..%2fadmin",
    "/orders/x%2F..%2Fadmin",
    "/orders/x%5c..%5cadmin",
    "/orders\\..\\admin",
    "/orders/a\\b",
]


@pytest.mark.parametrize("path", NON_PLAIN)
def test_dot_segment_and_encoded_paths_never_match_wildcards(path: str) -> None:
    assert not is_plain_path(path)
    for pattern in ("/orders/*", "/orders*", "/orders/{**}", "*admin", "/orders/{*}/admin"):
        assert not path_matches((pattern,), path), pattern
    # ... but they do match "*" and an exact pattern naming them.
    assert path_matches(("*",), path)
    assert path_matches((path,), path)
    assert path_matches(("/orders/*", path), path)


@pytest.mark.parametrize(
    "path",
    ["/orders/v1.2/x", "/orders/a..b", "/orders/.well-known", "/o%20x", "/a/...", "/", ""],
)
def test_dots_inside_segments_are_plain(path: str) -> None:
    assert is_plain_path(path)


@pytest.mark.parametrize(
    "pattern",
    [
        "*",
        "/",
        "/orders",
        "/orders/*",
        "/orders*",
        "*.json",
        "*/x",
        "/orders/{*}",
        "/orders/{*}/items",
        "/static/{**}",
        "/{**}",
        "/t/{*}/files/{**}",
        "/a//{*}",
    ],
)
def test_path_pattern_problem_accepts(pattern: str) -> None:
    assert path_pattern_problem(pattern) is None


@pytest.mark.parametrize(
    ("pattern", "needle"),
    [
        ("/a/{*}x", "has segment '{*}x'"),
        ("/a/x{*}", "has segment 'x{*}'"),
        ("/a/{x}", "has segment '{x}'"),
        ("/a/{*}/b*", "has segment 'b*'"),
        ("/a/{**}/b", "'{**}' must end the template"),
        ("/{**}/a", "'{**}' must end the template"),
        ("/a*b", "'*' in the middle"),
        ("/a/*/b", "'*' in the middle"),
        ("/**", "'*' in the middle"),
        ("a", "is not a path pattern"),
        ("orders/*", "is not a path pattern"),
        ("", "is not a path pattern"),
        ("**", "is not a suffix pattern"),
        ("*a*", "is not a suffix pattern"),
        ("*{*}", "is not a suffix pattern"),
    ],
)
def test_path_pattern_problem_rejects(pattern: str, needle: str) -> None:
    problem = path_pattern_problem(pattern)
    assert problem is not None and needle in problem


# ---- hosts ------------------------------------------------------------------------------


def host_matches(patterns: tuple[str, ...], authority: str) -> bool:
    for pattern in patterns:
        assert host_pattern_problem(pattern) is None, pattern
    return HostSet(patterns).matches(request_host(authority))


@pytest.mark.parametrize(
    ("patterns", "authority", "expected"),
    [
        (("api.example.com",), "api.example.com", True),
        (("api.example.com",), "API.Example.COM", True),
        (("API.EXAMPLE.com",), "api.example.com", True),
        (("api.example.com",), "api.example.com:8443", True),
        (("api.example.com",), "www.example.com", False),
        (("api.example.com",), "api.example.com.evil", False),
        (("api.example.com",), "xapi.example.com", False),
        (("*.example.com",), "a.example.com", True),
        (("*.example.com",), "a.b.example.com", True),
        (("*.example.com",), "A.Example.Com:80", True),
        (("*.example.com",), "example.com", False),
        (("*.example.com",), ".example.com", False),
        (("*.example.com",), "aexample.com", False),
        (("*.example.com",), "a.example.com.evil", False),
        (("*",), "anything.at.all:1", True),
        ((), "anything", True),
        (("a.test", "*.b.test"), "x.b.test", True),
        (("a.test", "*.b.test"), "a.test", True),
        (("a.test", "*.b.test"), "b.test", False),
        (("localhost",), "localhost:10000", True),
        (("127.0.0.1",), "127.0.0.1:10000", True),
    ],
)
def test_host_patterns(patterns: tuple[str, ...], authority: str, expected: bool) -> None:
    assert host_matches(patterns, authority) is expected


@pytest.mark.parametrize(
    ("authority", "host"),
    [
        ("api.example.com", "api.example.com"),
        ("API.example.com:8080", "api.example.com"),
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
        ("[2001:DB8::1]:443", "[2001:db8::1]"),
        ("10.0.0.1:80", "10.0.0.1"),
        ("", ""),
    ],
)
def test_request_host_lowers_and_strips_the_port(authority: str, host: str) -> None:
    assert request_host(authority) == host


def test_a_trailing_dot_names_the_same_host() -> None:
    # "admin.example.com." is the same DNS name: a deny rule on the host must still apply.
    assert request_host("Admin.Example.com.") == "admin.example.com"
    assert request_host("admin.example.com.:8443") == "admin.example.com"
    assert host_matches(("admin.example.com",), "admin.example.com.")
    assert host_matches(("*.example.com",), "a.example.com.")
    # and a pattern written fully qualified means the same host
    assert host_matches(("admin.example.com.",), "admin.example.com")
    assert host_matches(("*.example.com.",), "a.example.com.:443")


@pytest.mark.parametrize("pattern", ["api.example.com", "*.example.com", "*", "localhost", "a-b.c"])
def test_host_pattern_problem_accepts(pattern: str) -> None:
    assert host_pattern_problem(pattern) is None


@pytest.mark.parametrize(
    "pattern",
    ["*example.com", "api.*.com", "api.example.com:8080", "a b", "", "*.", "**.example.com", "a/b"],
)
def test_host_pattern_problem_rejects(pattern: str) -> None:
    problem = host_pattern_problem(pattern)
    assert problem is not None and "'*.example.com'" in problem


# ---- headers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("*", "", True),
        ("*", "anything", True),
        ("*", None, False),
        ("acme", "acme", True),
        ("acme", "Acme", False),
        ("acme", "acme-corp", False),
        ("acme", None, False),
        ("acme-*", "acme-corp", True),
        ("acme-*", "acme-", True),
        ("acme-*", "acme", False),
        ("acme-*", "xacme-corp", False),
        ("acme-*", None, False),
        ("", "", True),
        ("", "x", False),
    ],
)
def test_header_values(pattern: str, value: str | None, expected: bool) -> None:
    assert header_value_matches(pattern, value) is expected


@pytest.mark.parametrize("name", ["x-tenant", "x_tenant", "accept", ":authority", "x.y", "a1"])
def test_header_name_problem_accepts(name: str) -> None:
    assert header_name_problem(name) is None


@pytest.mark.parametrize("name", ["x tenant", "X-Tenant", "", "x:y", "x\ty", "é", "a,b", "x\n"])
def test_header_name_problem_rejects(name: str) -> None:
    problem = header_name_problem(name)
    assert problem is not None and "'x-tenant'" in problem


# ---- source addresses --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cidrs", "ip", "expected"),
    [
        (("10.0.0.0/8",), "10.1.2.3", True),
        (("10.0.0.0/8",), "11.0.0.1", False),
        (("10.0.0.0/8",), "9.255.255.255", False),
        (("10.1.2.3/32",), "10.1.2.3", True),
        (("10.1.2.3/32",), "10.1.2.4", False),
        (("0.0.0.0/0",), "203.0.113.9", True),
        (("2001:db8::/32",), "2001:db8::1", True),
        (("2001:db8::/32",), "2001:db9::1", False),
        (("2001:db8::/32",), "10.0.0.1", False),
        (("10.0.0.0/8",), "2001:db8::1", False),
        # an IPv4 client seen on a dual-stack socket is matched as IPv4
        (("10.0.0.0/8",), "::ffff:10.1.2.3", True),
        (("10.0.0.0/8",), "::ffff:11.1.2.3", False),
        # a v4-mapped block means the same IPv4 addresses, in either notation
        (("::ffff:10.0.0.0/104",), "10.1.2.3", True),
        (("::ffff:10.0.0.0/104",), "::ffff:10.1.2.3", True),
        (("::ffff:10.0.0.0/104",), "11.1.2.3", False),
        (("10.0.0.0/8", "192.168.0.0/16"), "192.168.1.1", True),
        # unknown or garbage client addresses are unknown (None): callers fail closed
        (("0.0.0.0/0", "::/0"), "", None),
        (("0.0.0.0/0", "::/0"), "not-an-ip", None),
        (("0.0.0.0/0", "::/0"), "10.0.0.1:80", None),
    ],
)
def test_cidr_sets(cidrs: tuple[str, ...], ip: str, expected: bool | None) -> None:
    assert CidrSet(cidrs).contains(ip) is expected


@pytest.mark.parametrize(
    ("value", "normalized"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3", "10.1.2.3/32"),
        ("10.1.2.3/32", "10.1.2.3/32"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:DB8::/32", "2001:db8::/32"),
        ("2001:0db8:0000::/32", "2001:db8::/32"),
        ("2001:db8::1", "2001:db8::1/128"),
        ("::1", "::1/128"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("::/0", "::/0"),
    ],
)
def test_valid_cidrs_and_bare_addresses(value: str, normalized: str) -> None:
    assert cidr_problem(value) is None
    assert normalize_cidr(value) == normalized


@pytest.mark.parametrize(
    ("value", "network"),
    [
        ("10.1.2.3/8", "10.0.0.0/8"),
        ("192.168.1.1/24", "192.168.1.0/24"),
        ("2001:db8::1/32", "2001:db8::/32"),
        ("2001:DB8::1/32", "2001:db8::/32"),
    ],
)
def test_host_bits_are_an_error_that_suggests_the_network(value: str, network: str) -> None:
    assert cidr_problem(value) == f"has host bits set; did you mean '{network}'?"


@pytest.mark.parametrize(
    "value", ["10.0.0.0/33", "10.0.0", "example.com", "", "10.0.0.0/-1", "::g"]
)
def test_not_an_address_or_block(value: str) -> None:
    problem = cidr_problem(value)
    assert problem is not None and "is not an IP address or CIDR block" in problem


# ---- claims -------------------------------------------------------------------------------

CLAIMS: dict[str, Any] = {
    "sub": "alice",
    "realm_access": {"roles": ["staff", "admin"], "level": 3},
    "https://example.com/groups.v1": ["literal"],
    "https://example": {"com/groups": {"v1": ["nested"]}},
    "a.b": "dotted-name",
    "a": {"b": "nested-path"},
    "email_verified": True,
    "disabled": False,
    "tier": 2,
    "score": 2.5,
    "whole": 4.0,
    "mixed": ["x", 7, True, None, {"k": "v"}],
    "nothing": None,
}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("sub", "alice"),
        ("realm_access.roles", ["staff", "admin"]),
        ("realm_access.level", 3),
        ("realm_access", {"roles": ["staff", "admin"], "level": 3}),
        # a claim literally named by the whole path wins over the nested reading
        ("https://example.com/groups.v1", ["literal"]),
        ("a.b", "dotted-name"),
        ("missing", None),
        ("realm_access.missing", None),
        ("sub.x", None),  # through a string
        ("realm_access.roles.0", None),  # no list indexing
        ("nothing", None),
    ],
)
def test_claim_at(path: str, value: Any) -> None:
    assert claim_at(CLAIMS, path) == value


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("x", "x"),
        ("", ""),
        (True, "true"),
        (False, "false"),
        (3, "3"),
        (-1, "-1"),
        (4.0, "4"),
        (2.5, "2.5"),
        (None, None),
        (["x"], None),
        ({"k": "v"}, None),
    ],
)
def test_claim_text(value: Any, text: str | None) -> None:
    assert claim_text(value) == text


@pytest.mark.parametrize(
    ("path", "wanted", "expected"),
    [
        ("sub", {"alice"}, True),
        ("sub", {"bob"}, False),
        ("sub", {"Alice"}, False),
        ("realm_access.roles", {"admin"}, True),  # a list contains one
        ("realm_access.roles", {"root", "staff"}, True),
        ("realm_access.roles", {"root"}, False),
        ("realm_access.level", {"3"}, True),
        ("email_verified", {"true"}, True),
        ("email_verified", {"True"}, False),
        ("disabled", {"false"}, True),
        ("disabled", {"true"}, False),
        ("tier", {"2"}, True),
        ("tier", {"2.0"}, False),
        ("whole", {"4"}, True),
        ("score", {"2.5"}, True),
        ("mixed", {"7"}, True),
        ("mixed", {"true"}, True),
        ("mixed", {"v"}, False),  # objects inside a list are not looked into
        ("realm_access", {"staff"}, False),  # an object is no value
        ("missing", {"x"}, False),
        ("nothing", {"None"}, False),
        ("https://example.com/groups.v1", {"literal"}, True),
        ("https://example.com/groups.v1", {"nested"}, False),
    ],
)
def test_claim_matches(path: str, wanted: set[str], expected: bool) -> None:
    assert claim_matches(claim_at(CLAIMS, path), frozenset(wanted)) is expected


@pytest.mark.parametrize("value", ["api.example.com\n", "*.example.com\n", "*\n"])
def test_a_final_newline_is_not_part_of_a_host_pattern(value: str) -> None:
    assert host_pattern_problem(value) is not None
