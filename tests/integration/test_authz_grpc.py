"""The real AuthzService over real gRPC, exporting spans to a real OTLP/gRPC receiver."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from authz import reasons
from authz.server import SERVICE_NAME, AuthzService
from authz.tracing import SPAN_NAME, setup_tracer_provider
from meshward.policy.model import Binding
from tests import authz_helpers as testing

pytestmark = pytest.mark.integration

META_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
META_SPAN = "00f067aa0ba902b7"
HEADER_TRACE = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
HEADER_SPAN = "bbbbbbbbbbbbbbbb"


@dataclass
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any] = field(default_factory=dict)


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """A minimal OTLP/gRPC trace collector keeping what it receives."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.arrived = threading.Condition()

    def Export(  # noqa: N802 - the gRPC method name
        self, request: Any, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.arrived:
            for resource_spans in request.resource_spans:
                resource = {
                    kv.key: kv.value.string_value for kv in resource_spans.resource.attributes
                }
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            ReceivedSpan(
                                service=resource.get("service.name", ""),
                                name=span.name,
                                trace_id=span.trace_id.hex(),
                                parent_span_id=span.parent_span_id.hex(),
                                kind=span.kind,
                                attributes={kv.key: _any_value(kv.value) for kv in span.attributes},
                            )
                        )
            self.arrived.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, decision_id: str, timeout: float = 10.0) -> ReceivedSpan:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                for span in self.spans:
                    if span.attributes.get("meshward.decision_id") == decision_id:
                        return span
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"span {decision_id} never arrived: {self.spans}")
                self.arrived.wait(remaining)


def _any_value(value: Any) -> Any:
    which = value.WhichOneof("value")
    return getattr(value, which) if which else None


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[OtlpReceiver, int]]:
    servicer = OtlpReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0).wait()


@pytest.fixture(scope="module")
def key() -> testing.SigningKey:
    return testing.ec_key("ec-it")


@dataclass
class Running:
    service: AuthzService
    stub: Any
    channel: grpc.Channel
    memory: InMemorySpanExporter
    provider: TracerProvider
    receiver: OtlpReceiver


@pytest.fixture(scope="module")
def running(
    receiver: tuple[OtlpReceiver, int], key: testing.SigningKey, authz_engine: str
) -> Iterator[Running]:
    servicer, otlp_port = receiver
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
        patch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{otlp_port}")
        provider = setup_tracer_provider("meshward-authz-it")
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    service = AuthzService(
        testing.demo_policy(testing.jwks(key)),
        provider.get_tracer("meshward.authz"),
        workers=2,
        registry=CollectorRegistry(),
        engine=authz_engine,
    )
    assert service.engine == authz_engine
    port = service.start()
    assert service.status()["engine"] == authz_engine
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    yield Running(service, stub, channel, memory, provider, servicer)
    channel.close()
    service.stop(1)
    provider.shutdown()


def bearer(key: testing.SigningKey, subject: str, groups: list[str]) -> str:
    return f"Bearer {key.sign(testing.claims(subject, groups))}"


def test_health_is_serving(running: Running) -> None:
    health = health_pb2_grpc.HealthStub(running.channel)
    for name in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_decisions_and_one_span_each_with_the_right_parent(
    running: Running, key: testing.SigningKey
) -> None:
    running.memory.clear()
    metadata = (("traceparent", f"00-{META_TRACE}-{META_SPAN}-01"), ("tracestate", ""))
    header_tp = f"00-{HEADER_TRACE}-{HEADER_SPAN}-01"
    cases = [
        # (method, path, authorization, route, metadata?, expected grpc code, http, reason)
        ("POST", "/orders", bearer(key, "alice", []), "orders-api", True, 0, 200, "allowed"),
        ("GET", "/orders/1", bearer(key, "bob", ["customers"]), "orders-api", True, 7, 403,
         "forbidden"),
        ("GET", "/orders", None, "orders-api", False, 16, 401, "missing_token"),
        ("GET", "/x", bearer(key, "alice", []), None, False, 7, 403, "no_route"),
        ("GET", "/orders", "Bearer junk", "orders-api", True, 16, 401, "invalid_token"),
    ]  # fmt: skip
    expected_parents = []
    for method, path, authorization, route, with_metadata, code, http, reason in cases:
        headers = {"traceparent": header_tp, "x-request-id": f"rid-{reason}"}
        if authorization:
            headers["authorization"] = authorization
        message = testing.check_request(method, path, headers, route=route)
        response = running.stub.Check(
            message, metadata=metadata if with_metadata else None, timeout=5
        )
        assert response.status.code == code, reason
        if code == 0:
            values = {h.header.key: h.header.value for h in response.ok_response.headers}
            assert values["x-meshward-subject"] == "alice"
        else:
            assert response.denied_response.status.code == http
            assert json.loads(response.denied_response.body)["reason"] == reason
        expected_parents.append(
            (META_TRACE, META_SPAN) if with_metadata else (HEADER_TRACE, HEADER_SPAN)
        )

    spans = running.memory.get_finished_spans()
    assert len(spans) == len(cases)  # exactly one span per Check
    by_request = {dict(s.attributes or {})["meshward.request_id"]: s for s in spans}
    for (_, _, _, _, _, _, _, reason), (trace_id, span_id) in zip(
        cases, expected_parents, strict=True
    ):
        span = by_request[f"rid-{reason}"]
        assert span.name == SPAN_NAME
        assert span.parent is not None
        assert (format(span.context.trace_id, "032x"), format(span.parent.span_id, "016x")) == (
            trace_id,
            span_id,
        )
        assert dict(span.attributes or {})["meshward.reason"] == reason


def test_span_arrives_over_otlp_with_attributes(running: Running, key: testing.SigningKey) -> None:
    message = testing.check_request(
        "DELETE", "/orders/3", {"authorization": bearer(key, "alice", []), "x-request-id": "otlp-1"}
    )
    metadata = (("traceparent", f"00-{META_TRACE}-{META_SPAN}-01"),)
    response = running.stub.Check(message, metadata=metadata, timeout=5)
    decision_id = {h.header.key: h.header.value for h in response.ok_response.headers}[
        "x-meshward-decision-id"
    ]
    assert running.provider.force_flush(10_000)
    span = running.receiver.wait_for(decision_id)
    assert span.service == "meshward-authz-it"
    assert span.name == SPAN_NAME
    assert span.kind == 2  # SPAN_KIND_SERVER
    assert (span.trace_id, span.parent_span_id) == (META_TRACE, META_SPAN)
    assert {
        k: span.attributes[k]
        for k in (
            "meshward.decision",
            "meshward.reason",
            "meshward.subject",
            "meshward.auth_method",
            "meshward.route",
            "meshward.service",
            "meshward.gateway",
            "meshward.policy_version",
            "http.request.method",
            "url.path",
            "meshward.request_id",
        )
    } == {
        "meshward.decision": "allow",
        "meshward.reason": "allowed",
        "meshward.subject": "alice",
        "meshward.auth_method": "jwt",
        "meshward.route": "orders-api",
        "meshward.service": "orders",
        "meshward.gateway": "edge",
        "meshward.policy_version": running.service.policy_version,
        "http.request.method": "DELETE",
        "url.path": "/orders/3",
        "meshward.request_id": "otlp-1",
    }


def test_undecodable_request_gets_a_deny_not_an_error(running: Running) -> None:
    raw = running.channel.unary_unary(
        f"/{SERVICE_NAME}/Check",
        request_serializer=lambda b: b,
        response_deserializer=external_auth_pb2.CheckResponse.FromString,
    )
    response = raw(b"\xff\xff\xff\xff not a protobuf", timeout=5)
    assert response.status.code == 7
    assert json.loads(response.denied_response.body)["reason"] == reasons.MALFORMED_REQUEST


def test_set_policy_swaps_live_and_metrics_follow(
    running: Running, key: testing.SigningKey
) -> None:
    service = running.service
    old_version = service.policy_version
    message = testing.check_request(
        "GET", "/orders", {"authorization": bearer(key, "dave", ["auditors"])}
    )
    assert running.stub.Check(message, timeout=5).status.code == 7

    base = testing.demo_policy(testing.jwks(key))
    grant = Binding("auditors-read-orders", "orders-reader", groups=("auditors",))
    widened = type(base).build(
        services=base.services,
        gateways=base.gateways,
        issuers=base.issuers,
        roles=base.roles,
        bindings=(*base.bindings, grant),
    )
    service.set_policy(widened)
    try:
        assert service.policy_version == widened.version != old_version
        assert running.stub.Check(message, timeout=5).status.code == 0
        registry = service.registry
        assert (
            registry.get_sample_value("meshward_authz_policy_info", {"version": widened.version})
            == 1.0
        )
        assert (
            registry.get_sample_value("meshward_authz_policy_info", {"version": old_version})
            is None
        )
    finally:
        service.set_policy(base)
    assert running.stub.Check(message, timeout=5).status.code == 7


def test_metrics_count_decisions(running: Running, key: testing.SigningKey) -> None:
    registry = running.service.registry

    def count(decision: str, reason: str) -> float:
        value = registry.get_sample_value(
            "meshward_authz_decisions_total", {"decision": decision, "reason": reason}
        )
        return value or 0.0

    allowed, missing = count("allow", "allowed"), count("deny", "missing_token")
    latency = registry.get_sample_value("meshward_authz_check_duration_seconds_count") or 0.0
    ok = testing.check_request("GET", "/catalog", {"authorization": bearer(key, "c", ["staff"])},
                               route="catalog-api", service="catalog")  # fmt: skip
    for _ in range(3):
        assert running.stub.Check(ok, timeout=5).status.code == 0
    assert running.stub.Check(testing.check_request(), timeout=5).status.code == 16
    assert count("allow", "allowed") == allowed + 3
    assert count("deny", "missing_token") == missing + 1
    assert registry.get_sample_value("meshward_authz_check_duration_seconds_count") == latency + 4


def test_concurrent_checks_all_answered(running: Running, key: testing.SigningKey) -> None:
    tokens = [bearer(key, f"user{i}", ["staff"]) for i in range(8)]
    messages = [testing.check_request("GET", "/orders", {"authorization": t}) for t in tokens * 10]
    with futures.ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(lambda m: running.stub.Check(m, timeout=10).status.code, messages))
    assert codes == [0] * len(messages)


def test_stop_then_port_refuses(authz_engine: str) -> None:
    key = testing.rsa_key()
    service = AuthzService(
        testing.demo_policy(testing.jwks(key)),
        TracerProvider().get_tracer("t"),
        workers=1,
        engine=authz_engine,
    )
    port = service.start()
    assert service.serving()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    service.stop(1)
    assert not service.serving()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Check(testing.check_request(), timeout=2)
        assert caught.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )


def test_mtls_principal_over_grpc(running: Running, key: testing.SigningKey) -> None:
    service = running.service
    base = testing.demo_policy(testing.jwks(key))
    service.set_policy(testing.workload_policy(testing.jwks(key)))
    orders = testing.spiffe("orders")
    try:
        running.memory.clear()
        allowed = running.stub.Check(
            testing.check_request(
                "GET", "/catalog/items", {"x-meshward-workload": "spiffe://meshward.local/x"},
                route="catalog-api", service="catalog", principal=orders,
            ),
            timeout=5,
        )  # fmt: skip
        assert allowed.status.code == 0
        values = {h.header.key: h.header.value for h in allowed.ok_response.headers}
        assert values["x-meshward-workload"] == values["x-meshward-subject"] == orders
        untrusted = running.stub.Check(
            testing.check_request(
                "GET", "/catalog/items", route="catalog-api", service="catalog",
                principal="spiffe://example.org/ns/default/sa/orders",
            ),
            timeout=5,
        )  # fmt: skip
        assert untrusted.status.code == 7
        assert untrusted.denied_response.status.code == 403
        assert json.loads(untrusted.denied_response.body)["reason"] == "untrusted_workload"
        no_token = running.stub.Check(
            testing.check_request("DELETE", "/orders/1", principal=orders), timeout=5
        )
        assert no_token.status.code == 16
        assert json.loads(no_token.denied_response.body)["reason"] == "missing_token"
        spans = [dict(s.attributes or {}) for s in running.memory.get_finished_spans()]
        assert [(s["meshward.reason"], s.get("meshward.workload"), s["meshward.auth_method"])
                for s in spans] == [
            ("allowed", orders, "mtls"),
            ("untrusted_workload", "spiffe://example.org/ns/default/sa/orders", "mtls"),
            ("missing_token", orders, "mtls"),
        ]  # fmt: skip
    finally:
        service.set_policy(base)
