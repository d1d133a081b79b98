"""The loader on the new policy keys: what they load into, one ``file:line`` error per bad
input, and every new field on the wire and in the version."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshward.pki.ca import CertificateAuthority
from meshward.policy import wire
from meshward.policy.loader import load_policy
from meshward.policy.model import (
    Binding,
    ClaimCondition,
    HeaderMatch,
    MfaRequirement,
    Permission,
    Policy,
    Responses,
    Tracing,
)
from tests.policy_files import line_of, new_keys, policy_errors, write_jwks

FULL_POLICY = textwrap.dedent(
    """\
    services:
      - name: orders
        endpoints: [{address: 127.0.0.1, port: 18081}]
    gateways:
      - name: edge
        port: 18080
        routes:
          - name: orders-api
            match: {prefix: /orders}
            service: orders
          - name: admin-api
            match: {prefix: /admin}
            service: orders
            mfa:
              amr: [otp, hwk, otp]
              min_acr: silver
              max_age_seconds: 600
    issuers:
      - name: local
        issuer: https://issuer.test
        audiences: [meshward-test]
        jwks_file: keys/jwks.json
        acr_levels: [bronze, silver, gold]
      - name: remote
        issuer: https://idp.example.com
        audiences: [meshward-test]
        jwks_uri: https://idp.example.com/.well-known/jwks.json
        jwks_ca_file: keys/ca.pem
        jwks_refresh_seconds: 600
        jwks_min_refresh_seconds: 30
        acr_levels: [silver, platinum]
    roles:
      - name: tenant-api
        permissions:
          - methods: [get, POST]
            paths: ["/orders/{*}/items", "/static/{**}", "*.json", "/orders/*", "/orders/*"]
            hosts: [API.example.com, "*.internal.test", api.example.com]
            ports: [8443, 443, 8443]
            headers:
              X-Tenant: acme
              x-env: "prod-*"
              x-debug: "*"
            services: [orders]
          - paths: ["*"]
            hosts: ["*"]
    bindings:
      - name: tenant-users
        role: tenant-api
        subjects: ["*"]
        source_ips: [10.0.0.0/8, 10.1.2.3, "2001:db8::/32", 10.0.0.0/8]
        not_source_ips: [10.9.0.0/16]
        claims:
          realm_access.roles: [admin, staff]
          email_verified: true
          level: 3
          tenant: acme
      - name: block-outside
        role: tenant-api
        effect: deny
        not_source_ips: [10.0.0.0/8]
      - name: dry-run
        role: tenant-api
        groups: [ops]
        workloads: ["spiffe://meshward.local/ns/*/sa/edge"]
        effect: allow
        mode: audit
    responses:
      headers:
        subject: X-User
        groups: null
        workload: x-via
      remove_authorization: true
    tracing:
      collector: {address: otel.internal, port: 4317}
      sampling_percent: 12.5
    default: deny
    """
)


@pytest.fixture(scope="module")
def ca_pem() -> str:
    return CertificateAuthority.generate("meshward.local").bundle_pem.decode()


def write(directory: Path, text: str, ca_pem: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mesh.yaml").write_text(text)
    write_jwks(directory / "keys" / "jwks.json", *new_keys())
    (directory / "keys" / "ca.pem").write_text(ca_pem)
    return directory


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory, ca_pem: str) -> Policy:
    return load_policy(write(tmp_path_factory.mktemp("full"), FULL_POLICY, ca_pem))


# ---- every new key, accepted --------------------------------------------------------------


def test_permissions_load_hosts_ports_headers_and_templates(full: Policy) -> None:
    (role,) = full.roles
    assert role.permissions[0] == Permission(
        methods=("GET", "POST"),
        paths=("/orders/{*}/items", "/static/{**}", "*.json", "/orders/*"),
        services=("orders",),
        hosts=("api.example.com", "*.internal.test"),
        ports=(8443, 443),
        headers=(
            HeaderMatch("x-tenant", "acme"),
            HeaderMatch("x-env", "prod-*"),
            HeaderMatch("x-debug", "*"),
        ),
    )
    # "*" among the hosts means any host: stored as no host restriction
    assert role.permissions[1] == Permission(paths=("*",))


def test_bindings_load_effect_mode_addresses_and_claims(full: Policy) -> None:
    users, outside, dry = full.bindings
    assert users == Binding(
        "tenant-users",
        "tenant-api",
        subjects=("*",),
        source_ips=("10.0.0.0/8", "10.1.2.3/32", "2001:db8::/32"),
        not_source_ips=("10.9.0.0/16",),
        claims=(
            ClaimCondition("realm_access.roles", ("admin", "staff")),
            ClaimCondition("email_verified", ("true",)),
            ClaimCondition("level", ("3",)),
            ClaimCondition("tenant", ("acme",)),
        ),
    )
    assert (users.effect, users.mode) == ("allow", "enforce")
    assert outside == Binding(
        "block-outside", "tenant-api", effect="deny", not_source_ips=("10.0.0.0/8",)
    )
    assert dry == Binding(
        "dry-run",
        "tenant-api",
        groups=("ops",),
        workloads=("spiffe://meshward.local/ns/*/sa/edge",),
        mode="audit",
    )


def test_routes_load_mfa_and_issuers_load_acr_levels_and_remote_keys(
    full: Policy, ca_pem: str
) -> None:
    orders, admin = full.gateways[0].routes
    assert orders.mfa is None
    assert admin.mfa == MfaRequirement(amr=("otp", "hwk"), min_acr="silver", max_age_seconds=600)
    local, remote = full.issuers
    assert local.acr_levels == ("bronze", "silver", "gold")
    assert local.jwks_uri == "" and local.jwks_ca_pem == "" and len(local.jwks["keys"]) == 2
    assert remote.jwks == {} and remote.jwks_file == ""
    assert remote.jwks_uri == "https://idp.example.com/.well-known/jwks.json"
    assert remote.jwks_ca_pem == ca_pem
    assert (remote.jwks_refresh_seconds, remote.jwks_min_refresh_seconds) == (600, 30)
    assert remote.acr_levels == ("silver", "platinum")


def test_tracing_loads(full: Policy) -> None:
    assert full.tracing == Tracing("otel.internal", 4317, 12.5)


def test_responses_load(full: Policy) -> None:
    assert full.responses == Responses(
        subject_header="x-user",
        groups_header="",
        workload_header="x-via",
        remove_authorization=True,
    )


def test_defaults_without_the_new_keys(tmp_path: Path, ca_pem: str) -> None:
    text = textwrap.dedent(
        """\
        roles:
          - name: r
            permissions: [{paths: ["*"]}]
        bindings:
          - name: b
            role: r
            subjects: [alice]
        """
    )
    policy = load_policy(write(tmp_path, text, ca_pem))
    assert policy.roles[0].permissions[0] == Permission()
    (binding,) = policy.bindings
    assert (binding.effect, binding.mode, binding.source_ips, binding.claims) == (
        "allow",
        "enforce",
        (),
        (),
    )
    assert policy.responses == Responses()
    assert policy.tracing is None


# ---- one clear file:line error per bad input ------------------------------------------------

MFA_BLOCK = "          amr: [otp, hwk, otp]\n          min_acr: silver\n"
HEADERS_BLOCK = (
    '        headers:\n          X-Tenant: acme\n          x-env: "prod-*"\n'
    '          x-debug: "*"\n'
)
CLAIMS_BLOCK = (
    "realm_access.roles: [admin, staff]\n      email_verified: true\n      level: 3\n"
    "      tenant: acme\n"
)


def edit(before: str, after: str) -> str:
    assert FULL_POLICY.count(before) == 1, before
    return FULL_POLICY.replace(before, after)


BAD_CASES = [
    pytest.param(
        '"/orders/{*}/items"',
        '"/orders/{*}x/items"',
        "paths:",
        [
            "roles[0].permissions[0].paths: '/orders/{*}x/items' has segment '{*}x'",
            "'{*}' (one segment)",
        ],
        id="bad-path-template",
    ),
    pytest.param(
        '"/static/{**}"',
        '"/static/{**}/x"',
        "paths:",
        ["permissions[0].paths: '/static/{**}/x' uses '{**}' before the last segment"],
        id="double-star-not-last",
    ),
    pytest.param(
        '"*.internal.test"',
        '"*internal.test"',
        "hosts: [API",
        [
            "roles[0].permissions[0].hosts: '*internal.test' is not a host name",
            "'*.example.com'",
        ],
        id="bad-host",
    ),
    pytest.param(
        "ports: [8443, 443, 8443]",
        "ports: [8443, 0]",
        "ports:",
        ["roles[0].permissions[0].ports[1]: 0 is out of range; use 1..65535"],
        id="port-0",
    ),
    pytest.param(
        "ports: [8443, 443, 8443]",
        "ports: [70000]",
        "ports:",
        ["roles[0].permissions[0].ports[0]: 70000 is out of range; use 1..65535"],
        id="port-70000",
    ),
    pytest.param(
        "X-Tenant: acme",
        "X Tenant: acme",
        "X Tenant",
        [
            "roles[0].permissions[0].headers: 'x tenant' is not a header name",
            "use lower-case letters, digits and '-'",
        ],
        id="header-name-with-space",
    ),
    pytest.param(
        HEADERS_BLOCK,
        "        headers: [x-tenant]\n",
        "headers:",
        [
            "roles[0].permissions[0].headers: expected a mapping of header name to value",
            "got a list",
        ],
        id="headers-not-a-mapping",
    ),
    pytest.param(
        "not_source_ips: [10.9.0.0/16]",
        "not_source_ips: [10.9.0.0/33]",
        "10.9.0.0/33",
        [
            "bindings[0].not_source_ips: '10.9.0.0/33' is not an IP address or CIDR block",
            "'10.0.0.0/8'",
        ],
        id="bad-cidr",
    ),
    pytest.param(
        "10.1.2.3, ",
        "10.1.2.3/8, ",
        "10.1.2.3/8",
        [
            "bindings[0].source_ips: '10.1.2.3/8' has host bits set; did you mean '10.0.0.0/8'?",
        ],
        id="cidr-host-bits",
    ),
    pytest.param(
        "effect: allow",
        "effect: alow",
        "effect: alow",
        ["bindings[2].effect: 'alow' is not one of: allow, deny"],
        id="effect-typo",
    ),
    pytest.param(
        "mode: audit",
        "mode: audti",
        "mode: audti",
        ["bindings[2].mode: 'audti' is not one of: enforce, audit"],
        id="mode-typo",
    ),
    pytest.param(
        '    subjects: ["*"]\n',
        "",
        "- name: tenant-users",
        [
            "bindings[0]: grants its role to nobody; list 'subjects', 'groups' and/or 'workloads'",
        ],
        id="allow-without-principals",
    ),
    pytest.param(
        "claims:\n      " + CLAIMS_BLOCK,
        "claims: [tenant]\n",
        "claims:",
        [
            "bindings[0].claims: expected a mapping of claim path to accepted value(s), "
            "like '{realm_access.roles: [admin]}', got a list",
        ],
        id="claims-not-a-mapping",
    ),
    pytest.param(
        "realm_access.roles: [admin, staff]",
        "realm_access.roles: []",
        "realm_access.roles: []",
        ["bindings[0].claims.realm_access.roles: list at least one accepted value"],
        id="claims-empty-list",
    ),
    pytest.param(
        "tenant: acme\n",
        "tenant: {name: acme}\n",
        "tenant: {name",
        ["bindings[0].claims.tenant: expected a string, number or boolean, got a mapping"],
        id="claims-value-a-mapping",
    ),
    pytest.param(
        MFA_BLOCK,
        "",
        "max_age_seconds: 600",
        [
            "gateways[0].routes[1].mfa: demands nothing; list 'amr' methods",
            "'min_acr' level",
        ],
        id="mfa-demands-nothing",
    ),
    pytest.param(
        "min_acr: silver",
        "min_acr: titanium",
        "min_acr: titanium",
        [
            "gateways[0].routes[1].mfa.min_acr: 'titanium' is in no issuer's 'acr_levels'",
            "under 'acr_levels'",
        ],
        id="min-acr-in-no-ladder",
    ),
    pytest.param(
        "max_age_seconds: 600",
        "max_age_seconds: 0",
        "max_age_seconds: 0",
        ["gateways[0].routes[1].mfa.max_age_seconds: 0 is out of range"],
        id="mfa-max-age-0",
    ),
    pytest.param(
        "    jwks_file: keys/jwks.json\n",
        "    jwks_file: keys/jwks.json\n    jwks_uri: https://issuer.test/jwks\n",
        "- name: local",
        ["issuers[0]: set exactly one of 'jwks_file'", "or 'jwks_uri'"],
        id="jwks-file-and-uri",
    ),
    pytest.param(
        "    jwks_file: keys/jwks.json\n",
        "",
        "- name: local",
        ["issuers[0]: set exactly one of 'jwks_file'", "or 'jwks_uri'"],
        id="neither-jwks-file-nor-uri",
    ),
    pytest.param(
        "jwks_uri: https://idp.example.com",
        "jwks_uri: http://idp.example.com",
        "jwks_uri:",
        [
            "issuers[1].jwks_uri: 'http://idp.example.com/.well-known/jwks.json' is not an "
            "https:// URL",
            "use the issuer's https JWKS endpoint",
        ],
        id="http-jwks-uri",
    ),
    pytest.param(
        "jwks_ca_file: keys/ca.pem",
        "jwks_ca_file: keys/missing.pem",
        "jwks_ca_file:",
        ["issuers[1].jwks_ca_file: cannot read", "missing.pem", "give the PEM file of the CA"],
        id="jwks-ca-file-unreadable",
    ),
    pytest.param(
        "jwks_ca_file: keys/ca.pem",
        "jwks_ca_file: keys/jwks.json",
        "jwks_ca_file:",
        [
            "issuers[1].jwks_ca_file:",
            "holds no PEM certificate; it must contain '-----BEGIN CERTIFICATE-----'",
        ],
        id="jwks-ca-file-not-pem",
    ),
    pytest.param(
        "    jwks_file: keys/jwks.json\n",
        "    jwks_file: keys/jwks.json\n    jwks_refresh_seconds: 60\n",
        "jwks_refresh_seconds: 60",
        ["issuers[0].jwks_refresh_seconds: only applies with 'jwks_uri'"],
        id="refresh-on-a-jwks-file-issuer",
    ),
    pytest.param(
        "subject: X-User",
        "subject: Authorization",
        "subject: Authorization",
        ["responses.headers.subject: 'authorization' is reserved", "pick another name"],
        id="responses-reserved-header",
    ),
    pytest.param(
        "workload: x-via",
        "workload: X-User",
        "subject: X-User",
        ["responses.headers: each fact needs its own header name"],
        id="responses-duplicate-names",
    ),
    pytest.param(
        "subject: X-User",
        "subject: X User",
        "subject: X User",
        ["responses.headers.subject: 'x user' is not a header name"],
        id="responses-bad-header-name",
    ),
    pytest.param(
        "remove_authorization: true",
        'remove_authorization: "yes"',
        "remove_authorization",
        ["responses.remove_authorization: expected true or false, got a string 'yes'"],
        id="remove-authorization-not-a-bool",
    ),
    pytest.param(
        "  remove_authorization: true\n",
        "  remove_authorizaton: true\n",
        "remove_authorizaton",
        ["responses: unknown key 'remove_authorizaton' (did you mean 'remove_authorization'?)"],
        id="responses-key-typo",
    ),
]


@pytest.mark.parametrize(("before", "after", "needle", "messages"), BAD_CASES)
def test_each_bad_input_is_one_error_with_file_and_line(
    tmp_path: Path, ca_pem: str, *, before: str, after: str, needle: str, messages: list[str]
) -> None:
    text = edit(before, after)
    write(tmp_path, text, ca_pem)
    errors = policy_errors(tmp_path)
    assert len(errors) == 1, errors
    line = line_of(text, needle)
    assert errors[0].startswith(f"{tmp_path}/mesh.yaml:{line}: "), (errors[0], line)
    for message in messages:
        assert message in errors[0], errors[0]


def test_responses_set_twice_names_the_first(tmp_path: Path, ca_pem: str) -> None:
    write(tmp_path, FULL_POLICY, ca_pem)
    (tmp_path / "zz-more.yaml").write_text("# more\nresponses:\n  remove_authorization: false\n")
    first = line_of(FULL_POLICY, "responses:") + 1  # where its mapping starts
    assert policy_errors(tmp_path) == [
        f"{tmp_path}/zz-more.yaml:3: responses: set again (first at {tmp_path}/mesh.yaml:"
        f"{first}); keep one"
    ]


def test_a_deny_binding_may_name_no_principal(tmp_path: Path, ca_pem: str) -> None:
    policy = load_policy(write(tmp_path, FULL_POLICY, ca_pem))
    outside = policy.bindings[1]
    assert (outside.subjects, outside.groups, outside.workloads) == ((), (), ())


def test_a_mistyped_effect_on_a_principal_less_deny_is_one_error(
    tmp_path: Path, ca_pem: str
) -> None:
    write(tmp_path, edit("effect: deny", "effect: dney"), ca_pem)
    errors = policy_errors(tmp_path)
    assert len(errors) == 1, errors
    assert "bindings[1].effect: 'dney' is not one of: allow, deny" in errors[0]


def test_yaml_boolean_spellings_compare_as_json_booleans(tmp_path: Path, ca_pem: str) -> None:
    write(tmp_path, edit("email_verified: true", "email_verified: yes"), ca_pem)
    claims = load_policy(tmp_path).bindings[0].claims
    assert ClaimCondition("email_verified", ("true",)) in claims


# ---- the wire and the version ---------------------------------------------------------------


def through_the_wire(policy: Policy) -> Policy:
    message = wire.PolicyResource.FromString(wire.to_resource(policy).SerializeToString())
    return wire.from_resource(message)


def test_every_new_field_round_trips_through_the_wire(full: Policy, ca_pem: str) -> None:
    decoded = through_the_wire(full)
    assert decoded == full
    assert decoded.version == full.version
    assert decoded.canonical_json() == full.canonical_json()
    assert decoded.roles == full.roles
    assert decoded.bindings == full.bindings
    assert decoded.gateways[0].routes[1].mfa == full.gateways[0].routes[1].mfa
    assert decoded.issuers[1].jwks_ca_pem == ca_pem
    assert decoded.issuers[0].acr_levels == ("bronze", "silver", "gold")
    assert decoded.responses == full.responses
    assert decoded.tracing == full.tracing
    assert isinstance(decoded.roles[0].permissions[0].headers[0], HeaderMatch)
    assert isinstance(decoded.bindings[0].claims[0], ClaimCondition)


def rebuilt(policy: Policy, **changes: Any) -> Policy:
    parts: dict[str, Any] = {
        "services": policy.services,
        "gateways": policy.gateways,
        "issuers": policy.issuers,
        "roles": policy.roles,
        "bindings": policy.bindings,
        "api_keys": policy.api_keys,
        "mesh": policy.mesh,
        "responses": policy.responses,
        "tracing": policy.tracing,
    }
    parts.update(changes)
    return Policy.build(**parts)


def with_permission(p: Policy, **changes: Any) -> Policy:
    role = p.roles[0]
    first = replace(role.permissions[0], **changes)
    return rebuilt(p, roles=(replace(role, permissions=(first, *role.permissions[1:])),))


def with_binding(p: Policy, **changes: Any) -> Policy:
    return rebuilt(p, bindings=(replace(p.bindings[0], **changes), *p.bindings[1:]))


def with_mfa(p: Policy, mfa: MfaRequirement | None) -> Policy:
    gateway = p.gateways[0]
    routes = (gateway.routes[0], replace(gateway.routes[1], mfa=mfa))
    return rebuilt(p, gateways=(replace(gateway, routes=routes),))


def with_issuer(p: Policy, index: int, **changes: Any) -> Policy:
    issuers = list(p.issuers)
    issuers[index] = replace(issuers[index], **changes)
    return rebuilt(p, issuers=tuple(issuers))


def with_tracing(p: Policy, **changes: Any) -> Tracing:
    assert p.tracing is not None
    return replace(p.tracing, **changes)


def mfa_of(p: Policy) -> MfaRequirement:
    mfa = p.gateways[0].routes[1].mfa
    assert mfa is not None
    return mfa


CHANGES: list[tuple[str, Callable[[Policy], Policy]]] = [
    ("permission.hosts", lambda p: with_permission(p, hosts=("api.example.com",))),
    ("permission.ports", lambda p: with_permission(p, ports=(8443,))),
    (
        "permission.headers.value",
        lambda p: with_permission(p, headers=(HeaderMatch("x-tenant", "other"),)),
    ),
    (
        "permission.headers.name",
        lambda p: with_permission(p, headers=(HeaderMatch("x-org", "acme"),)),
    ),
    ("permission.paths", lambda p: with_permission(p, paths=("/orders/{*}",))),
    ("binding.effect", lambda p: with_binding(p, effect="deny")),
    ("binding.mode", lambda p: with_binding(p, mode="audit")),
    ("binding.source_ips", lambda p: with_binding(p, source_ips=("10.0.0.0/8",))),
    ("binding.not_source_ips", lambda p: with_binding(p, not_source_ips=())),
    (
        "binding.claims.values",
        lambda p: with_binding(p, claims=(ClaimCondition("tenant", ("x",)),)),
    ),
    (
        "binding.claims.path",
        lambda p: with_binding(p, claims=(ClaimCondition("org", ("acme",)),)),
    ),
    ("route.mfa.amr", lambda p: with_mfa(p, replace(mfa_of(p), amr=("otp",)))),
    ("route.mfa.min_acr", lambda p: with_mfa(p, replace(mfa_of(p), min_acr="gold"))),
    ("route.mfa.max_age", lambda p: with_mfa(p, replace(mfa_of(p), max_age_seconds=60))),
    ("route.mfa removed", lambda p: with_mfa(p, None)),
    ("issuer.acr_levels", lambda p: with_issuer(p, 0, acr_levels=("silver", "bronze", "gold"))),
    ("issuer.jwks_uri", lambda p: with_issuer(p, 1, jwks_uri="https://idp.example.com/keys")),
    ("issuer.jwks_ca_pem", lambda p: with_issuer(p, 1, jwks_ca_pem="")),
    ("issuer.jwks_refresh_seconds", lambda p: with_issuer(p, 1, jwks_refresh_seconds=60)),
    ("issuer.jwks_min_refresh", lambda p: with_issuer(p, 1, jwks_min_refresh_seconds=5)),
    (
        "responses.subject_header",
        lambda p: rebuilt(p, responses=replace(p.responses, subject_header="x-sub")),
    ),
    (
        "responses.groups_header",
        lambda p: rebuilt(p, responses=replace(p.responses, groups_header="x-g")),
    ),
    (
        "responses.workload_header",
        lambda p: rebuilt(p, responses=replace(p.responses, workload_header="")),
    ),
    (
        "responses.remove_authorization",
        lambda p: rebuilt(p, responses=replace(p.responses, remove_authorization=False)),
    ),
    ("tracing removed", lambda p: rebuilt(p, tracing=None)),
    ("tracing.address", lambda p: rebuilt(p, tracing=with_tracing(p, collector_address="::1"))),
    ("tracing.port", lambda p: rebuilt(p, tracing=with_tracing(p, collector_port=4318))),
    ("tracing.sampling", lambda p: rebuilt(p, tracing=with_tracing(p, sampling_percent=100.0))),
]


@pytest.mark.parametrize(("what", "change"), CHANGES, ids=[c[0] for c in CHANGES])
def test_each_new_field_changes_the_version_and_travels(
    full: Policy, what: str, change: Callable[[Policy], Policy]
) -> None:
    assert rebuilt(full).version == full.version  # rebuilding alone changes nothing
    changed = change(full)
    assert changed != full, what
    assert changed.version != full.version, what
    decoded = through_the_wire(changed)
    assert decoded == changed and decoded.version == changed.version


def test_acr_levels_that_would_break_the_challenge_are_rejected(
    tmp_path: Path, ca_pem: str
) -> None:
    write(
        tmp_path,
        edit("acr_levels: [bronze, silver, gold]", 'acr_levels: [bronze, "sil ver", gold]'),
        ca_pem,
    )
    errors = policy_errors(tmp_path)
    assert len(errors) == 1, errors
    assert "acr_levels: 'sil ver' may not contain spaces, quotes, backslashes" in errors[0]
