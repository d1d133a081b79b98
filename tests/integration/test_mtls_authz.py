"""The real authz behind the sidecar: it sees the gateway's SPIFFE ID as the mTLS peer.

All real processes (``tests/process_mesh.py``): ``meshward xds`` with its built-in CA,
``meshward authz`` fed over ADS, a TLS gateway Envoy and the orders sidecar's Envoy.
A user request is checked twice — at the gateway (no peer identity: outside client)
and at the sidecar, where the peer is the gateway: authz reports it to the app in
``x-meshward-workload``, and the sidecar's ``x-forwarded-client-cert`` names it too.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import tokens
from tests.envoy_harness import free_port
from tests.mesh_harness import RecordingUpstream
from tests.mtls_harness import client_context, https_request
from tests.policy_files import VALID_POLICY, new_keys, write_policy
from tests.process_mesh import ProcessMesh, wait_until

pytestmark = pytest.mark.integration

EDGE = "spiffe://example.org/ns/shop/sa/edge"

POLICY = VALID_POLICY.replace(
    "services:\n  - name: orders\n    endpoints:\n      - address: 127.0.0.1\n"
    "        port: {orders_port}\n",
    "mesh:\n  trust_domain: example.org\n  namespace: shop\n"
    "services:\n  - name: orders\n    endpoints:\n      - address: 127.0.0.1\n"
    "        port: {orders_port}\n    sidecar:\n      port: {sidecar_port}\n",
).replace("    port: {gateway_port}\n", "    port: {gateway_port}\n    tls: {{}}\n")


class World:
    def __init__(self, tmp: Path) -> None:
        assert "sidecar:" in POLICY and "tls: {{}}" in POLICY
        self.keys = new_keys()
        self.ports = {
            "orders_port": free_port(),
            "catalog_port": free_port(),
            "gateway_port": free_port(),
            "sidecar_port": free_port(),
        }
        policy_dir = write_policy(tmp / "policies", POLICY, keys=self.keys, **self.ports)
        self.orders = RecordingUpstream("orders", self.ports["orders_port"]).start()
        work = tmp / "work"
        work.mkdir()
        self.mesh = ProcessMesh(policy_dir, work, ["edge"], sidecars=["orders-sidecar"])

    def get(self, path: str, sub: str | None = None) -> tuple[int, bytes]:
        headers = {}
        if sub is not None:
            token = tokens.sign(self.keys[0], tokens.claims(sub, ()))
            headers["authorization"] = f"Bearer {token}"
        context = client_context(self.mesh.bundle)
        status, _, body = https_request(self.ports["gateway_port"], path, context, headers=headers)
        return status, body


@pytest.fixture
def world(tmp_path: Path, authz_engine: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    # ProcessMesh starts `meshward authz` with this environment: its --engine default.
    monkeypatch.setenv("MESHWARD_AUTHZ_ENGINE", authz_engine)
    w = World(tmp_path)
    try:
        w.mesh.start()
        yield w
    except BaseException:
        print(w.mesh.logs())
        raise
    finally:
        w.mesh.stop()
        w.orders.stop()


def test_authz_at_the_sidecar_sees_the_gateways_spiffe_id(world: World, authz_engine: str) -> None:
    status_url = f"http://127.0.0.1:{world.mesh.authz_status_port}/status"
    with urllib.request.urlopen(status_url, timeout=5) as reply:
        assert json.loads(reply.read())["engine"] == authz_engine
    assert wait_until(lambda: world.get("/orders/1", "alice")[0] == 200, 15)
    seen = world.orders.requests[-1].headers
    assert seen["x-meshward-workload"] == EDGE
    assert seen["x-meshward-subject"] == "alice"
    assert f"URI={EDGE}" in seen["x-forwarded-client-cert"]
    # Deny decisions still come from authz (at the gateway) with their reason.
    status, body = world.get("/orders/1")
    assert status == 401 and json.loads(body)["reason"] == "missing_token"
    status, body = world.get("/orders/1", "mallory")
    assert status == 403 and json.loads(body)["reason"] == "forbidden"
