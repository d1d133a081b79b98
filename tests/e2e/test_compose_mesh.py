"""The docker-compose mesh end to end: real containers, requests through the published
gateway port with demo JWTs minted on the host.

Order matters only for speed: every test leaves the mesh as it found it (a policy edit
is reverted, killed authz replicas are started again), so each can run alone.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import yaml

from tests.e2e.conftest import ComposeMesh, Response

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

EDGE_ADMIN = 9901
AUTHZ_REPLICAS = {"authz-1": "127.0.0.1:9001", "authz-2": "127.0.0.1:9002"}
EDGE_WORKLOAD = "spiffe://example.org/ns/shop/sa/edge"

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Call ``probe`` until it returns something other than ``None``; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def alice(mesh: ComposeMesh) -> str:
    return mesh.token("alice", "staff")


@pytest.fixture(scope="module")
def bob(mesh: ComposeMesh) -> str:
    return mesh.token("bob", "customers")


def authz_endpoints(mesh: ComposeMesh) -> set[str]:
    """The endpoints of the gateway Envoy's authz cluster (from its admin /clusters)."""
    text = mesh.admin(EDGE_ADMIN, "/clusters")
    return set(re.findall(r"^meshward_authz::([0-9.]+:\d+)::", text, re.MULTILINE))


def wait_authz_endpoints(mesh: ComposeMesh, want: set[str]) -> None:
    eventually(
        lambda: True if authz_endpoints(mesh) == want else None,
        30,
        f"the gateway's authz cluster to be exactly {sorted(want)}",
    )


def wait_decided_by(mesh: ComposeMesh, replica: str, decision_ids: list[str]) -> None:
    """Wait until ``replica``'s decision log (its stdout) holds every one of ``decision_ids``."""

    def logged() -> bool | None:
        logs = mesh.project.compose("logs", "--no-color", replica).stdout
        return True if all(f'"decision_id":"{d}"' in logs for d in decision_ids) else None

    eventually(logged, 10, f"decisions {decision_ids} in {replica}'s decision log")


def test_allowed_request_reaches_the_service_with_verified_identities(
    mesh: ComposeMesh, alice: str, bob: str
) -> None:
    resp = mesh.request("GET", "/orders/42", alice)
    assert resp.status == 200, resp.body
    body = resp.json()
    assert body["service"] == "orders"
    assert body["path"] == "/orders/42"
    assert body["subject"] == "alice"
    # The sidecar verified the gateway's SPIFFE ID over mTLS.
    assert body["workload"] == EDGE_WORKLOAD
    catalog = mesh.request("GET", "/catalog/items", bob)
    assert catalog.status == 200, catalog.body
    assert catalog.json()["service"] == "catalog"
    assert catalog.json()["subject"] == "bob"


def test_denied_request_is_403_and_never_reaches_the_service(mesh: ComposeMesh, bob: str) -> None:
    resp = mesh.request("GET", "/orders/42", bob)
    assert resp.status == 403, resp.body
    assert b'"service"' not in resp.body


@pytest.mark.parametrize("kind", ["none", "expired", "garbage", "forged-subject-header"])
def test_unauthenticated_request_is_401(mesh: ComposeMesh, kind: str) -> None:
    token: str | None = None
    headers: dict[str, str] = {}
    if kind == "expired":
        token = mesh.token("alice", "staff", ttl=-60)
    elif kind == "garbage":
        token = "not.a.jwt"
    elif kind == "forged-subject-header":
        headers["x-meshward-subject"] = "alice"
    resp = mesh.request("GET", "/orders/42", token, headers)
    assert resp.status == 401, (kind, resp.status, resp.body)


def test_a_request_trace_reaches_the_otlp_receiver_with_envoy_and_authz_spans(
    mesh: ComposeMesh, alice: str
) -> None:
    trace_id = secrets.token_hex(16)
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    resp = mesh.request("GET", "/orders/7", alice, {"traceparent": traceparent})
    assert resp.status == 200, resp.body

    def trace() -> list[dict[str, Any]] | None:
        spans = [s for s in mesh.spans() if s["trace_id"] == trace_id]
        services = {s["service"] for s in spans}
        want = {"edge", "orders-sidecar", "meshward-authz"}
        # Two decisions (gateway and sidecar): two authz spans.
        authz = [s for s in spans if s["service"] == "meshward-authz"]
        return spans if want <= services and len(authz) >= 2 else None

    spans = eventually(trace, 30, f"the spans of trace {trace_id} in the OTLP receiver")
    by_id = {s["span_id"]: s for s in spans}
    edge_ingress = [s for s in spans if s["service"] == "edge" and s["name"] == "ingress"]
    assert edge_ingress, spans
    # Each authz decision span is the child of an Envoy span (the ext_authz call) of
    # the same trace: the trace runs client -> gateway -> authz -> sidecar -> authz.
    for span in (s for s in spans if s["service"] == "meshward-authz"):
        parent = by_id.get(span["parent_span_id"])
        assert parent is not None, (span, spans)
        assert parent["service"] in ("edge", "orders-sidecar"), parent


def test_policy_edit_on_the_host_is_enforced_within_seconds(mesh: ComposeMesh, bob: str) -> None:
    assert mesh.request("GET", "/orders/42", bob).status == 403
    mesh_yaml = mesh.policies / "mesh.yaml"
    original = mesh_yaml.read_text()
    doc = yaml.safe_load(original)
    doc["bindings"].append(
        {"name": "e2e-bob-reads-orders", "role": "orders-reader", "subjects": ["bob"]}
    )
    edited = yaml.safe_dump(doc, sort_keys=False)

    def status_is(want: int) -> Callable[[], Response | None]:
        def probe() -> Response | None:
            resp = mesh.request("GET", "/orders/42", bob)
            return resp if resp.status == want else None

        return probe

    try:
        _write_atomically(mesh_yaml, edited)
        started = time.monotonic()
        resp = eventually(status_is(200), 20, "bob's 200 after the policy edit")
        print(f"policy edit enforced after {time.monotonic() - started:.1f}s")
        assert resp.json()["subject"] == "bob"
    finally:
        _write_atomically(mesh_yaml, original)
    eventually(status_is(403), 20, "bob's 403 again after the edit was reverted")


def _write_atomically(path: Any, text: str) -> None:
    tmp = path.with_name(f".{path.name}.e2e-tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    tmp.replace(path)


def test_one_authz_replica_killed_the_other_decides(mesh: ComposeMesh, alice: str) -> None:
    wait_authz_endpoints(mesh, set(AUTHZ_REPLICAS.values()))
    mesh.project.kill("authz-1")
    try:
        # authz-1's ADS stream ended with it: the xDS server drops its endpoint.
        wait_authz_endpoints(mesh, {AUTHZ_REPLICAS["authz-2"]})
        decisions = []
        for _ in range(10):
            resp = mesh.request("GET", "/orders/42", alice)
            assert resp.status == 200, resp.body
            decisions.append(resp.json()["decision_id"])
        assert all(decisions), decisions
        wait_decided_by(mesh, "authz-2", decisions)
    finally:
        mesh.project.start("authz-1")
        mesh.project.wait_healthy(["authz-1"], timeout=60)
    wait_authz_endpoints(mesh, set(AUTHZ_REPLICAS.values()))
    assert mesh.request("GET", "/orders/42", alice).status == 200


def test_both_authz_replicas_killed_fails_closed(mesh: ComposeMesh, alice: str) -> None:
    assert mesh.request("GET", "/orders/42", alice).status == 200
    mesh.project.kill("authz-1", "authz-2")
    try:
        for _ in range(5):
            resp = mesh.request("GET", "/orders/42", alice)
            # Fail closed: the gateway answers 403 itself; nothing reaches the service.
            assert resp.status == 403, (resp.status, resp.body)
            assert b'"service"' not in resp.body
    finally:
        mesh.project.start("authz-1", "authz-2")
        mesh.project.wait_healthy(["authz-1", "authz-2"], timeout=60)
    wait_authz_endpoints(mesh, set(AUTHZ_REPLICAS.values()))
    eventually(
        lambda: True if mesh.request("GET", "/orders/42", alice).status == 200 else None,
        20,
        "alice's 200 once both replicas are back",
    )
