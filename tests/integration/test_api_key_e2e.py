"""API keys through real Envoy: `meshward up` → Envoy → authz (API-key identity) → upstream.

The key is meshward's credential, not the upstream's: the upstream must never see it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests import tokens
from tests.envoy_harness import free_port
from tests.mesh_harness import Mesh, RecordingUpstream, http
from tests.policy_files import new_keys, write_policy

pytestmark = pytest.mark.integration

BOT_KEY = "mw-demo-0123456789abcdef0123456789abcdef"
BOT_HASH = hashlib.sha256(BOT_KEY.encode()).hexdigest()

POLICY = """\
services:
  - name: reports
    endpoints: [{{address: 127.0.0.1, port: {reports_port}}}]
gateways:
  - name: edge
    port: {gateway_port}
    routes:
      - name: reports-api
        match: {{prefix: /reports}}
        service: reports
issuers:
  - name: test
    issuer: https://issuer.test
    audiences: [meshward-test]
    jwks_file: keys/jwks.json
api_keys:
  - name: nightly-bot
    key_sha256: "{bot_hash}"
    subject: nightly-bot
    groups: [automation]
roles:
  - name: reports-reader
    permissions: [{{methods: [GET], paths: ["/reports/*"]}}]
bindings:
  - name: automation-reads-reports
    role: reports-reader
    groups: [automation]
default: deny
"""


@dataclass
class Stack:
    mesh: Mesh
    url: str
    reports: RecordingUpstream
    keys: tuple


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("apikeys")
    keys = new_keys()
    ports = {"reports_port": free_port(), "gateway_port": free_port()}
    policy_dir = write_policy(
        base / "policies", text=POLICY.replace("{bot_hash}", BOT_HASH), keys=keys, **ports
    )
    reports = RecordingUpstream("reports", ports["reports_port"]).start()
    mesh = Mesh.start(policy_dir, base / "state")
    try:
        yield Stack(mesh, f"http://127.0.0.1:{ports['gateway_port']}", reports, keys)
    finally:
        mesh.stop()
        reports.stop()


@pytest.mark.parametrize(
    "headers",
    [{"x-api-key": BOT_KEY}, {"authorization": f"ApiKey {BOT_KEY}"}],
    ids=["x-api-key", "authorization-apikey"],
)
def test_valid_api_key_is_allowed_and_never_forwarded(
    stack: Stack, headers: dict[str, str]
) -> None:
    before = len(stack.reports.requests)
    result = http(stack.url + "/reports/daily", headers=headers)
    assert result.status == 200, result.body
    (seen,) = stack.reports.requests[before:]
    assert seen.headers["x-meshward-subject"] == "nightly-bot"
    assert "x-api-key" not in seen.headers
    assert BOT_KEY not in str(seen.headers)


def test_unknown_key_and_ambiguous_credentials_are_401(stack: Stack) -> None:
    before = len(stack.reports.requests)
    unknown = http(stack.url + "/reports/daily", headers={"x-api-key": "not-a-key"})
    assert unknown.status == 401
    assert unknown.headers["www-authenticate"].startswith('ApiKey realm="meshward"')
    assert unknown.json()["reason"] == "invalid_api_key"
    token = tokens.sign(stack.keys[0], tokens.claims("alice", groups=("automation",)))
    both = http(
        stack.url + "/reports/daily",
        headers={"x-api-key": BOT_KEY, "authorization": f"Bearer {token}"},
    )
    assert both.status == 401
    assert both.json()["reason"] == "ambiguous_credentials"
    # The key grants only what its groups' bindings grant.
    assert http(stack.url + "/reports/daily", method="POST",
                headers={"x-api-key": BOT_KEY}).status == 403  # fmt: skip
    assert len(stack.reports.requests) == before
