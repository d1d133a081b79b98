"""The whole local mesh, end to end: `meshward up` → real Envoy → authz → upstream.

One `meshward up` (xDS server, authz, Envoy as real processes) serves every test in
this module; the upstreams and the OTLP receiver run in the test process, so each
test can see exactly what reached a service and which spans authz exported.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from joserfc.jwk import ECKey, RSAKey

from meshward.otlp_receiver import OtlpReceiver
from tests import tokens
from tests.envoy_harness import free_port
from tests.mesh_harness import Mesh, RecordingUpstream, http
from tests.policy_files import new_keys, write_policy

pytestmark = pytest.mark.integration


@dataclass
class Stack:
    mesh: Mesh
    gateway: str
    orders: RecordingUpstream
    catalog: RecordingUpstream
    receiver: OtlpReceiver
    keys: tuple[RSAKey, ECKey]

    @property
    def rsa(self) -> RSAKey:
        return self.keys[0]

    @property
    def ec(self) -> ECKey:
        return self.keys[1]

    def get(
        self,
        path: str,
        token: str | None = None,
        method: str = "GET",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        h = dict(headers or {})
        if token is not None:
            h["authorization"] = f"Bearer {token}"
        r = http(self.gateway + path, method=method, headers=h)
        return r.status, r.headers, r.body


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("mesh")
    keys = new_keys()
    ports = {"orders_port": free_port(), "catalog_port": free_port(), "gateway_port": free_port()}
    policy_dir = write_policy(base / "policies", keys=keys, **ports)
    orders = RecordingUpstream("orders", ports["orders_port"]).start()
    catalog = RecordingUpstream("catalog", ports["catalog_port"]).start()
    receiver = OtlpReceiver()
    receiver.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    mesh = Mesh.start(policy_dir, base / "state", env=env)
    try:
        yield Stack(
            mesh, f"http://127.0.0.1:{ports['gateway_port']}", orders, catalog, receiver, keys
        )
    finally:
        mesh.stop()
        orders.stop()
        catalog.stop()
        receiver.stop()


def test_allowed_subject_reaches_upstream_with_identity_header(stack: Stack) -> None:
    token = tokens.sign(stack.rsa, tokens.claims("alice"))
    before = len(stack.orders.requests)
    status, _, body = stack.get("/orders/42", token, headers={"x-meshward-subject": "mallory"})
    assert status == 200, body
    assert json.loads(body) == {"service": "orders", "path": "/orders/42"}
    seen = stack.orders.requests[before:]
    assert len(seen) == 1
    # authz overwrites a client-supplied identity header: the upstream can trust it.
    assert seen[0].headers["x-meshward-subject"] == "alice"


def test_es256_token_and_group_binding(stack: Stack) -> None:
    token = tokens.sign(stack.ec, tokens.claims("carol", groups=("customers",)))
    status, _, body = stack.get("/catalog/items", token)
    assert status == 200, body
    assert stack.catalog.requests[-1].headers["x-meshward-subject"] == "carol"


def test_subject_without_role_is_forbidden_and_never_reaches_upstream(stack: Stack) -> None:
    before = len(stack.orders.requests)
    token = tokens.sign(stack.rsa, tokens.claims("bob", groups=("customers",)))
    status, headers, body = stack.get("/orders/42", token)
    assert status == 403
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert set(doc) == {"decision", "reason", "decision_id"}
    assert doc["decision"] == "deny" and doc["reason"] == "forbidden"
    # alice may GET orders; her role does not grant POST (which the route does match).
    alice = tokens.sign(stack.rsa, tokens.claims("alice"))
    status, _, _ = stack.get("/orders/42", alice, method="POST")
    assert status == 403
    assert len(stack.orders.requests) == before


@pytest.mark.parametrize(
    "case", ["missing", "expired", "other-key", "alg-none", "garbage", "wrong-audience"]
)
def test_unauthenticated_requests_get_401(stack: Stack, case: str) -> None:
    before = len(stack.orders.requests)
    other_rsa, _ = new_keys()
    token = {
        "missing": None,
        "expired": tokens.sign(stack.rsa, tokens.claims("alice", ttl=-120)),
        "other-key": tokens.sign(other_rsa, tokens.claims("alice")),
        "alg-none": tokens.unsigned(tokens.claims("alice"), kid=stack.rsa.kid),
        "garbage": "not.a.jwt",
        "wrong-audience": tokens.sign(stack.rsa, tokens.claims("alice", aud="someone-else")),
    }[case]
    status, headers, body = stack.get("/orders/42", token)
    assert status == 401, body
    challenge = headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="meshward"')
    if case != "missing":
        assert 'error="invalid_token"' in challenge
    doc = json.loads(body)
    assert doc["decision"] == "deny" and doc["reason"] and doc["decision_id"]
    assert "Traceback" not in body.decode()
    assert len(stack.orders.requests) == before


def test_unknown_route_never_reaches_an_upstream(stack: Stack) -> None:
    before = (len(stack.orders.requests), len(stack.catalog.requests))
    token = tokens.sign(stack.rsa, tokens.claims("alice"))
    for path in ("/admin", "/", "/ordersx/../catalog"):
        status, _, _ = stack.get(path, token)
        assert status in (403, 404), (path, status)
    # A method the route does not match is an unknown route too.
    status, _, _ = stack.get("/orders/1", token, method="PUT")
    assert status in (403, 404)
    assert (len(stack.orders.requests), len(stack.catalog.requests)) == before


def test_each_decision_is_one_span_child_of_the_request_traceparent(stack: Stack) -> None:
    trace_id = secrets.token_hex(16)
    parent_id = secrets.token_hex(8)
    token = tokens.sign(stack.rsa, tokens.claims("alice"))
    status, _, _ = stack.get(
        "/orders/7", token, headers={"traceparent": f"00-{trace_id}-{parent_id}-01"}
    )
    assert status == 200
    spans = stack.receiver.wait_for(lambda s: s.trace_id == trace_id, timeout=15)
    assert len(spans) == 1, spans
    span = spans[0]
    assert span.parent_span_id == parent_id
    assert span.service == "meshward-authz"
    attrs = span.attributes
    assert attrs["meshward.decision"] == "allow"
    assert attrs["meshward.reason"] == "allowed"
    assert attrs["meshward.subject"] == "alice"
    assert attrs["meshward.route"] == "orders-api"
    assert attrs["meshward.service"] == "orders"
    policy_version = stack.mesh.banner_value(r"meshward is up: policy (\w+)")
    assert attrs["meshward.policy_version"] == policy_version
    # No credential material in spans.
    assert token not in json.dumps(attrs)

    # A denied decision is traced too, with its reason.
    trace_id2 = secrets.token_hex(16)
    status, _, body = stack.get(
        "/orders/7", None, headers={"traceparent": f"00-{trace_id2}-{parent_id}-01"}
    )
    assert status == 401
    denied = stack.receiver.wait_for(lambda s: s.trace_id == trace_id2, timeout=15)
    assert len(denied) == 1
    assert denied[0].attributes["meshward.decision"] == "deny"
    assert denied[0].attributes["meshward.reason"] == json.loads(body)["reason"]
    assert denied[0].attributes["meshward.decision_id"] == json.loads(body)["decision_id"]


def test_decisions_are_streamed_one_line_each(stack: Stack) -> None:
    token = tokens.sign(stack.rsa, tokens.claims("dave-" + secrets.token_hex(3)))
    subject = tokens_subject(token)
    stack.get("/orders/1", token)
    line = stack.mesh.wait_line(lambda s: f"subject={subject}" in s, timeout=10)
    assert line is not None and line.startswith("DENY")
    assert "reason=forbidden" in line


def tokens_subject(token: str) -> str:
    import base64

    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"])


def test_banner_prints_gateway_url_and_curl_commands(stack: Stack) -> None:
    text = "\n".join(stack.mesh.lines)
    assert re.search(r"gateway edge\s+http://127\.0\.0\.1:\d+", text)
    assert "Decisions (Ctrl-C stops everything):" in text


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    """A second, short-lived mesh: after SIGINT no process it started is left."""
    keys = new_keys()
    gw = free_port()
    policy_dir = write_policy(
        tmp_path / "policies",
        keys=keys,
        gateway_port=gw,
        orders_port=free_port(),
        catalog_port=free_port(),
    )
    mesh = Mesh.start(policy_dir, tmp_path / "state")
    admin = int(mesh.banner_value(r"Envoy admin http://127\.0\.0\.1:(\d+)"))
    children = _children_of(mesh.process.pid)
    assert len(children) >= 3, children  # authz, xds, envoy
    assert mesh.stop() == 0
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid), f"pid {pid} still runs"
    for port in (gw, admin):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()  # noqa: SIM115
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _is_zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
