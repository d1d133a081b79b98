"""The lean span path and the lean OTLP encoder say exactly what the SDK's would.

Both are speed-ups of stock OpenTelemetry code (authz/tracing.py); these tests hold
them to the stock behaviour on random inputs: the lean encoder must produce the same
``ExportTraceServiceRequest`` as the stock ``encode_spans``, and a span recorded on the
lean path must equal (but for its random span id) the one the SDK's generic
``start_span``/``end`` path records for the same decision, parent and sampler.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from authz import reasons
from authz.decision import Decision
from authz.request import AuthzRequest
from authz.span_export import CountingBatchSpanProcessor
from authz.tracing import SPAN_NAME, DecisionSpans, EncodedSpan, SpanEncoder

TEXT = st.text(alphabet=string.printable + "éß漢", max_size=40)
ATTRIBUTE_VALUE = st.one_of(
    TEXT,
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
)
IDS = st.integers(min_value=1, max_value=2**64 - 1)


@st.composite
def spans(draw: st.DrawFn, resource: Resource | None = None) -> ReadableSpan:
    trace_id = draw(st.integers(min_value=1, max_value=2**128 - 1))
    parent = None
    if draw(st.booleans()):
        value = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=8)
        state = draw(
            st.lists(
                st.tuples(st.sampled_from(["k", "vendor"]), value),
                max_size=2,
                unique_by=lambda kv: kv[0],
            )
        )
        parent = SpanContext(
            trace_id, draw(IDS), is_remote=draw(st.booleans()), trace_state=TraceState(state)
        )
    start = draw(st.integers(min_value=1, max_value=2**62))
    return ReadableSpan(
        SPAN_NAME,
        SpanContext(trace_id, draw(IDS), is_remote=False, trace_flags=TraceFlags(1)),
        parent=parent,
        resource=resource or Resource.create({"service.name": draw(TEXT) or "authz"}),
        attributes=draw(st.dictionaries(TEXT.filter(bool), ATTRIBUTE_VALUE, max_size=12)),
        kind=SpanKind.SERVER,
        status=draw(
            st.sampled_from([Status(StatusCode.UNSET), Status(StatusCode.ERROR, "internal error")])
        ),
        start_time=start,
        end_time=start + draw(st.integers(min_value=0, max_value=10**9)),
    )


@st.composite
def batches(draw: st.DrawFn) -> list[ReadableSpan]:
    """Spans of one process: one resource (as one tracer's spans share)."""
    resource = Resource.create({"service.name": draw(TEXT) or "authz", "k": draw(ATTRIBUTE_VALUE)})
    return draw(st.lists(spans(resource), min_size=1, max_size=6))


@settings(max_examples=300, deadline=None)
@given(batches())
def test_lean_encoder_gives_the_stock_request(batch: list[ReadableSpan]) -> None:
    ours = SpanEncoder().encode(batch)
    assert ours is not None  # decision-shaped batches never need the stock encoder
    assert ours == encode_spans(batch)


@settings(max_examples=50, deadline=None)
@given(st.lists(spans(), min_size=2, max_size=4))
def test_lean_encoder_leaves_mixed_resources_to_the_stock_encoder(
    batch: list[ReadableSpan],
) -> None:
    ours = SpanEncoder().encode(batch)
    assert ours is None or ours == encode_spans(batch)


def test_lean_encoder_handles_decision_shaped_batches() -> None:
    """The self-check at start-up passes with this SDK (else the stock one is used)."""
    assert SpanEncoder().agrees_with(encode_spans)


class _FixedIds(IdGenerator):
    """The same ids for both paths, so sampling and ids can be compared exactly."""

    def __init__(self, seed: int) -> None:
        self._seed = seed

    def generate_span_id(self) -> int:
        return 0x1000 + self._seed

    def generate_trace_id(self) -> int:
        return (0xABC << 100) + self._seed * 7919


def _decision(i: int) -> Decision:
    return Decision(
        allowed=i % 2 == 0,
        http_status=200 if i % 2 == 0 else 403,
        reason=reasons.ALLOWED if i % 2 == 0 else reasons.FORBIDDEN,
        decision_id=f"{i:016x}",
        subject="alice",
        auth_method="jwt",
        route="orders-api",
        service="orders",
        policy_version="v1",
        matched_rule="b/r#0" if i % 2 == 0 else "",
        audit=("deny:x/r#0",) if i % 3 == 0 else (),
    )


def _request_with_parent(i: int, parent: str) -> tuple[AuthzRequest, list[tuple[str, str]]]:
    """A request and the Check's gRPC metadata, with the trace parent where ``parent``
    says: none, a sampled or unsampled ``traceparent`` in the metadata, or one in the
    request's headers."""
    metadata: list[tuple[str, str]] = []
    headers: dict[str, str] = {"x-request-id": f"r{i}"}
    if parent in ("sampled", "unsampled"):
        flag = "01" if parent == "sampled" else "00"
        metadata = [("traceparent", f"00-{'ab' * 16}-{'cd' * 8}-{flag}")]
    elif parent == "header":
        headers["traceparent"] = f"00-{'12' * 16}-{'34' * 8}-01"
    return AuthzRequest.of("GET", "/orders/1", service="orders", headers=headers), metadata


@settings(max_examples=60, deadline=None)
@given(
    i=st.integers(min_value=0, max_value=100),
    parent=st.sampled_from(["none", "sampled", "unsampled", "header"]),
    sampler=st.sampled_from(["always_on", "always_off", "parent_ratio"]),
    error=st.booleans(),
)
def test_lean_span_equals_the_sdk_span(i: int, parent: str, sampler: str, error: bool) -> None:
    samplers = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "parent_ratio": ParentBased(TraceIdRatioBased(0.5)),
    }
    request, metadata = _request_with_parent(i, parent)
    recorded = []
    for lean in (True, False):
        exporter = InMemorySpanExporter()
        provider = TracerProvider(sampler=samplers[sampler], id_generator=_FixedIds(i))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        spans_ = DecisionSpans(provider.get_tracer("meshward.authz"))
        spans_._lean = lean  # the generic SDK path when False
        trace_id = spans_.record(
            _decision(i), request, metadata, start_ns=1000, end_ns=2000, internal_error=error
        )
        recorded.append((trace_id, exporter.get_finished_spans()))
        provider.shutdown()
    (lean_trace, lean_spans), (sdk_trace, sdk_spans) = recorded
    assert lean_trace == sdk_trace
    assert len(lean_spans) == len(sdk_spans)
    for ours, theirs in zip(lean_spans, sdk_spans, strict=True):
        assert ours.context == theirs.context
        assert ours.name == theirs.name
        assert ours.kind == theirs.kind
        assert ours.parent == theirs.parent
        assert dict(ours.attributes or {}) == dict(theirs.attributes or {})
        assert ours.status.status_code == theirs.status.status_code
        assert ours.status.description == theirs.status.description
        assert (ours.start_time, ours.end_time) == (theirs.start_time, theirs.end_time)
        assert ours.context.trace_flags == theirs.context.trace_flags
        assert ours.resource == theirs.resource
        assert ours.instrumentation_scope == theirs.instrumentation_scope
        assert (
            encode_spans([ours]).resource_spans[0].scope_spans[0].scope
            == encode_spans([theirs]).resource_spans[0].scope_spans[0].scope
        )


class _KeepEncoded(SpanExporter):
    """Stands in for the lean OTLP exporter: takes EncodedSpans, exposes its encoder."""

    def __init__(self) -> None:
        self.span_encoder = SpanEncoder()
        self.batches: list[list[EncodedSpan]] = []

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        self.batches.append(list(spans))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


@settings(max_examples=40, deadline=None)
@given(
    i=st.integers(min_value=0, max_value=100),
    parent=st.sampled_from(["none", "sampled", "unsampled", "header"]),
    error=st.booleans(),
)
def test_spans_encoded_from_their_parts_equal_the_sdk_span_encoded(
    i: int, parent: str, error: bool
) -> None:
    """The lean path with meshward's export processor encodes without a ReadableSpan;
    the request it leads to is the stock encoding of the SDK's own span."""
    request, metadata = _request_with_parent(i, parent)

    direct = _KeepEncoded()
    processor = CountingBatchSpanProcessor(
        direct, max_export_batch_size=1, encode=direct.span_encoder.encode_one
    )
    provider = TracerProvider(id_generator=_FixedIds(i))
    provider.add_span_processor(processor)
    spans_ = DecisionSpans(provider.get_tracer("meshward.authz"))
    spans_.record(_decision(i), request, metadata, start_ns=1000, end_ns=2000, internal_error=error)
    assert spans_._verdict[2] is not None  # the direct path was taken
    assert processor.force_flush(5000)
    provider.shutdown()

    sdk = InMemorySpanExporter()
    reference = TracerProvider(id_generator=_FixedIds(i))
    reference.add_span_processor(SimpleSpanProcessor(sdk))
    generic = DecisionSpans(reference.get_tracer("meshward.authz"))
    generic._lean = False
    generic.record(
        _decision(i), request, metadata, start_ns=1000, end_ns=2000, internal_error=error
    )
    theirs = sdk.get_finished_spans()
    ours = [item for batch in direct.batches for item in batch]
    assert len(ours) == len(theirs)  # an unsampled parent: neither exports a span
    if theirs:
        (item,) = ours
        assert item.span is None and item.data is not None
        assert direct.span_encoder.encode(ours) == encode_spans(theirs)


def test_the_lean_exporter_sends_encoder_bytes_and_keeps_doing_so_after_reconnecting(
    monkeypatch: Any,
) -> None:
    """With this SDK the request bytes go to the channel as encoded (no parse and
    re-serialize), also after the exporter rebuilds its channel on UNAVAILABLE."""
    from authz.tracing import lean_otlp_exporter

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    exporter = lean_otlp_exporter()
    assert exporter.raw
    exporter._initialize_channel_and_stub()
    assert type(exporter._client).__name__ == "_RawTraceStub"
    exporter.shutdown()
