"""Property-based tests: random policies and requests against a naive, independent oracle.

The oracle below reads the policy model with straight loops and re-implements what the
patterns mean from the documentation (docs/policy.md, the model's docstrings, the
module docstring of :mod:`meshward.policy.matching`); it never calls RbacIndex or the
compiled matchers. Requests are drawn over a small alphabet so that rules match often
enough to be interesting.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz import reasons
from authz.compiled import compile_policy
from authz.decision import Decision, decide
from authz.request import AuthzRequest
from authz.response import to_check_response
from meshward import route_context
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
ISSUER = testing.DEMO_ISSUER
KEY = testing.ec_key("prop-1")
STRANGER_KEY = testing.ec_key("prop-2")  # not in the policy's JWKS
TD = testing.DEMO_TRUST_DOMAIN
PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
#: The oracle comparison gets more: it is the test that finds wrong answers.
ORACLE_SETTINGS = settings(PROPERTY_SETTINGS, max_examples=400)

# ---- the alphabet ----------------------------------------------------------------------------

METHODS = ("GET", "POST", "DELETE")
SERVICES = ("orders", "catalog")
SUBJECTS = ("alice", "bob", "carol")
GROUPS = ("staff", "ops", "ci")
PATH_PATTERNS = (
    "*",
    "/a",
    "/a/*",
    "/a/b",
    "/a/b/*",
    "*.json",
    "/a/{*}",
    "/a/{*}/b",
    "/{**}",
    "/a/{**}",
    "/a/{*}/{**}",
    "/b*",
)
PATH_SEGMENTS = ("a", "b", "x.json", "..", ".", "%2e%2e", "%2E", "x%2f..", "", "a\\b", "v1.2")
HOST_PATTERNS = ("api.example.com", "*.internal.test", "Other.Test")
HOSTS = (
    "api.example.com",
    "API.example.com:8443",
    "api.example.com.",
    "x.internal.test",
    "a.b.internal.test:80",
    "internal.test",
    "other.test",
    "[::1]:8080",
    "",
)
PORTS = (443, 8443)
HEADER_NAMES = ("x-tenant", "x-env")
HEADER_PATTERNS = ("*", "acme", "prod-*")
HEADER_VALUES = ("acme", "prod-eu", "prod", "", "ACME")
CIDRS = ("10.0.0.0/8", "10.9.0.0/16", "2001:db8::/32", "192.168.0.0/16", "::ffff:10.0.0.0/104")
SOURCE_IPS = ("", "10.1.2.3", "10.9.1.1", "192.168.1.1", "::ffff:10.1.2.3", "2001:db8::1", "junk")
EDGE = f"spiffe://{TD}/ns/default/sa/edge"
CONSOLE = f"spiffe://{TD}/ns/default/sa/console"
BATCH = f"spiffe://{TD}/ns/batch/sa/job"
VALID_PEERS = (EDGE, CONSOLE, BATCH)
INVALID_PEERS = ("spiffe://other.local/ns/x/sa/y", f"spiffe://{TD}/ns/../sa/x", "edge.local")
WORKLOAD_PATTERNS = (EDGE, f"spiffe://{TD}/ns/*/sa/edge", f"spiffe://{TD}/ns/batch/*", CONSOLE)
CLAIM_PATHS = ("tenant", "realm.roles", "verified", "level")
CLAIM_VALUES = ("acme", "other", "admin", "staff", "true", "false", "3")
ACR_LEVELS = ("bronze", "silver", "gold")
BOT_KEY, ALICE_KEY = "mk_bot_0123456789", "mk_alice_0123456789"
API_KEYS = {
    BOT_KEY: ("bot", ("ci",)),
    ALICE_KEY: ("alice", ()),
}
ROUTES: dict[str, MfaRequirement | None] = {
    "api": None,
    "mfa-amr": MfaRequirement(amr=("otp", "hwk")),
    "mfa-acr": MfaRequirement(min_acr="silver", max_age_seconds=600),
}


def subset(values: tuple[Any, ...], max_size: int = 2) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.lists(st.sampled_from(values), max_size=max_size, unique=True).map(tuple)


# ---- random policies ----------------------------------------------------------------------


def rarely(strategy: st.SearchStrategy[Any], empty: Any = ()) -> st.SearchStrategy[Any]:
    """``strategy`` about one time in three, else ``empty``: every aspect ANDs, so a
    permission or binding constrained on everything would almost never apply."""
    return st.one_of(st.just(empty), st.just(empty), strategy)


permissions = st.builds(
    Permission,
    methods=rarely(subset(METHODS)),
    paths=st.lists(st.sampled_from(PATH_PATTERNS), min_size=1, max_size=3, unique=True).map(tuple),
    services=rarely(subset(SERVICES, 1)),
    hosts=rarely(subset(HOST_PATTERNS)),
    ports=rarely(subset(PORTS, 1)),
    headers=rarely(
        st.lists(
            st.builds(HeaderMatch, st.sampled_from(HEADER_NAMES), st.sampled_from(HEADER_PATTERNS)),
            max_size=2,
            unique_by=lambda h: h.name,
        ).map(tuple)
    ),
)
roles_of_permissions = st.lists(permissions, min_size=1, max_size=2).map(tuple)
binding_parts = st.fixed_dictionaries(
    {
        "subjects": subset((*SUBJECTS, "*", "*")),
        "groups": subset(GROUPS),
        "workloads": rarely(subset(WORKLOAD_PATTERNS)),
        "effect": st.sampled_from(("allow", "allow", "allow", "deny")),
        "mode": st.sampled_from(("enforce", "enforce", "enforce", "audit")),
        "source_ips": rarely(subset(CIDRS)),
        "not_source_ips": rarely(subset(CIDRS, 1)),
        "claims": rarely(
            st.lists(
                st.builds(
                    ClaimCondition,
                    st.sampled_from(CLAIM_PATHS),
                    st.lists(
                        st.sampled_from(CLAIM_VALUES), min_size=1, max_size=2, unique=True
                    ).map(tuple),
                ),
                max_size=2,
                unique_by=lambda c: c.path,
            ).map(tuple)
        ),
    }
)


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    count = draw(st.integers(1, 3))
    roles = tuple(Role(f"role-{i}", draw(roles_of_permissions)) for i in range(count))
    bindings = tuple(
        Binding(f"b{i}", f"role-{draw(st.integers(0, count - 1))}", **draw(binding_parts))
        for i in range(draw(st.integers(0, 6)) or draw(st.integers(0, 6)))
    )
    return build_policy(roles, bindings)


def build_policy(roles: tuple[Role, ...], bindings: tuple[Binding, ...]) -> Policy:
    return Policy.build(
        services=tuple(Service(s, (Endpoint("127.0.0.1", 10101),)) for s in SERVICES),
        gateways=(
            Gateway(
                "edge",
                10000,
                tuple(Route(r, RouteMatch(prefix="/"), "orders", mfa=m) for r, m in ROUTES.items()),
            ),
        ),
        issuers=(
            Issuer(
                name="idp",
                issuer=ISSUER,
                audiences=(testing.DEMO_AUDIENCE,),
                jwks=testing.jwks(KEY),
                acr_levels=ACR_LEVELS,
            ),
        ),
        roles=roles,
        bindings=bindings,
        api_keys=tuple(
            ApiKey(f"key-{subject}", hashlib.sha256(key.encode()).hexdigest(), subject, groups)
            for key, (subject, groups) in API_KEYS.items()
        ),
    )


# ---- random requests ------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    """The user the oracle expects authz to establish (claims None: an API key)."""

    subject: str
    groups: tuple[str, ...]
    claims: Mapping[str, Any] | None


@dataclass(frozen=True)
class Credential:
    #: "none", "user" or "invalid" (authz must answer 401 before any rule).
    kind: str
    headers: dict[str, str]
    user: User | None = None


@st.composite
def token_claims(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    optional = {
        "tenant": st.sampled_from(("acme", "other")),
        "realm": st.fixed_dictionaries({"roles": st.lists(st.sampled_from(("admin", "staff")))}),
        "verified": st.booleans(),
        "level": st.sampled_from((3, 4, "3")),
        "amr": st.lists(st.sampled_from(("pwd", "otp", "hwk")), max_size=2),
        "acr": st.sampled_from((*ACR_LEVELS, "platinum")),
        "auth_time": st.sampled_from((int(NOW) - 10, int(NOW) - 1000)),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            out[name] = draw(strategy)
    return out


@st.composite
def credentials(draw: st.DrawFn) -> Credential:
    kind = draw(
        st.sampled_from(
            # the first is drawn most often (and is what failures shrink to)
            (
                "token",
                *["token"] * 12,
                "none",
                "none",
                "basic",
                "api_key",
                "api_key",
                "garbage",
                "stranger",
                "expired",
                "unknown_key",
                "ambiguous",
            )
        )
    )
    if kind == "none":
        return Credential("none", {})
    if kind == "basic":  # another scheme: no credential of ours
        return Credential("none", {"authorization": "Basic YTpi"})
    if kind == "api_key":
        key = draw(st.sampled_from(tuple(API_KEYS)))
        subject, groups = API_KEYS[key]
        header = draw(st.sampled_from(({"x-api-key": key}, {"authorization": f"ApiKey {key}"})))
        return Credential("user", header, User(subject, groups, None))
    if kind == "garbage":
        value = draw(st.sampled_from(("Bearer not-a-token", "Bearer a.b.c", "Bearer ")))
        return Credential("invalid", {"authorization": value})
    if kind == "unknown_key":
        return Credential("invalid", {"x-api-key": "mk_unknown"})
    subject = draw(st.sampled_from(SUBJECTS))
    groups = draw(subset(GROUPS))
    extra = draw(token_claims())
    if kind == "token":
        return token_credential(subject, groups, extra)
    claims = testing.claims(subject, list(groups), now=NOW - 10, **extra)
    if kind == "stranger":
        token = STRANGER_KEY.sign(claims)
    elif kind == "expired":
        token = KEY.sign(testing.claims(subject, list(groups), now=NOW - 7200, ttl=60))
    else:
        token = KEY.sign(claims)
    headers = {"authorization": f"Bearer {token}"}
    if kind == "ambiguous":
        return Credential("invalid", {**headers, "x-api-key": BOT_KEY})
    if kind in ("stranger", "expired"):
        return Credential("invalid", headers)
    return Credential("user", headers, User(subject, groups, claims))


def token_credential(subject: str, groups: tuple[str, ...], extra: dict[str, Any]) -> Credential:
    claims = testing.claims(subject, list(groups), now=NOW - 10, **extra)
    return Credential(
        "user", {"authorization": f"Bearer {KEY.sign(claims)}"}, User(subject, groups, claims)
    )


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    host: str
    port: int
    service: str
    route: str  # "": matched no route
    headers: dict[str, str]
    source_ip: str
    peer: str  # "": no mTLS peer
    credential: Credential

    def message(self) -> external_auth_pb2.CheckRequest:
        message = testing.check_request(
            self.method,
            self.path,
            {**self.headers, **self.credential.headers},
            route=self.route or None,
            service=self.service,
            host=self.host,
            principal=self.peer,
        )
        message.attributes.source.address.socket_address.address = self.source_ip
        message.attributes.destination.address.socket_address.port_value = self.port
        return message


requests = st.builds(
    Request,
    method=st.sampled_from(METHODS),
    path=st.lists(st.sampled_from(PATH_SEGMENTS), min_size=1, max_size=3).map(
        lambda segments: "/" + "/".join(segments)
    ),
    host=st.sampled_from(HOSTS),
    port=st.sampled_from((0, *PORTS)),
    service=st.sampled_from(SERVICES),
    route=st.sampled_from(("api",) * 8 + ("mfa-amr", "mfa-acr", "")),
    headers=st.dictionaries(
        st.sampled_from(HEADER_NAMES), st.sampled_from(HEADER_VALUES), max_size=2
    ),
    source_ip=st.sampled_from(SOURCE_IPS),
    peer=st.sampled_from(("",) * 16 + VALID_PEERS * 4 + INVALID_PEERS),
    credential=credentials(),
)


# ---- the oracle -----------------------------------------------------------------------------


def o_plain(path: str) -> bool:
    """No dot segment (also percent-encoded), no backslash, no encoded slash/backslash."""
    lowered = path.lower()
    if "\\" in path or "%2f" in lowered or "%5c" in lowered:
        return False
    segments = lowered.replace("%2e", ".").split("/")
    return "." not in segments and ".." not in segments


def o_path(pattern: str, path: str, deny: bool = False) -> bool:
    """Whether ``pattern`` matches ``path``; a deny rule's wildcard matches every path
    with dot segments (fail closed), an allow's none."""
    if pattern == "*":
        return True
    wildcard = "*" in pattern or "{" in pattern
    if not wildcard:
        return path == pattern
    if not o_plain(path):
        return deny
    if pattern.startswith("*"):
        return path.endswith(pattern[1:])
    if "{" not in pattern:  # a prefix
        return path.startswith(pattern[:-1])
    if not path.startswith("/"):
        return False
    want = pattern[1:].split("/")
    got = path[1:].split("/")
    for i, segment in enumerate(want):
        if segment == "{**}":
            return len(got) >= len(want)
        if i >= len(got):
            return False
        if segment == "{*}":
            if got[i] == "":
                return False
        elif segment != got[i]:
            return False
    return len(got) == len(want)


def o_host(authority: str) -> str:
    host = authority.lower()
    if host.startswith("["):
        return host[: host.index("]") + 1]
    if host.count(":") == 1:
        host = host.split(":")[0]
    if host.endswith("."):
        host = host[:-1]
    return host


def o_host_matches(pattern: str, host: str) -> bool:
    pattern = pattern.lower()
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def o_header(pattern: str, value: str | None) -> bool:
    if value is None:
        return False
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def o_address(ip: str) -> Any:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def o_in_blocks(ip: str, cidrs: tuple[str, ...]) -> bool:
    address = o_address(ip)
    if address is None:
        return False
    for cidr in cidrs:
        network = ipaddress.ip_network(cidr)
        if network.version == 6 and network.network_address.ipv4_mapped is not None:
            network = ipaddress.ip_network(
                f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}"
            )
        if address.version == network.version and address in network:
            return True
    return False


def o_claim(claims: Mapping[str, Any], path: str) -> Any:
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def o_text(value: Any) -> str | None:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    return None


def o_claim_holds(claims: Mapping[str, Any], condition: ClaimCondition) -> bool:
    value = o_claim(claims, condition.path)
    items = value if isinstance(value, list) else [value]
    return any(o_text(item) in condition.values for item in items)


def o_workload(pattern: str, spiffe_id: str) -> bool:
    if "*" not in pattern.split("/"):
        return pattern == spiffe_id
    scheme = "spiffe://"
    if not pattern.startswith(scheme) or not spiffe_id.startswith(scheme):
        return False
    want = pattern[len(scheme) :].split("/")
    got = spiffe_id[len(scheme) :].split("/")
    if want[0] != got[0]:
        return False
    if want[-1] == "*":
        want = want[:-1]
        if len(got) <= len(want):
            return False
    elif len(got) != len(want):
        return False
    return all(w in ("*", g) for w, g in zip(want[1:], got[1:], strict=False))


def o_permission(p: Permission, r: Request, deny: bool = False) -> bool:
    """Unknown port (0) or host (""): an allow's limit fails, a deny's holds."""
    headers = {**r.headers, **r.credential.headers}
    port_ok = not p.ports or (r.port in p.ports if r.port else deny)
    host = o_host(r.host)
    host_ok = not p.hosts or (any(o_host_matches(h, host) for h in p.hosts) if host else deny)
    return (
        (not p.methods or r.method in p.methods)
        and (not p.services or r.service in p.services)
        and port_ok
        and host_ok
        and any(o_path(pattern, r.path, deny) for pattern in p.paths)
        and all(o_header(h.value, headers.get(h.name)) for h in p.headers)
    )


def o_binding(policy: Policy, b: Binding, r: Request) -> int | None:
    """The index of the first permission of ``b``'s role that grants ``r``, None if ``b``
    does not apply (principals, conditions or permissions)."""
    user = r.credential.user
    peer = r.peer if r.peer in VALID_PEERS else None
    user_ok = user is not None and (
        "*" in b.subjects or user.subject in b.subjects or bool(set(user.groups) & set(b.groups))
    )
    workload_ok = peer is not None and any(o_workload(w, peer) for w in b.workloads)
    names_users = bool(b.subjects or b.groups)
    if names_users and b.workloads:
        principals = user_ok and workload_ok
    elif names_users:
        principals = user_ok
    elif b.workloads:
        principals = workload_ok
    else:
        principals = b.effect == "deny"
    if not principals:
        return None
    deny = b.effect == "deny"
    known = o_address(r.source_ip) is not None
    # An unknown client address: an allow's address condition fails, a deny's holds.
    if b.source_ips and not (o_in_blocks(r.source_ip, b.source_ips) if known else deny):
        return None
    if b.not_source_ips and (o_in_blocks(r.source_ip, b.not_source_ips) if known else not deny):
        return None
    if b.claims:
        claims = user.claims if user is not None else None
        if claims is None or not all(o_claim_holds(claims, c) for c in b.claims):
            return None
    role = next(role for role in policy.roles if role.name == b.role)
    for i, permission in enumerate(role.permissions):
        if o_permission(permission, r, deny):
            return i
    return None


def o_first(policy: Policy, r: Request, effect: str, mode: str) -> str:
    """``binding/role#i`` of the first applying binding of that effect and mode, or ""."""
    for b in policy.bindings:
        if b.effect == effect and b.mode == mode:
            index = o_binding(policy, b, r)
            if index is not None:
                return f"{b.name}/{b.role}#{index}"
    return ""


def o_mfa_met(demand: MfaRequirement, user: User) -> bool:
    claims = user.claims
    if claims is None:
        return False
    amr = claims.get("amr")
    if demand.amr and not (isinstance(amr, list) and set(amr) & set(demand.amr)):
        return False
    if demand.min_acr:
        acceptable = ACR_LEVELS[ACR_LEVELS.index(demand.min_acr) :]
        if claims.get("acr") not in acceptable:
            return False
    if demand.max_age_seconds:
        auth_time = claims.get("auth_time")
        if not isinstance(auth_time, int) or NOW - auth_time > demand.max_age_seconds:
            return False
    return True


@dataclass(frozen=True)
class Expected:
    allowed: bool
    status: int
    reason: str | None  # None: any 401 credential reason
    rule: str = ""
    audit: tuple[str, ...] = ()


def oracle(policy: Policy, r: Request) -> Expected:
    if not r.route:
        return Expected(False, 403, reasons.NO_ROUTE)
    if r.credential.kind == "invalid":
        return Expected(False, 401, None)
    if r.peer and r.peer not in VALID_PEERS:
        return Expected(False, 403, reasons.UNTRUSTED_WORKLOAD)
    user = r.credential.user
    audit = tuple(
        f"{effect}:{rule}"
        for effect in ("deny", "allow")
        if (rule := o_first(policy, r, effect, "audit"))
    )
    deny = o_first(policy, r, "deny", "enforce")
    if deny:
        return Expected(False, 403, reasons.DENIED_BY_RULE, deny, audit)
    allow = o_first(policy, r, "allow", "enforce")
    demand = ROUTES[r.route]
    if allow:
        if demand is None:
            return Expected(True, 200, reasons.ALLOWED, allow, audit)
        if user is not None:
            if o_mfa_met(demand, user):
                return Expected(True, 200, reasons.ALLOWED, allow, audit)
            return Expected(False, 401, reasons.INSUFFICIENT_USER_AUTHENTICATION, allow, audit)
    if user is None:
        return Expected(False, 401, reasons.MISSING_TOKEN, "", audit)
    return Expected(False, 403, reasons.FORBIDDEN, "", audit)


# ---- requests aimed at a rule --------------------------------------------------------------
# Unaimed, a random request rarely meets every aspect of a random rule: three cases in four
# take one binding and one permission of the drawn policy and steer some of the request
# towards them. Only the inputs are steered; the oracle still decides alone.


def path_for(pattern: str, fallback: str, fill: str) -> str:
    """A path ``pattern`` names, with ``fill`` where it has a wildcard (``fill`` may be a
    dot segment: then only ``*`` and exact patterns may match)."""
    if pattern == "*":
        return fallback
    if pattern.startswith("*"):
        return f"/{fill}" + pattern[1:]
    if "{" in pattern:
        return pattern.replace("{**}", f"y/{fill}").replace("{*}", fill)
    if pattern.endswith("*"):
        return pattern[:-1] + fill
    return pattern


HEADER_FOR = {"*": "1", "acme": "acme", "prod-*": "prod-eu"}
CLAIM_FOR: dict[str, Any] = {"true": True, "false": False, "3": 3}


def claims_for(conditions: tuple[ClaimCondition, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for condition in conditions:
        value = CLAIM_FOR.get(condition.values[0], condition.values[0])
        if condition.path == "realm.roles":
            out["realm"] = {"roles": [value]}
        else:
            out[condition.path] = value
    return out


@st.composite
def cases(draw: st.DrawFn) -> tuple[Policy, Request]:
    policy = draw(policies())
    r = draw(requests)
    if not policy.bindings or not draw(st.integers(0, 3)):
        return policy, r
    b = draw(st.sampled_from(policy.bindings))
    p = draw(st.sampled_from(policy.role(b.role).permissions))
    fill = draw(st.sampled_from(("x",) * 6 + ("..", "%2e%2E", "a\\b", "x%2f..")))
    changes: dict[str, Any] = {"path": path_for(draw(st.sampled_from(p.paths)), r.path, fill)}
    if p.methods:
        changes["method"] = draw(st.sampled_from(p.methods))
    if p.services:
        changes["service"] = draw(st.sampled_from(p.services))
    if p.ports:
        changes["port"] = draw(st.sampled_from(p.ports))
    if p.hosts:
        host = draw(st.sampled_from(p.hosts))
        host = "x" + host[1:] if host.startswith("*") else host
        host = host.upper() if draw(st.booleans()) else host
        changes["host"] = host + draw(st.sampled_from(("", ".", ":8443", ".:8443")))
    changes["headers"] = {**r.headers, **{h.name: HEADER_FOR[h.value] for h in p.headers}}
    if draw(st.integers(0, 3)):
        inside = [
            ip
            for ip in SOURCE_IPS
            if (not b.source_ips or o_in_blocks(ip, b.source_ips))
            and not o_in_blocks(ip, b.not_source_ips)
        ]
        if inside:
            changes["source_ip"] = draw(st.sampled_from(inside))
    if b.workloads and draw(st.integers(0, 5)):
        peers = [peer for peer in VALID_PEERS if any(o_workload(w, peer) for w in b.workloads)]
        changes["peer"] = draw(st.sampled_from(peers))
    if (b.subjects or b.groups or b.claims) and draw(st.integers(0, 5)):
        names = [s for s in b.subjects if s != "*"]
        subject = draw(st.sampled_from(names)) if names else draw(st.sampled_from(SUBJECTS))
        groups = (draw(st.sampled_from(b.groups)),) if b.groups else ()
        extra = {**draw(token_claims()), **claims_for(b.claims)}
        changes["credential"] = token_credential(subject, groups, extra)
    return policy, replace(r, **changes)


def decide_request(policy: Policy, r: Request) -> Decision:
    return decide(AuthzRequest.from_check_request(r.message()), compile_policy(policy), NOW)


# ---- properties -----------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(cases())
def test_decide_never_raises_and_gives_a_known_reason(case: tuple[Policy, Request]) -> None:
    policy, r = case
    decision = decide_request(policy, r)
    assert isinstance(decision, Decision)
    assert decision.reason in reasons.ALL
    assert decision.allowed == (decision.reason == reasons.ALLOWED)
    assert decision.http_status in (200, 401, 403)
    assert (decision.http_status == 401) == bool(decision.www_authenticate)
    to_check_response(decision, policy.responses)  # and it always makes a response


@ORACLE_SETTINGS
@given(cases())
def test_decide_agrees_with_the_naive_oracle(case: tuple[Policy, Request]) -> None:
    policy, r = case
    decision = decide_request(policy, r)
    expected = oracle(policy, r)
    got = (decision.allowed, decision.http_status)
    assert got == (expected.allowed, expected.status), (decision, expected)
    if expected.reason is None:
        assert decision.reason in reasons.INVALID_CREDENTIAL | {
            reasons.INVALID_API_KEY,
            reasons.AMBIGUOUS_CREDENTIALS,
        }
    else:
        assert decision.reason == expected.reason, (decision, expected)
        assert decision.matched_rule == expected.rule, (decision, expected)
        assert decision.audit == expected.audit, (decision, expected)

    # The properties, stated on their own:
    if decision.allowed:
        # an enforced allow binding applies, and no enforced deny binding does
        assert any(
            b.effect == "allow" and b.mode == "enforce" and o_binding(policy, b, r) is not None
            for b in policy.bindings
        )
        assert not any(
            b.effect == "deny" and b.mode == "enforce" and o_binding(policy, b, r) is not None
            for b in policy.bindings
        )
    if o_first(policy, r, "deny", "enforce"):
        assert not decision.allowed


@PROPERTY_SETTINGS
@given(cases())
def test_audit_bindings_never_change_the_outcome(case: tuple[Policy, Request]) -> None:
    policy, r = case
    enforced_only = build_policy(
        policy.roles, tuple(b for b in policy.bindings if b.mode != "audit")
    )
    with_audit = decide_request(policy, r)
    without = decide_request(enforced_only, r)
    assert (with_audit.allowed, with_audit.http_status, with_audit.reason) == (
        without.allowed,
        without.http_status,
        without.reason,
    )
    assert with_audit.matched_rule == without.matched_rule
    assert with_audit.www_authenticate == without.www_authenticate
    assert without.audit == () and without.audit_outcome == ""
    effects = {entry.split(":", 1)[0] for entry in with_audit.audit}
    if with_audit.audit_outcome == "would_deny":
        assert with_audit.allowed and "deny" in effects
    elif with_audit.audit_outcome == "would_allow":
        assert not with_audit.allowed and "allow" in effects
        assert with_audit.reason in (reasons.FORBIDDEN, reasons.MISSING_TOKEN)
    else:
        assert with_audit.audit_outcome == ""
        assert not (with_audit.allowed and "deny" in effects)


# ---- from_check_request on arbitrary messages ------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=30)
CONTEXT_KEYS = st.sampled_from(
    (
        route_context.ROUTE,
        route_context.SERVICE,
        route_context.GATEWAY,
        route_context.POLICY_VERSION,
        "other",
    )
)
CONTEXT_VALUES = st.one_of(st.sampled_from(tuple(ROUTES)), TEXT)
RAW_PATHS = st.lists(st.sampled_from((*PATH_SEGMENTS, "?q=1", "#f"))).map("/".join)


@st.composite
def check_requests(draw: st.DrawFn) -> external_auth_pb2.CheckRequest:
    message = external_auth_pb2.CheckRequest()
    attributes = message.attributes
    http = attributes.request.http
    http.method = draw(st.one_of(st.sampled_from(METHODS), TEXT))
    http.path = draw(st.one_of(RAW_PATHS, TEXT))
    http.host = draw(st.one_of(st.sampled_from(HOSTS), TEXT))
    http.scheme = draw(TEXT)
    http.protocol = draw(TEXT)
    http.body = draw(TEXT)
    http.raw_body = draw(st.binary(max_size=20))
    for key, value in draw(st.dictionaries(TEXT, TEXT, max_size=4)).items():
        http.headers[key] = value
    if draw(st.booleans()):
        for key, value, raw in draw(st.lists(st.tuples(TEXT, TEXT, st.binary(max_size=20)))):
            http.header_map.headers.add(key=key, value=value, raw_value=raw)
    if draw(st.booleans()):
        http.headers["authorization"] = draw(
            st.one_of(TEXT, st.just("Bearer " + KEY.sign(testing.claims("alice", now=NOW))))
        )
    attributes.source.principal = draw(
        st.one_of(st.sampled_from(VALID_PEERS + INVALID_PEERS), TEXT)
    )
    attributes.source.address.socket_address.address = draw(
        st.one_of(st.sampled_from(SOURCE_IPS), TEXT)
    )
    attributes.source.address.socket_address.port_value = draw(st.integers(0, 2**32 - 1))
    attributes.destination.address.socket_address.port_value = draw(st.integers(0, 2**32 - 1))
    attributes.destination.principal = draw(TEXT)
    for key, value in draw(st.dictionaries(CONTEXT_KEYS, CONTEXT_VALUES)).items():
        attributes.context_extensions[key] = value
    # what Envoy sends is bytes: make sure the message survives the wire
    return external_auth_pb2.CheckRequest.FromString(message.SerializeToString())


FIXED_POLICY = compile_policy(
    build_policy(
        (Role("any", (Permission(),)),),
        (
            Binding("users", "any", subjects=("*",), not_source_ips=("192.168.0.0/16",)),
            Binding("edge", "any", workloads=(EDGE,)),
            Binding("deny-json", "any", effect="deny", mode="audit"),
        ),
    )
)


@settings(max_examples=300, deadline=None)
@given(check_requests())
def test_from_check_request_never_raises(message: external_auth_pb2.CheckRequest) -> None:
    request = AuthzRequest.from_check_request(message)
    assert "?" not in request.path and "#" not in request.path
    assert request.method == request.method.upper()
    decision = decide(request, FIXED_POLICY, NOW)
    assert decision.reason in reasons.ALL
    to_check_response(decision, Responses(remove_authorization=True))
