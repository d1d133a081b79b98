"""The fast serving engine (:mod:`authz.engine_fast`) over real gRPC, and the engine choice.

Behaviour both engines must share (health, size limit, undecodable requests,
concurrency, mTLS peer checks and certificate rotation) runs on both through the
``authz_engine`` fixture; what only the fast engine does (its loop under deadlines and
stop, its private-API guard) runs on a :class:`~authz.engine_fast.FastServer` built by
:func:`authz.server.new_fast_check_server`, exactly as :class:`AuthzService` builds it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest
from cryptography import x509
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from authz import engine_fast, reasons
from authz.server import (
    CHECK_METHOD,
    MAX_RECEIVE_MESSAGE_BYTES,
    AuthzService,
    EngineUnavailableError,
    new_fast_check_server,
)
from authz.transport import ServerTls, TlsMaterial
from meshward.pki import CertificateAuthority
from tests import authz_helpers as testing
from tests.mtls_harness import TlsRelay

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
#: A channel with subchannels of its own (never one in another test's back-off).
LOCAL = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture(scope="module")
def key() -> testing.SigningKey:
    return testing.ec_key("engine-key")


def bearer(key: testing.SigningKey, subject: str, groups: list[str]) -> dict[str, str]:
    return {"authorization": f"Bearer {key.sign(testing.claims(subject, groups))}"}


def new_service(policy: Any, engine: str, **kwargs: Any) -> AuthzService:
    return AuthzService(
        policy,
        TracerProvider().get_tracer("engine-test"),
        workers=2,
        registry=CollectorRegistry(),
        engine=engine,
        **kwargs,
    )


@pytest.fixture
def service(key: testing.SigningKey, authz_engine: str) -> Iterator[AuthzService]:
    running = new_service(testing.demo_policy(testing.jwks(key)), authz_engine)
    running.start()
    yield running
    running.stop(1)


def raw_check(channel: grpc.Channel) -> Any:
    """``Authorization/Check`` taking request bytes as they are."""
    return channel.unary_unary(
        CHECK_METHOD,
        request_serializer=lambda data: data,
        response_deserializer=external_auth_pb2.CheckResponse.FromString,
    )


# -- behaviour shared by both engines --------------------------------------------------


def test_health_check_and_watch_follow_policy_and_stop(
    key: testing.SigningKey, authz_engine: str
) -> None:
    service = new_service(None, authz_engine)  # no policy yet: NOT_SERVING
    port = service.start()
    stopped = False
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=LOCAL)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        overall = health_pb2.HealthCheckRequest(service="")
        assert health.Check(overall, timeout=5).status == NOT_SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        watch = health.Watch(overall, timeout=30)
        other = health.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
        assert next(watch).status == NOT_SERVING
        assert next(other).status == SERVICE_UNKNOWN
        # A client cancel: the server must drop the stream quietly, and a status change
        # racing the cancel's close callback must not deadlock (it did on stock with
        # grpc_health's non-blocking mode).
        other.cancel()

        service.set_policy(testing.demo_policy(testing.jwks(key)))
        assert next(watch).status == SERVING
        assert health.Check(overall, timeout=5).status == SERVING

        # The stock server cancels an open Watch only when the grace period ends; the
        # fast one ends it (after NOT_SERVING) as soon as the stop begins.
        began = time.monotonic()
        service.stop(5 if authz_engine == "fast" else 1)
        took = time.monotonic() - began
        stopped = True
        rest: list[int] = []
        with pytest.raises(grpc.RpcError) as ended:
            for reply in watch:
                rest.append(reply.status)
        assert rest == [NOT_SERVING]
        assert ended.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        if authz_engine == "fast":
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert ended.value.details() == "server stopping"
            assert took < 3
    finally:
        channel.close()
        if not stopped:
            service.stop(0)


def test_other_methods_are_unimplemented(service: AuthzService) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}", options=LOCAL) as channel:
        for method in (
            "/envoy.service.auth.v3.Authorization/Nope",
            "/grpc.health.v1.Health/List",
            "/some.Other/Check",
        ):
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(method)(b"", timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
        check = raw_check(channel)
        assert check(testing.check_request().SerializeToString(), timeout=5).status.code == 16


def test_oversize_rejected_and_undecodable_denied(service: AuthzService) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}", options=LOCAL) as channel:
        check = raw_check(channel)
        with pytest.raises(grpc.RpcError) as caught:
            check(b"\x00" * (MAX_RECEIVE_MESSAGE_BYTES + 1), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Just under the limit, not a CheckRequest: a deny with a reason, not an error.
        big_junk = b"\xff" * (MAX_RECEIVE_MESSAGE_BYTES - 64)
        for junk in (b"\xff\xff\xff\xff not a protobuf", big_junk):
            response = check(junk, timeout=10)
            assert response.status.code == 7
            assert json.loads(response.denied_response.body)["reason"] == (
                reasons.MALFORMED_REQUEST
            )
        assert check(testing.check_request().SerializeToString(), timeout=5).status.code == 16


def test_concurrent_checks_from_several_channels_all_answered_correctly(
    service: AuthzService, key: testing.SigningKey
) -> None:
    """Every call gets its own decision (allow for staff, deny otherwise), never another
    call's: the decision id in each response is unique and the subject header matches."""
    channels = [grpc.insecure_channel(f"127.0.0.1:{service.port}", options=LOCAL) for _ in range(4)]
    stubs = [external_auth_pb2_grpc.AuthorizationStub(c) for c in channels]
    jobs = [
        (i, f"user{i}", ["staff"] if i % 3 else ["customers"], stubs[i % len(stubs)])
        for i in range(240)
    ]

    def call(job: tuple[int, str, list[str], Any]) -> tuple[int, str, str]:
        _, subject, groups, stub = job
        message = testing.check_request("GET", "/orders/1", bearer(key, subject, groups))
        response = stub.Check(message, timeout=20)
        if response.status.code == 0:
            headers = {h.header.key: h.header.value for h in response.ok_response.headers}
            return 0, headers["x-meshward-subject"], headers["x-meshward-decision-id"]
        body = json.loads(response.denied_response.body)
        return response.status.code, body["reason"], body["decision_id"]

    try:
        with futures.ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(call, jobs))
    finally:
        for channel in channels:
            channel.close()
    for (i, subject, _, _), (code, what, _) in zip(jobs, results, strict=True):
        if i % 3:
            assert (code, what) == (0, subject)
        else:
            assert (code, what) == (7, reasons.FORBIDDEN)
    assert len({decision_id for _, _, decision_id in results}) == len(jobs)


# -- mTLS: the same credentials and peer checks on both engines ------------------------

AUTHZ_ID = testing.spiffe("meshward-authz")


@pytest.fixture(scope="module")
def cas() -> tuple[CertificateAuthority, CertificateAuthority]:
    """The mesh CA (``meshward.local``) and a foreign one (``other.example``)."""
    return (
        CertificateAuthority.generate(testing.DEMO_TRUST_DOMAIN),
        CertificateAuthority.generate("other.example"),
    )


def served_serial(relay: TlsRelay) -> int:
    """The serial of the certificate authz presents on a new handshake."""
    with (
        socket.create_connection(("127.0.0.1", relay.target_port), timeout=5) as raw,
        relay.context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_mtls_peer_checks_and_rotation(
    cas: tuple[CertificateAuthority, CertificateAuthority],
    key: testing.SigningKey,
    authz_engine: str,
) -> None:
    mesh, foreign = cas
    # authz trusts both CAs' certificates, but only the mesh's trust domain is a peer.
    bundle = mesh.bundle_pem + foreign.bundle_pem
    first = mesh.issue_svid(AUTHZ_ID)
    tls = ServerTls(TlsMaterial.parse(first.chain_pem, first.key_pem, bundle))
    service = new_service(testing.demo_policy(testing.jwks(key)), authz_engine, tls=tls)
    port = service.start()
    edge = mesh.issue_svid(testing.spiffe("edge"))
    stranger = foreign.issue_svid("spiffe://other.example/ns/default/sa/edge")
    relays = [
        TlsRelay(port, mesh.bundle_pem, (edge.chain_pem, edge.key_pem)),
        TlsRelay(port, mesh.bundle_pem, (stranger.chain_pem, stranger.key_pem)),
    ]
    trusted, untrusted = relays
    alice = testing.check_request("DELETE", "/orders/1", bearer(key, "alice", []))
    try:
        with grpc.insecure_channel(trusted.address, options=LOCAL) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            assert stub.Check(alice, timeout=5).status.code == 0
        with grpc.insecure_channel(untrusted.address, options=LOCAL) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Check(alice, timeout=5)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "other.example" in (caught.value.details() or "")
        assert not untrusted.handshake_errors  # refused per call, not at the handshake

        # Rotation: new handshakes get the new certificate, calls keep working.
        assert served_serial(trusted) == first.serial
        second = mesh.issue_svid(AUTHZ_ID)
        service.set_tls(TlsMaterial.parse(second.chain_pem, second.key_pem, bundle))
        assert served_serial(trusted) == second.serial
        assert service.status()["transport"]["serial"] == format(second.serial, "x")
        with grpc.insecure_channel(trusted.address, options=LOCAL) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            assert stub.Check(alice, timeout=5).status.code == 0
    finally:
        for relay in relays:
            relay.close()
        service.stop(1)


# -- the fast engine's loop: deadlines, stop -------------------------------------------


class Recorder:
    """A Check handler recording the paths it decided; ``/slow…`` paths block a while."""

    def __init__(self, delay: float = 0.5) -> None:
        self.paths: list[str] = []
        self.entered = threading.Event()
        self.delay = delay

    def __call__(self, request: Any, context: Any) -> external_auth_pb2.CheckResponse:
        path = request.attributes.request.http.path
        self.paths.append(path)
        if path.startswith("/slow"):
            self.entered.set()
            time.sleep(self.delay)  # blocks the loop: the point of these tests
        response = external_auth_pb2.CheckResponse()
        response.status.code = 0
        return response


class Fast(NamedTuple):
    server: engine_fast.FastServer
    recorder: Recorder
    stub: Any
    port: int


@pytest.fixture
def fast() -> Iterator[Fast]:
    """A FastServer serving :class:`Recorder` as Check (no health), and a stub for it."""
    recorder = Recorder()
    server = new_fast_check_server(recorder)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=LOCAL)
    try:
        yield Fast(server, recorder, external_auth_pb2_grpc.AuthorizationStub(channel), port)
    finally:
        channel.close()
        server.stop(0)


def path_request(path: str) -> external_auth_pb2.CheckRequest:
    return testing.check_request("GET", path)


def test_expired_calls_are_not_decided_and_the_loop_carries_on(fast: Fast) -> None:
    server, recorder, stub, _ = fast
    # Deadline passes while the handler runs: the client gives up, the loop survives.
    late = stub.Check.future(path_request("/slow-late"), timeout=0.2)
    with pytest.raises(grpc.RpcError) as caught:
        late.result()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    # Calls that arrive while the loop is busy and expire before it gets to them.
    recorder.entered.clear()
    slow = stub.Check.future(path_request("/slow"), timeout=10)
    assert recorder.entered.wait(5)
    expired = [stub.Check.future(path_request(f"/expired-{i}"), timeout=0.1) for i in range(5)]
    for call in expired:
        with pytest.raises(grpc.RpcError) as caught:
            call.result()
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert slow.result().status.code == 0
    assert stub.Check(path_request("/after"), timeout=5).status.code == 0
    assert recorder.paths == ["/slow-late", "/slow", "/after"]  # expired: never decided
    assert server.running
    assert server.expired <= 5


def test_graceful_stop_finishes_an_in_flight_check(fast: Fast) -> None:
    server, recorder, stub, _ = fast
    in_flight = stub.Check.future(path_request("/slow"), timeout=10)
    assert recorder.entered.wait(5)
    started = time.monotonic()
    server.stop(5)
    assert time.monotonic() - started < 4  # returned when done, not at the end of grace
    assert not server.running
    assert in_flight.result().status.code == 0  # answered, not cancelled
    with pytest.raises(grpc.RpcError) as caught:
        stub.Check(path_request("/refused"), timeout=2)
    assert caught.value.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
    assert "/refused" not in recorder.paths


def test_stop_cancels_what_is_left_after_the_grace_period(fast: Fast) -> None:
    server, recorder, stub, port = fast
    # A call whose request never arrives (a client stream kept open) stays in flight.
    release = threading.Event()

    def never() -> Iterator[bytes]:
        release.wait(30)
        return
        yield b""  # pragma: no cover

    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=LOCAL)
    try:
        held = channel.stream_unary(CHECK_METHOD).future(never(), timeout=30)
        assert stub.Check(path_request("/ready"), timeout=5).status.code == 0
        time.sleep(0.3)  # the held call has reached the server by now
        started = time.monotonic()
        server.stop(0.5)
        elapsed = time.monotonic() - started
        assert 0.4 <= elapsed < 4
        assert not server.running
        error = held.exception(timeout=10)
        assert isinstance(error, grpc.RpcError)
        assert error.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    finally:
        release.set()
        channel.close()
    assert recorder.paths == ["/ready"]


# -- the guard and the engine choice -----------------------------------------------------


def test_guard_passes_here_and_names_what_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    assert engine_fast.fast_engine_unavailable() is None
    probe = engine_fast._probe.__wrapped__  # uncached: check again now
    assert probe() is None

    wrong = dict(engine_fast._REQUIRED_SIGNATURES)
    wrong["Server.request_call"] = ("self", "queue", "tag")
    monkeypatch.setattr(engine_fast, "_REQUIRED_SIGNATURES", wrong)
    reason = probe()
    assert reason is not None and "Server.request_call" in reason and "grpcio" in reason
    monkeypatch.undo()

    class Stripped:
        """cygrpc without the completion queue."""

        def __getattr__(self, name: str) -> Any:
            if name == "CompletionQueue":
                raise AttributeError(name)
            return getattr(engine_fast._cygrpc_module, name)

    monkeypatch.setattr(engine_fast, "cygrpc", Stripped())
    reason = probe()
    assert reason is not None and "lacks CompletionQueue" in reason
    monkeypatch.undo()

    # A smoke test that fails (the loopback call answers wrongly) is a reason too.
    monkeypatch.setattr(engine_fast, "_smoke_handler", lambda request, context: b"wrong")
    reason = probe()
    assert reason is not None and "wrong response" in reason


def test_auto_falls_back_to_stock_with_one_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, key: testing.SigningKey
) -> None:
    monkeypatch.setattr(
        engine_fast, "fast_engine_unavailable", lambda: "grpcio 0.0: cygrpc lacks everything"
    )
    policy = testing.demo_policy(testing.jwks(key))
    with caplog.at_level(logging.INFO, logger="meshward.authz"):
        service = new_service(policy, "auto")
    assert service.engine == "stock"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "stock" in warnings[0].getMessage()
    assert getattr(warnings[0], "reason", "") == "grpcio 0.0: cygrpc lacks everything"
    port = service.start()
    try:
        assert service.status()["engine"] == "stock"
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=LOCAL) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            assert stub.Check(testing.check_request(), timeout=5).status.code == 16
    finally:
        service.stop(1)

    with pytest.raises(EngineUnavailableError, match="cygrpc lacks everything"):
        new_service(policy, "fast")
    with pytest.raises(ValueError, match="engine must be one of"):
        new_service(policy, "turbo")


# -- `meshward authz --engine` ---------------------------------------------------------


@pytest.fixture
def policy_dir(tmp_path: Path, key: testing.SigningKey) -> Path:
    return testing.demo_policy_dir(tmp_path / "policies", key)


def authz_process(policy_dir: Path, *flags: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.Popen(
        [sys.executable, "-m", "meshward", "authz", "--policy", str(policy_dir),
         "--listen", "127.0.0.1:0", "--status-listen", "127.0.0.1:0", *flags],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def wait_started(proc: Any, timeout: float = 30.0) -> dict[str, Any]:
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:
        for line in proc.stderr:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("msg") == "authz started":
            return dict(record)
    raise AssertionError(f"no 'authz started' line: {''.join(seen)}")


def test_cli_engine_fast(policy_dir: Path, key: testing.SigningKey) -> None:
    proc = authz_process(policy_dir, "--engine", "fast")
    try:
        started = wait_started(proc)
        assert started["engine"] == "fast"
        status_url = f"http://127.0.0.1:{started['status_port']}/status"
        with urllib.request.urlopen(status_url, timeout=5) as reply:
            status = json.loads(reply.read())
        assert (status["engine"], status["workers"], status["serving"]) == ("fast", 1, True)
        alice = testing.check_request("GET", "/orders/1", bearer(key, "alice", []))
        with grpc.insecure_channel(f"127.0.0.1:{started['port']}", options=LOCAL) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            assert stub.Check(alice, timeout=5).status.code == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_cli_engine_from_the_environment(policy_dir: Path) -> None:
    proc = authz_process(policy_dir, env={"MESHWARD_AUTHZ_ENGINE": "stock"})
    try:
        assert wait_started(proc)["engine"] == "stock"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    bad = authz_process(policy_dir, env={"MESHWARD_AUTHZ_ENGINE": "turbo"})
    _, err = bad.communicate(timeout=60)
    assert bad.returncode == 2
    assert "MESHWARD_AUTHZ_ENGINE" in err and "Traceback" not in err
    flag = authz_process(policy_dir, "--engine", "turbo")
    _, err = flag.communicate(timeout=60)
    assert flag.returncode == 2 and "--engine" in err
