"""Identity and access rules through real Envoy: `meshward up` → Envoy → authz → upstream.

What only a real proxy proves: the attributes authz decides on (client address,
listener port, Host, headers) are the ones Envoy sends; an MFA route's 401 reaches the
client with the RFC 9470 challenge; deny rules win; the configured upstream headers
arrive, and the bearer token does not when the policy says to strip it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from joserfc.jwk import ECKey, RSAKey

from tests import tokens
from tests.envoy_harness import free_port
from tests.mesh_harness import Mesh, RecordingUpstream, http
from tests.policy_files import new_keys, write_policy

pytestmark = pytest.mark.integration

POLICY = """\
services:
  - name: orders
    endpoints: [{{address: 127.0.0.1, port: {orders_port}}}]
gateways:
  - name: edge
    port: {gateway_port}
    routes:
      - name: orders-admin
        match: {{prefix: /admin}}
        service: orders
        mfa: {{amr: [mfa, otp, hwk], min_acr: substantial}}
      - name: orders-api
        match: {{prefix: /}}
        service: orders
issuers:
  - name: test
    issuer: https://issuer.test
    audiences: [meshward-test]
    jwks_file: keys/jwks.json
    acr_levels: [low, substantial, high]
roles:
  - name: admin-console
    permissions: [{{methods: [GET, POST], paths: ["/admin/*"]}}]
  - name: tenant-items
    permissions:
      - methods: [GET]
        paths: ["/tenants/{{*}}/items/{{**}}"]
        hosts: [api.example.com]
        ports: [{gateway_port}]
        headers: {{x-tenant: "*"}}
  - name: wrong-port
    permissions: [{{methods: [GET], paths: ["/ports/*"], ports: [1]}}]
  - name: purge
    permissions: [{{methods: [DELETE], paths: ["/tenants/*"]}}]
bindings:
  - name: staff-admin
    role: admin-console
    groups: [staff]
  - name: staff-tenants
    role: tenant-items
    groups: [staff]
    claims: {{realm_access.roles: [tenant-reader]}}
  - name: staff-ports
    role: wrong-port
    groups: [staff]
  - name: staff-purge
    role: purge
    groups: [staff]
  # A dry run: never enforced, reported in the decision log.
  - name: try-customers-admin
    role: admin-console
    groups: [customers]
    mode: audit
  # Envoy reports the TCP peer; every test client is on loopback.
  - name: no-purge-from-loopback
    role: purge
    effect: deny
    source_ips: [127.0.0.0/8, "::1"]
responses:
  headers: {{subject: x-user, groups: x-user-groups}}
  remove_authorization: true
default: deny
"""


@dataclass
class Stack:
    mesh: Mesh
    url: str
    upstream: RecordingUpstream
    key: RSAKey | ECKey

    def token(
        self, sub: str = "erin", groups: tuple[str, ...] = ("staff",), **claims: object
    ) -> str:
        return tokens.sign(self.key, tokens.claims(sub, groups, **claims))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("iam")
    keys = new_keys()
    ports = {"orders_port": free_port(), "gateway_port": free_port()}
    policy_dir = write_policy(base / "policies", text=POLICY, keys=keys, **ports)
    upstream = RecordingUpstream("orders", ports["orders_port"]).start()
    mesh = Mesh.start(policy_dir, base / "state")
    try:
        yield Stack(mesh, f"http://127.0.0.1:{ports['gateway_port']}", upstream, keys[0])
    finally:
        mesh.stop()
        upstream.stop()


def test_mfa_route_steps_up_a_password_only_token(stack: Stack) -> None:
    before = len(stack.upstream.requests)
    weak = http(
        stack.url + "/admin/users",
        headers={"authorization": f"Bearer {stack.token(amr=['pwd'], acr='low')}"},
    )
    assert weak.status == 401, weak.body
    challenge = weak.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="meshward", error="insufficient_user_authentication"')
    assert 'acr_values="substantial high"' in challenge
    assert weak.json()["reason"] == "insufficient_user_authentication"
    # amr satisfied but acr too low: still a step-up
    low = http(
        stack.url + "/admin/users",
        headers={"authorization": f"Bearer {stack.token(amr=['pwd', 'otp'], acr='low')}"},
    )
    assert low.status == 401
    assert len(stack.upstream.requests) == before

    strong = stack.token(amr=["pwd", "otp"], acr="high")
    ok = http(stack.url + "/admin/users", headers={"authorization": f"Bearer {strong}"})
    assert ok.status == 200, ok.body
    (seen,) = stack.upstream.requests[before:]
    assert seen.headers["x-user"] == "erin"
    assert seen.headers["x-user-groups"] == "staff"
    assert "authorization" not in {k.lower() for k in seen.headers}  # remove_authorization


def test_mfa_route_for_a_user_without_any_grant_is_forbidden_not_a_challenge(
    stack: Stack,
) -> None:
    # a strong sign-in: the dry-run allow would get through the step-up demand too
    strong = stack.token("mallory", ("customers",), amr=["otp"], acr="high")
    result = http(stack.url + "/admin/users", headers={"authorization": f"Bearer {strong}"})
    assert result.status == 403
    assert result.json()["reason"] == "forbidden"
    assert "www-authenticate" not in result.headers
    # The dry-run binding applied: the decision log says so, the response did not change.
    line = decision_line(stack, result.json()["decision_id"])
    assert line["audit"] == ["allow:try-customers-admin/admin-console#0"]
    assert line["audit_outcome"] == "would_allow"
    assert (line["decision"], line["reason"], line["subject"]) == ("deny", "forbidden", "mallory")


def decision_line(stack: Stack, decision_id: str, timeout: float = 10.0) -> dict[str, object]:
    """The decision log line of ``decision_id`` (written by authz's background writer)."""
    path = stack.mesh.state_dir / "logs" / "decisions.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for text in path.read_text().splitlines():
                record = json.loads(text)
                if record["decision_id"] == decision_id:
                    return dict(record)
        time.sleep(0.05)
    raise AssertionError(f"no decision log line for {decision_id} in {path}")


def test_template_host_port_header_and_claim_conditions(stack: Stack) -> None:
    token = stack.token(realm_access={"roles": ["tenant-reader"]})
    good = {"host": "api.example.com", "x-tenant": "acme"}
    before = len(stack.upstream.requests)
    assert (
        http(
            stack.url + "/tenants/acme/items/1/2",
            headers={"authorization": f"Bearer {token}", **good},
        ).status
        == 200
    )
    assert len(stack.upstream.requests) == before + 1
    for path, headers, tok in [
        ("/tenants/acme/items/1", {**good, "host": "other.example.com"}, token),  # host
        ("/tenants/acme/items/1", {"host": "api.example.com"}, token),  # header missing
        ("/tenants/acme/x/items/1", good, token),  # {*} is one segment
        ("/tenants/acme/items/1", good, stack.token()),  # claim condition
    ]:
        result = http(stack.url + path, headers={"authorization": f"Bearer {tok}", **headers})
        assert result.status == 403, (path, headers)
        assert result.json()["reason"] == "forbidden"
    # A permission for another listener port never matches on this gateway.
    ports = http(stack.url + "/ports/1", headers={"authorization": f"Bearer {token}"})
    assert ports.status == 403
    assert len(stack.upstream.requests) == before + 1


def test_deny_rule_on_the_client_address_wins_over_an_allow(stack: Stack) -> None:
    before = len(stack.upstream.requests)
    result = http(
        stack.url + "/tenants/acme",
        method="DELETE",
        headers={"authorization": f"Bearer {stack.token()}"},
    )
    assert result.status == 403
    assert result.json()["reason"] == "denied_by_rule"
    assert len(stack.upstream.requests) == before
