"""Decision spans: parent selection, attributes, status; decision-log line with trace id."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from authz import reasons
from authz.check import Checker
from authz.compiled import CompiledPolicy, compile_policy
from authz.decision_log import LOGGER_NAME
from authz.tracing import SPAN_NAME, setup_tracer_provider
from meshward.logs import setup
from tests import authz_helpers as testing

META_TRACE = "0af7651916cd43dd8448eb211c80319c"
META_SPAN = "b7ad6b7169203331"
HEADER_TRACE = "11111111111111111111111111111111"
HEADER_SPAN = "2222222222222222"
META_TP = f"00-{META_TRACE}-{META_SPAN}-01"
HEADER_TP = f"00-{HEADER_TRACE}-{HEADER_SPAN}-01"


@pytest.fixture(scope="module")
def key() -> testing.SigningKey:
    return testing.rsa_key()


@pytest.fixture(scope="module")
def compiled(key: testing.SigningKey) -> CompiledPolicy:
    return compile_policy(testing.demo_policy(testing.jwks(key)))


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def checker(compiled: CompiledPolicy, exporter: InMemorySpanExporter) -> Iterator[Checker]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Checker(compiled, provider.get_tracer("test"))
    provider.shutdown()


def token(key: testing.SigningKey, subject: str = "alice", groups: list[str] | None = None) -> str:
    return key.sign(testing.claims(subject, groups or []))


def only_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    spans = exporter.get_finished_spans()
    assert len(spans) == 1, spans
    return spans[0]


def test_metadata_traceparent_wins_over_header(
    checker: Checker, exporter: InMemorySpanExporter, key: testing.SigningKey
) -> None:
    message = testing.check_request(
        "GET",
        "/orders",
        {"authorization": f"Bearer {token(key)}", "traceparent": HEADER_TP},
    )
    checker.check(message, [("traceparent", META_TP), ("tracestate", "k=v")])
    span = only_span(exporter)
    assert span.parent is not None
    assert format(span.context.trace_id, "032x") == META_TRACE
    assert format(span.parent.span_id, "016x") == META_SPAN
    assert span.parent.is_remote
    assert span.context.trace_state.get("k") == "v"
    assert span.attributes is not None
    assert "meshward.trace_parent" not in span.attributes  # the normal case is not flagged


def test_header_traceparent_when_no_metadata(
    checker: Checker, exporter: InMemorySpanExporter
) -> None:
    message = testing.check_request("GET", "/orders", {"traceparent": HEADER_TP})
    checker.check(message, [("user-agent", "grpc-c++"), ("tracestate", "")])
    span = only_span(exporter)
    assert span.parent is not None
    assert format(span.context.trace_id, "032x") == HEADER_TRACE
    assert format(span.parent.span_id, "016x") == HEADER_SPAN
    assert span.attributes is not None and span.attributes["meshward.trace_parent"] == "http_header"


def test_invalid_metadata_traceparent_falls_back_to_header(
    checker: Checker, exporter: InMemorySpanExporter
) -> None:
    message = testing.check_request("GET", "/orders", {"traceparent": HEADER_TP})
    checker.check(message, [("traceparent", "00-zzzz-bad-01")])
    assert format(only_span(exporter).context.trace_id, "032x") == HEADER_TRACE


def test_new_root_otherwise(checker: Checker, exporter: InMemorySpanExporter) -> None:
    checker.check(testing.check_request("GET", "/orders"), [])
    span = only_span(exporter)
    assert span.parent is None
    assert span.context.trace_id not in (0, int(META_TRACE, 16), int(HEADER_TRACE, 16))
    assert span.attributes is not None and span.attributes["meshward.trace_parent"] == "root"


def test_empty_tracestate_counts_as_absent(
    checker: Checker, exporter: InMemorySpanExporter
) -> None:
    checker.check(testing.check_request(), [("traceparent", META_TP), ("tracestate", "")])
    span = only_span(exporter)
    assert format(span.context.trace_id, "032x") == META_TRACE
    assert len(span.context.trace_state) == 0


def test_unsampled_parent_is_respected_and_still_logged(
    checker: Checker, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    unsampled = f"00-{META_TRACE}-{META_SPAN}-00"
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        checker.check(testing.check_request(), [("traceparent", unsampled)])
    assert exporter.get_finished_spans() == ()
    (record,) = [r for r in caplog.records if r.name == LOGGER_NAME]
    assert record.decision["trace_id"] == META_TRACE  # type: ignore[attr-defined]


def test_attributes_of_an_allow(
    checker: Checker,
    exporter: InMemorySpanExporter,
    key: testing.SigningKey,
    compiled: CompiledPolicy,
) -> None:
    bearer = token(key, "alice")
    message = testing.check_request(
        "POST",
        "/orders/9?secret=1",
        {"authorization": f"Bearer {bearer}", "x-request-id": "req-42"},
        policy_version="pv-proxy",
    )
    response = checker.check(message, [("traceparent", META_TP)])
    span = only_span(exporter)
    assert span.name == SPAN_NAME
    assert span.kind is SpanKind.SERVER
    assert span.status.status_code is StatusCode.UNSET
    attributes = dict(span.attributes or {})
    decision_id = next(
        h.header.value
        for h in response.ok_response.headers
        if h.header.key == "x-meshward-decision-id"
    )
    assert attributes == {
        "meshward.decision": "allow",
        "meshward.reason": "allowed",
        "meshward.subject": "alice",
        "meshward.auth_method": "jwt",
        "meshward.route": "orders-api",
        "meshward.service": "orders",
        "meshward.gateway": "edge",
        "meshward.policy_version": compiled.version,
        "meshward.proxy_policy_version": "pv-proxy",
        "meshward.decision_id": decision_id,
        "meshward.matched_rule": "alice-runs-orders/orders-admin#0",
        "meshward.request_id": "req-42",
        "http.request.method": "POST",
        "http.response.status_code": 200,
        "url.path": "/orders/9",
    }
    assert all(bearer not in str(v) for v in attributes.values())
    assert span.start_time is not None and span.end_time is not None
    assert span.start_time <= span.end_time


def test_attributes_of_a_deny(checker: Checker, exporter: InMemorySpanExporter) -> None:
    checker.check(testing.check_request("GET", "/orders", {"authorization": "Bearer x.y.z"}))
    attributes = dict(only_span(exporter).attributes or {})
    assert attributes["meshward.decision"] == "deny"
    assert attributes["meshward.reason"] == reasons.INVALID_TOKEN
    assert attributes["http.response.status_code"] == 401
    assert "meshward.subject" not in attributes
    assert "x.y.z" not in str(attributes)


def test_status_error_only_on_internal_error(
    checker: Checker, exporter: InMemorySpanExporter, compiled: CompiledPolicy
) -> None:
    checker.check(testing.check_request())
    assert only_span(exporter).status.status_code is StatusCode.UNSET
    exporter.clear()
    checker.check(None)  # undecodable: a deny, not an internal error
    assert only_span(exporter).status.status_code is StatusCode.UNSET
    exporter.clear()

    class Broken:
        name = "broken"

        def authenticate(self, request: object, now: float) -> None:
            raise ValueError("boom")

    checker.policy = replace(compiled, user_methods=(Broken(),))
    checker.check(testing.check_request())
    span = only_span(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["meshward.reason"] == reasons.INTERNAL_ERROR


def test_decision_log_line(
    checker: Checker,
    exporter: InMemorySpanExporter,
    key: testing.SigningKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bearer = token(key, "bob", ["customers"])
    message = testing.check_request(
        "GET", "/orders?x=1", {"authorization": f"Bearer {bearer}", "x-request-id": "r1"}
    )
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        response = checker.check(message, [("traceparent", META_TP)])
    (record,) = [r for r in caplog.records if r.name == LOGGER_NAME]
    logged = record.decision  # type: ignore[attr-defined]
    span = only_span(exporter)
    assert logged["trace_id"] == format(span.context.trace_id, "032x") == META_TRACE
    assert logged["decision_id"] == dict(span.attributes or {})["meshward.decision_id"]
    assert {
        k: logged[k] for k in ("subject", "method", "path", "decision", "reason", "status")
    } == {
        "subject": "bob",
        "method": "GET",
        "path": "/orders",
        "decision": "deny",
        "reason": "forbidden",
        "status": 403,
    }
    assert logged["route"] == "orders-api" and logged["service"] == "orders"
    assert logged["auth_method"] == "jwt" and logged["ts"].endswith("Z")
    assert response.denied_response.status.code == 403
    assert bearer not in record.getMessage() and bearer not in str(logged)


def test_decision_log_as_json_line(checker: Checker, capsys: pytest.CaptureFixture[str]) -> None:

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        setup("info")
        checker.check(testing.check_request("GET", "/orders"))
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    decisions = [line for line in lines if line.get("logger") == LOGGER_NAME]
    assert len(decisions) == 1
    assert decisions[0]["decision"]["reason"] == reasons.MISSING_TOKEN
    assert decisions[0]["decision"]["status"] == 401


def test_setup_tracer_provider_names_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
    ):
        monkeypatch.delenv(name, raising=False)
    provider = setup_tracer_provider("meshward-authz-test")
    try:
        assert provider.resource.attributes["service.name"] == "meshward-authz-test"
        with provider.get_tracer("t").start_as_current_span("s") as span:
            assert span.get_span_context().is_valid
    finally:
        provider.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    provider = setup_tracer_provider("meshward-authz-test")
    assert provider.resource.attributes["service.name"] == "from-env"
    provider.shutdown()


def test_workload_span_attributes_and_log_field(
    exporter: InMemorySpanExporter, key: testing.SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    checker = Checker(
        compile_policy(testing.workload_policy(testing.jwks(key))), provider.get_tracer("t")
    )
    console = testing.spiffe("console")
    message = testing.check_request(
        "DELETE", "/orders/1", {"authorization": f"Bearer {token(key, 'dave', ['ops'])}"},
        principal=console,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        assert checker.check(message).status.code == 0
    attributes = dict(only_span(exporter).attributes or {})
    assert attributes["meshward.workload"] == console
    assert attributes["meshward.auth_method"] == "mtls+jwt"
    assert attributes["meshward.subject"] == "dave"
    assert attributes["meshward.matched_rule"] == "ops-via-console/orders-admin#0"
    (record,) = [r for r in caplog.records if r.name == LOGGER_NAME]
    logged = record.decision  # type: ignore[attr-defined]
    assert (logged["workload"], logged["auth_method"]) == (console, "mtls+jwt")
    exporter.clear()

    checker.check(testing.check_request("GET", "/orders", principal=testing.spiffe("orders")))
    attributes = dict(only_span(exporter).attributes or {})
    assert (attributes["meshward.reason"], attributes["meshward.auth_method"]) == (
        reasons.MISSING_TOKEN,
        "mtls",
    )
    assert attributes["meshward.workload"] == testing.spiffe("orders")
    exporter.clear()

    checker.check(testing.check_request("GET", "/orders"))
    attributes = dict(only_span(exporter).attributes or {})
    assert attributes["meshward.auth_method"] == "none"
    assert "meshward.workload" not in attributes  # empty values are left out
    provider.shutdown()
