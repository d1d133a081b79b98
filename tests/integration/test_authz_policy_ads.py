"""authz gets its policy over ADS: a real ``meshward authz --xds`` process against a
real XdsService (and, for NACK and resume details, a scripted ADS server on real gRPC).

authz also gets its SVID and the trust bundle over the same stream and serves only mTLS,
so the tests call it through :class:`tests.mtls_harness.TlsRelay` with a client SVID of
the mesh CA."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshward.pki import CertificateAuthority, CredentialStore
from meshward.policy import wire
from meshward.policy.model import Binding, Policy
from tests import authz_helpers as testing
from tests.envoy_harness import free_port, http_request
from tests.mtls_harness import TlsRelay
from xds_server import resources as rs
from xds_server.credentials import CredentialSource
from xds_server.service import XdsService
from xds_server.translator import AUTHZ_GROUP, DEFAULT_AUTHZ_ENDPOINTS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

GRPC_OK = 0
GRPC_PERMISSION_DENIED = 7
#: The trust domain of the test policies (the model's default).
TRUST_DOMAIN = "meshward.local"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/edge"


#: A channel of its own subchannels: never one in another channel's reconnect back-off.
_LOCAL_POOL = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(TRUST_DOMAIN)


# ---- policies ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> testing.SigningKey:
    return testing.rsa_key("ads-key")


def policy_a(key: testing.SigningKey) -> Policy:
    """The demo policy: alice runs orders (GET/POST/DELETE /orders), staff read orders."""
    return testing.demo_policy(testing.jwks(key))


def policy_b(key: testing.SigningKey) -> Policy:
    """A without alice's binding: alice may no longer GET /orders; staff still may."""
    a = policy_a(key)
    return Policy.build(
        services=a.services,
        gateways=a.gateways,
        issuers=a.issuers,
        roles=a.roles,
        bindings=tuple(b for b in a.bindings if b.name != "alice-runs-orders"),
    )


def policy_c(key: testing.SigningKey) -> Policy:
    """B plus a binding that lets carol run orders (a third version)."""
    b = policy_b(key)
    return Policy.build(
        services=b.services,
        gateways=b.gateways,
        issuers=b.issuers,
        roles=b.roles,
        bindings=(*b.bindings, Binding("carol-runs-orders", "orders-admin", subjects=("carol",))),
    )


def orders_get(key: testing.SigningKey, subject: str, groups: tuple[str, ...] = ()) -> Any:
    token = key.sign(testing.claims(subject, list(groups)))
    return testing.check_request("GET", "/orders", {"authorization": f"Bearer {token}"})


# ---- processes and loops -------------------------------------------------------------


class AuthzProcess:
    """``python -m meshward authz --xds ...`` with its JSON log lines collected."""

    def __init__(self, xds_port: int, node_id: str, ca: CertificateAuthority, engine: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshward",
                "authz",
                "--xds",
                f"127.0.0.1:{xds_port}",
                "--node-id",
                node_id,
                "--listen",
                "127.0.0.1:0",
                "--status-listen",
                "127.0.0.1:0",
                "--workers",
                "2",
                "--engine",
                engine,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.records: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        started = self.wait_for_log("authz started")
        assert started["engine"] == engine
        self.port = int(started["port"])
        self.status_port = int(started["status_port"])
        client = ca.issue_svid(CLIENT_ID)
        self.relay = TlsRelay(self.port, ca.bundle_pem, (client.chain_pem, client.key_pem))
        self.channel = grpc.insecure_channel(self.relay.address, options=_LOCAL_POOL)
        self.stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            try:
                self.records.put(json.loads(line))
            except ValueError:
                continue

    def wait_for_log(self, msg: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                record = self.records.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if record.get("msg") == msg:
                return record
        raise AssertionError(f"no {msg!r} log line; got:\n{''.join(self.lines)}")

    def check(self, request: Any) -> external_auth_pb2.CheckResponse:
        response: external_auth_pb2.CheckResponse = self.stub.Check(request, timeout=5)
        return response

    def healthz(self) -> int:
        return http_request(self.status_port, "/healthz")[0]

    def status(self) -> dict[str, Any]:
        code, _, body = http_request(self.status_port, "/status")
        assert code == 200
        return dict(json.loads(body))

    def metrics(self) -> str:
        code, _, body = http_request(self.status_port, "/metrics")
        assert code == 200
        return body.decode()

    def grpc_health(self) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(reply.status)

    def reconnect(self) -> None:
        """A new channel (the old one may be in grpcio's reconnect back-off)."""
        self.channel.close()
        self.channel = grpc.insecure_channel(self.relay.address, options=_LOCAL_POOL)
        self.stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.relay.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Loop:
    """An asyncio loop on a thread, for the grpc.aio XdsService beside blocking calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Xds:
    """A real XdsService on ``port`` (0: a free one), run on :class:`Loop`."""

    def __init__(self, loop: Loop, policy: Policy, ca: CertificateAuthority, port: int = 0) -> None:
        self.loop = loop

        async def make() -> XdsService:
            service = XdsService(
                policy,
                DEFAULT_AUTHZ_ENDPOINTS,
                listen=f"127.0.0.1:{port}",
                credentials=CredentialSource(CredentialStore(ca)),
            )
            await service.start()
            return service

        self.service = loop.run(make())
        self.port = self.service.port

    def set_policy(self, policy: Policy) -> None:
        self.loop.run(self.service.set_policy(policy))

    def status(self) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            return self.service.status()

        return self.loop.run(read())

    def authz_node(self, node_id: str) -> dict[str, Any] | None:
        for node in self.status()["nodes"]:
            if node["id"] == node_id:
                return dict(node)
        return None

    def stop(self) -> None:
        self.loop.run(self.service.stop(grace=0))


@pytest.fixture
def loop() -> Iterator[Loop]:
    running = Loop()
    try:
        yield running
    finally:
        running.close()


def eventually(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``predicate`` until it returns something truthy (returned) or time runs out."""
    deadline = time.monotonic() + timeout
    last: T = predicate()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
        last = predicate()
    return last


def deny_reason(response: external_auth_pb2.CheckResponse) -> tuple[int, str]:
    return response.denied_response.status.code, json.loads(response.denied_response.body)["reason"]


# ---- the real xDS server ---------------------------------------------------------------


def test_policy_updates_reach_authz_and_survive_an_xds_restart(
    loop: Loop, key: testing.SigningKey, ca: CertificateAuthority, authz_engine: str
) -> None:
    a, b, c = policy_a(key), policy_b(key), policy_c(key)
    assert len({a.version, b.version, c.version}) == 3
    xds = Xds(loop, a, ca)
    authz = AuthzProcess(xds.port, "authz-it-1", ca, authz_engine)
    try:
        eventually(lambda: authz.healthz() == 200, 20, "/healthz 200 under A")
        alice = orders_get(key, "alice")
        staff = orders_get(key, "sam", ("staff",))
        carol = orders_get(key, "carol")
        assert authz.check(alice).status.code == GRPC_OK

        # B removes alice's permission: the same Check is denied within 1 s.
        xds.set_policy(b)
        changed = time.monotonic()
        eventually(
            lambda: authz.check(alice).status.code == GRPC_PERMISSION_DENIED,
            1.0,
            "alice denied under B",
        )
        assert time.monotonic() - changed < 1.0
        assert deny_reason(authz.check(alice)) == (403, "forbidden")

        # The xDS server saw the authz node ACK B's version (policy + credentials).
        version_b = xds.service.version
        node = eventually(
            lambda: (
                (n := xds.authz_node("authz-it-1"))
                and n["types"]["policy"]["acked"] == version_b
                and n
            ),
            5,
            "the authz node ACKing B",
        )
        assert node["group"] == AUTHZ_GROUP
        assert node["types"]["policy"]["nack_error"] is None
        # The policy version, the authz endpoints (the default one plus this replica,
        # registered by its own stream) and the credential generation.
        assert version_b.startswith(b.version + "-") and "+" in version_b
        [replica] = xds.status()["authz_replicas"]
        assert replica["node"] == "authz-it-1" and replica["ready"] is True
        assert replica["address"] in xds.status()["authz_endpoints"]
        assert node["types"]["sds"]["acked"] is not None

        status = authz.status()
        assert status["source"] == "xds"
        assert status["policy_version"] == b.version
        assert status["serving"] is True
        assert status["xds"]["connected"] is True
        assert status["xds"]["version_info"] == version_b
        assert status["xds"]["spiffe_id"] == f"spiffe://{TRUST_DOMAIN}/ns/default/sa/meshward-authz"
        assert status["transport"]["mtls"] is True
        assert status["xds"]["node_id"] == "authz-it-1"
        metrics = authz.metrics()
        assert f'meshward_authz_policy_info{{version="{b.version}"}} 1.0' in metrics
        assert f'version="{a.version}"' not in metrics
        assert 'meshward_authz_policy_updates_total{result="ack"} 2.0' in metrics
        assert 'meshward_authz_policy_updates_total{result="nack"} 0.0' in metrics
        assert "meshward_authz_xds_connected 1.0" in metrics

        # The xDS server goes away: authz keeps deciding with B.
        xds.stop()
        eventually(lambda: "meshward_authz_xds_connected 0.0" in authz.metrics(), 5, "disconnected")
        assert authz.check(staff).status.code == GRPC_OK
        assert deny_reason(authz.check(alice)) == (403, "forbidden")
        assert authz.healthz() == 200
        down = authz.status()
        assert down["policy_version"] == b.version
        assert down["xds"]["connected"] is False and down["xds"]["last_error"]

        # Back on the same port with C: authz reconnects (back-off ≤ 5 s) and re-syncs.
        xds = Xds(loop, c, ca, port=xds.port)
        eventually(lambda: authz.check(carol).status.code == GRPC_OK, 15, "carol allowed under C")
        node = eventually(
            lambda: (
                (n := xds.authz_node("authz-it-1"))
                and n["types"]["policy"]["acked"] == xds.service.version
                and n
            ),
            5,
            "the authz node ACKing C after the restart",
        )
        assert authz.status()["policy_version"] == c.version
        assert deny_reason(authz.check(alice)) == (403, "forbidden")
        assert authz.check(staff).status.code == GRPC_OK
        assert "meshward_authz_xds_connected 1.0" in authz.metrics()
    finally:
        authz.close()
        xds.stop()


def test_fails_closed_until_the_first_policy_then_connects_and_stops_cleanly(
    loop: Loop, key: testing.SigningKey, ca: CertificateAuthority, authz_engine: str
) -> None:
    port = free_port()  # the xDS server is not up yet
    authz = AuthzProcess(port, "authz-it-2", ca, authz_engine)
    xds: Xds | None = None
    try:
        alice = orders_get(key, "alice")
        # No SVID yet: no TLS handshake completes, so no Check (or health call) does.
        with pytest.raises(grpc.RpcError) as caught:
            authz.check(alice)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError):
            authz.grpc_health()
        assert authz.healthz() == 503
        status = authz.status()
        assert status["policy_version"] is None and status["serving"] is False
        assert status["source"] == "xds" and status["xds"]["connected"] is False
        eventually(lambda: authz.status()["xds"]["last_error"], 5, "a connect error in /status")
        assert "meshward_authz_xds_connected 0.0" in authz.metrics()
        assert status["transport"] == {"mtls": True, "spiffe_id": None, "serial": None}

        # Let the client fail a few times first, so it is in back-off when we start.
        time.sleep(1.0)
        a = policy_a(key)
        xds = Xds(loop, a, ca, port=port)
        eventually(lambda: authz.healthz() == 200, 15, "/healthz 200 once connected")
        authz.reconnect()  # the handshakes before the SVID failed: skip grpcio's back-off
        assert authz.grpc_health() == health_pb2.HealthCheckResponse.SERVING
        assert authz.check(alice).status.code == GRPC_OK
        assert authz.status()["policy_version"] == a.version

        # SIGTERM: the ADS thread stops and the process exits 0.
        authz.proc.send_signal(signal.SIGTERM)
        assert authz.proc.wait(15) == 0
        authz.wait_for_log("authz stopping", timeout=5)
        assert "Traceback" not in "".join(authz.lines)
        # The server sees the stream end.
        eventually(lambda: xds.authz_node("authz-it-2") is None, 5, "the stream closed")  # type: ignore[union-attr]
    finally:
        authz.close()
        if xds is not None:
            xds.stop()


def test_cli_rejects_xds_with_policy_and_node_id_without_xds(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshward", "authz", *args],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    both = run("--xds", "127.0.0.1:1", "--policy", str(tmp_path))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    node = run("--node-id", "x", "--policy", str(tmp_path))
    assert node.returncode == 2 and "--node-id only applies with --xds" in node.stderr
    bad = run("--xds", "nowhere")
    assert bad.returncode == 2 and "--xds" in bad.stderr and "Traceback" not in bad.stderr


# ---- a scripted ADS server: NACK and resume details -------------------------------------


class ScriptedStream:
    def __init__(self) -> None:
        self.requests: queue.Queue[discovery_pb2.DiscoveryRequest] = queue.Queue()
        self.responses: queue.Queue[discovery_pb2.DiscoveryResponse | None] = queue.Queue()

    def next_request(self, timeout: float = 10.0) -> discovery_pb2.DiscoveryRequest:
        return self.requests.get(timeout=timeout)


class ScriptedAds:
    """A real gRPC ADS endpoint whose responses the test writes by hand."""

    def __init__(self) -> None:
        self.streams: queue.Queue[ScriptedStream] = queue.Queue()
        self.opened: list[ScriptedStream] = []
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        handler = grpc.stream_stream_rpc_method_handler(
            self._stream,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "envoy.service.discovery.v3.AggregatedDiscoveryService",
                    {"StreamAggregatedResources": handler},
                ),
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _stream(
        self, requests: Iterator[discovery_pb2.DiscoveryRequest], context: Any
    ) -> Iterator[discovery_pb2.DiscoveryResponse]:
        stream = ScriptedStream()
        self.opened.append(stream)
        self.streams.put(stream)

        def pump() -> None:
            try:
                for request in requests:
                    stream.requests.put(request)
            except grpc.RpcError:
                return  # the client went away or the server stopped

        threading.Thread(target=pump, daemon=True).start()
        while True:
            response = stream.responses.get()
            if response is None:
                return
            yield response

    def next_stream(self, timeout: float = 15.0) -> ScriptedStream:
        return self.streams.get(timeout=timeout)

    def stop(self) -> None:
        for stream in self.opened:  # release handler threads blocked on the script
            stream.responses.put(None)
        self.server.stop(0).wait(5)


def secret_response(
    bundle: bytes, svid: tuple[bytes, bytes] | None, version: str, nonce: str
) -> discovery_pb2.DiscoveryResponse:
    """An SDS response with ``trust-bundle`` and (unless ``None``) ``svid``."""
    response = discovery_pb2.DiscoveryResponse(
        version_info=version, type_url=rs.SECRET, nonce=nonce
    )
    if svid is not None:
        response.resources.append(
            rs.pack(
                secret_pb2.Secret(
                    name="svid",
                    tls_certificate=common_pb2.TlsCertificate(
                        certificate_chain=base_pb2.DataSource(inline_bytes=svid[0]),
                        private_key=base_pb2.DataSource(inline_bytes=svid[1]),
                    ),
                )
            )
        )
    response.resources.append(
        rs.pack(
            secret_pb2.Secret(
                name="trust-bundle",
                validation_context=common_pb2.CertificateValidationContext(
                    trusted_ca=base_pb2.DataSource(inline_bytes=bundle)
                ),
            )
        )
    )
    return response


def policy_response(resource: Any, version: str, nonce: str) -> discovery_pb2.DiscoveryResponse:
    response = discovery_pb2.DiscoveryResponse(
        version_info=version, type_url=rs.POLICY, nonce=nonce
    )
    response.resources.append(rs.pack(resource))
    return response


def test_bad_policy_is_nacked_and_the_stream_resumes_from_the_applied_version(
    key: testing.SigningKey, ca: CertificateAuthority, authz_engine: str
) -> None:
    ads = ScriptedAds()
    authz: AuthzProcess | None = None
    try:
        authz = AuthzProcess(ads.port, "authz-it-3", ca, authz_engine)
        stream = ads.next_stream()
        first = stream.next_request()
        assert first.type_url == rs.POLICY
        assert (first.version_info, first.response_nonce, list(first.resource_names)) == (
            "",
            "",
            [],
        )
        assert first.node.id == "authz-it-3" and first.node.cluster == AUTHZ_GROUP
        listen = first.node.metadata.fields["meshward.authz.listen"].string_value
        assert listen == f"127.0.0.1:{authz.port}"
        # Then the SVID and the trust bundle, by name, on the same stream.
        secrets = stream.next_request()
        assert secrets.type_url == rs.SECRET
        assert list(secrets.resource_names) == ["svid", "trust-bundle"]
        assert (secrets.version_info, secrets.response_nonce) == ("", "")

        # Only the bundle: NACKed (no certificate to serve yet).
        svid = ca.issue_svid(f"spiffe://{TRUST_DOMAIN}/ns/default/sa/meshward-authz")
        stream.responses.put(secret_response(ca.bundle_pem, None, "s0", "sn0"))
        nack = stream.next_request()
        assert (nack.type_url, nack.version_info, nack.response_nonce) == (rs.SECRET, "", "sn0")
        assert "missing secret(s) svid" in nack.error_detail.message
        stream.responses.put(
            secret_response(ca.bundle_pem, (svid.chain_pem, svid.key_pem), "s1", "sn1")
        )
        ack = stream.next_request()
        assert (ack.type_url, ack.version_info, ack.response_nonce) == (rs.SECRET, "s1", "sn1")
        assert not ack.HasField("error_detail")
        assert authz.healthz() == 503  # a certificate but no policy yet: still fail closed

        a = policy_a(key)
        stream.responses.put(policy_response(wire.to_resource(a), "v1", "n1"))
        ack = stream.next_request()
        assert (ack.version_info, ack.response_nonce) == ("v1", "n1")
        assert not ack.HasField("error_detail")
        assert authz.check(orders_get(key, "alice")).status.code == GRPC_OK
        assert authz.healthz() == 200

        # Content that does not hash to its version: NACK, A keeps serving.
        b = policy_b(key)
        forged = wire.PolicyResource(version=a.version, policy_json=b.canonical_json())
        stream.responses.put(policy_response(forged, "v2", "n2"))
        nack = stream.next_request()
        assert (nack.version_info, nack.response_nonce) == ("v1", "n2")
        assert nack.HasField("error_detail")
        assert "version mismatch" in nack.error_detail.message
        assert authz.check(orders_get(key, "alice")).status.code == GRPC_OK
        status = authz.status()
        assert status["policy_version"] == a.version
        assert status["xds"]["version_info"] == "v1"
        assert "version mismatch" in status["xds"]["last_error"]
        metrics = authz.metrics()
        assert 'meshward_authz_policy_updates_total{result="nack"} 1.0' in metrics
        assert 'meshward_authz_policy_updates_total{result="ack"} 1.0' in metrics

        # Two resources in one response: NACK too.
        two = policy_response(wire.to_resource(b), "v3", "n3")
        two.resources.append(rs.pack(wire.to_resource(a)))
        stream.responses.put(two)
        nack = stream.next_request()
        assert (nack.version_info, nack.response_nonce) == ("v1", "n3")
        assert "exactly one" in nack.error_detail.message

        # The server ends the stream: the client comes back with what it applied, no nonce.
        stream.responses.put(None)
        again = ads.next_stream()
        resume = again.next_request()
        assert (resume.version_info, resume.response_nonce) == ("v1", "")
        assert resume.node.id == "authz-it-3" and resume.type_url == rs.POLICY
        resume_secrets = again.next_request()
        assert resume_secrets.type_url == rs.SECRET
        assert (resume_secrets.version_info, resume_secrets.response_nonce) == ("s1", "")
        # Full state again at the same policy version: ACKed without a change.
        again.responses.put(policy_response(wire.to_resource(a), "v1", "n1"))
        ack = again.next_request()
        assert (ack.version_info, ack.response_nonce) == ("v1", "n1")
        # Then B for real.
        again.responses.put(policy_response(wire.to_resource(b), "v4", "n2"))
        ack = again.next_request()
        assert (ack.version_info, ack.response_nonce, ack.HasField("error_detail")) == (
            "v4",
            "n2",
            False,
        )
        assert authz.check(orders_get(key, "alice")).status.code == GRPC_PERMISSION_DENIED
        assert authz.status()["policy_version"] == b.version
    finally:
        if authz is not None:
            authz.close()
        ads.stop()
