"""One OpenTelemetry span per Check, under the right parent, exported cheaply.

Parent choice (verified with Envoy 1.40, see DESIGN.md): when Envoy traces the
request it makes a CLIENT span for the ext_authz call and sends *that* span's
``traceparent``/``tracestate`` in the **gRPC call metadata**; the ``traceparent``
among ``CheckRequest.attributes.request.http.headers`` is only what the downstream
client sent, unchanged. So the parent is, in order:

1. the gRPC metadata ``traceparent`` (with its ``tracestate``; an empty tracestate
   counts as absent; its sampled flag is kept, so an unsampled parent gives an
   unsampled decision span under the SDK's default parent-based sampler);
2. else the request header ``traceparent`` (Envoy is not tracing);
3. else a new root.

An unparsable ``traceparent`` counts as absent (the W3C rules of the SDK's
``TraceContextTextMapPropagator``). ``x-request-id`` is recorded either way: Envoy's
own ``ingress`` span carries the same value.

The span is made *after* the decision with its real start and end times and every
attribute at once. Spans never carry tokens, headers or policy text. authz never
installs a global tracer provider: the :class:`~opentelemetry.trace.Tracer` is
injected; :func:`setup_tracer_provider` is for the process entry point.

Cost (measured with ``bench/authz_bench.py``; the span was the largest part of a
Check's own work): the SDK's generic ``start_span``/``end`` path costs ~34 µs per span
(attribute validation under a lock, a mutable span, then a second read-only copy at
``end``), and the stock OTLP encoder ~50 µs more per span in the export thread, which
also held the GIL for ~27 ms per 512-span batch and stalled every Check behind it. So:

- :class:`DecisionSpans` hands the SDK's span processors a finished ``ReadableSpan``
  directly (same sampler, ids, resource, scope and processors; attributes are
  already clean primitives) whenever the tracer is the SDK's and its processors are
  the SDK's simple/batch processors or meshward's, whose start/ending hooks do nothing; anything
  else (another tracer, custom processors, span limits on values, SDK self-metrics)
  goes through the generic ``start_span`` path, unchanged;
- :func:`setup_tracer_provider` exports through a
  :class:`~authz.span_export.CountingBatchSpanProcessor` (bounded queue, batches of 64
  unless ``OTEL_BSP_*`` says otherwise, every dropped span counted) with the stock OTLP
  exporter whose encoder is swapped for a :class:`SpanEncoder`
  (:func:`lean_otlp_exporter`): the same ``ExportTraceServiceRequest``, checked
  against the stock encoder at start.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, SynchronousMultiSpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from authz.decision import Decision
from authz.request import AuthzRequest
from authz.span_export import CountingBatchSpanProcessor, SpanExportSettingError

SPAN_NAME = "meshward.authz.check"

#: Where the decision span's parent came from (``meshward.trace_parent`` attribute).
PARENT_GRPC_METADATA = "grpc_metadata"
PARENT_HTTP_HEADER = "http_header"
PARENT_NONE = "root"

#: Environment variables that, when any is set, turn the OTLP exporter on.
OTLP_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

#: The most attributes a decision span has (the lean path needs the SDK's limit ≥ this).
MAX_ATTRIBUTES = 20

_log = logging.getLogger("meshward.authz")

# W3C trace context, as the SDK's TraceContextTextMapPropagator reads it.
_TRACEPARENT = re.compile(
    r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:(-.*)|[ \t]*)$"
)
_TRACEPARENT_MAX_LENGTH = 512
_TRACESTATE_MAX_LENGTH = 512
_NO_TRACE_ID = "0" * 32
_NO_SPAN_ID = "0" * 16
_UNSET = Status(StatusCode.UNSET)
_INTERNAL_ERROR = Status(StatusCode.ERROR, "internal error")
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_RANDOM_TRACE_ID = int(getattr(TraceFlags, "RANDOM_TRACE_ID", 0))


class TracingSetupError(Exception):
    """The OTLP exporter cannot be loaded; the message says how to repair the install."""


# -- the parent ---------------------------------------------------------------------------


def parse_traceparent(traceparent: str | None, tracestate: str | None) -> SpanContext | None:
    """The remote span context of a W3C ``traceparent`` (+ ``tracestate``), or ``None``
    when absent or not valid. An empty ``tracestate`` counts as absent."""
    if not traceparent or len(traceparent) > _TRACEPARENT_MAX_LENGTH:
        return None
    match = _TRACEPARENT.match(traceparent)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if trace_id == _NO_TRACE_ID or span_id == _NO_SPAN_ID:
        return None
    if (version == "00" and rest) or version == "ff":
        return None
    state = None
    if tracestate and len(tracestate) <= _TRACESTATE_MAX_LENGTH:
        state = TraceState.from_header([tracestate])
    return SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags, 16)),
        trace_state=state,
    )


def _parent(
    metadata: Iterable[tuple[str, Any]] | None, headers: Mapping[str, str]
) -> tuple[SpanContext | None, str]:
    traceparent = tracestate = None
    for key, value in metadata or ():
        if key == "traceparent":
            traceparent = value if isinstance(value, str) else None
        elif key == "tracestate":
            tracestate = value if isinstance(value, str) else None
    parent = parse_traceparent(traceparent, tracestate)
    if parent is not None:
        return parent, PARENT_GRPC_METADATA
    parent = parse_traceparent(headers.get("traceparent"), headers.get("tracestate"))
    if parent is not None:
        return parent, PARENT_HTTP_HEADER
    return None, PARENT_NONE


def _as_context(parent: SpanContext | None) -> Context:
    if parent is None:
        return Context()
    return trace.set_span_in_context(NonRecordingSpan(parent), Context())


# -- the span -----------------------------------------------------------------------------


def span_attributes(
    decision: Decision, request: AuthzRequest | None, parent: str
) -> dict[str, str | int]:
    """The span's attributes; empty values are left out."""
    attributes: dict[str, str | int] = {
        "meshward.decision": "allow" if decision.allowed else "deny",
        "meshward.reason": decision.reason,
        "meshward.decision_id": decision.decision_id,
        "http.response.status_code": decision.http_status,
    }
    optional: tuple[tuple[str, str], ...] = (
        ("meshward.subject", decision.subject),
        ("meshward.auth_method", decision.auth_method),
        ("meshward.workload", decision.workload),
        ("meshward.route", decision.route),
        ("meshward.service", decision.service),
        ("meshward.gateway", decision.gateway),
        ("meshward.policy_version", decision.policy_version),
        ("meshward.matched_rule", decision.matched_rule),
        ("meshward.audit_outcome", decision.audit_outcome),
    )
    if decision.audit:
        # Dry-run rules that applied, "<effect>:<rule>" joined by "," (a string, so the
        # lean span path and every exporter carry it unchanged).
        attributes["meshward.audit"] = ",".join(decision.audit)
    if request is not None:
        optional += (
            ("http.request.method", request.method),
            ("url.path", request.path),
            ("meshward.request_id", request.request_id),
        )
    for key, value in optional:
        if value:
            attributes[key] = value
    if decision.proxy_policy_version:
        # The policy version the proxy's route config came from (its context_extensions):
        # differing from meshward.policy_version means a rollout is in progress.
        attributes["meshward.proxy_policy_version"] = decision.proxy_policy_version
    if parent != PARENT_GRPC_METADATA:  # the usual case behind a tracing Envoy: say nothing
        attributes["meshward.trace_parent"] = parent
    return attributes


#: Span processors whose ``on_start``/``_on_ending`` hooks do nothing, so a finished
#: span can be handed straight to ``on_end``.
_PASSIVE_PROCESSORS = (SimpleSpanProcessor, BatchSpanProcessor, CountingBatchSpanProcessor)


class DecisionSpans:
    """Makes the decision span of each Check with one tracer (see the module docstring).

    :meth:`record` returns the span's trace id as 32 hex digits (for the decision log),
    whether or not the span is sampled.
    """

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._lean = _lean_capable(tracer)
        # (processor tuple last seen, whether it allows the lean path, the processor
        # and encoder spans are encoded for directly, if so): one reference, so worker
        # threads never read a tuple with another tuple's verdict.
        self._verdict: tuple[Any, bool, Any] = (None, False, None)

    def record(
        self,
        decision: Decision,
        request: AuthzRequest | None,
        metadata: Iterable[tuple[str, Any]] | None,
        *,
        start_ns: int,
        end_ns: int,
        internal_error: bool = False,
    ) -> str:
        parent, source = _parent(metadata, request.headers if request is not None else {})
        attributes = span_attributes(decision, request, source)
        status = _INTERNAL_ERROR if internal_error else _UNSET
        if self._lean and self._lean_now():
            context = self._lean_span(parent, attributes, status, start_ns, end_ns)
        else:
            span = self._tracer.start_span(
                SPAN_NAME,
                context=_as_context(parent),
                kind=SpanKind.SERVER,
                attributes=attributes,
                start_time=start_ns,
            )
            if internal_error:
                span.set_status(_INTERNAL_ERROR)
            span.end(end_time=end_ns)
            context = span.get_span_context()
        return trace_id_hex(context)

    def _lean_now(self) -> bool:
        """Whether the tracer's processors (re-read each time: they can be added while
        serving) and its enabled state still allow the lean path."""
        tracer: Any = self._tracer
        enabled = getattr(tracer, "_is_enabled", None)
        if enabled is not None and not enabled():
            return False
        processors = getattr(tracer.span_processor, "_span_processors", None)
        seen, passive, _ = self._verdict
        if processors is not seen:
            passive = isinstance(processors, tuple) and all(
                type(p) in _PASSIVE_PROCESSORS for p in processors
            )
            direct = _direct(tracer, processors) if passive and processors else None
            self._verdict = (processors, passive, direct)
        return passive

    def _lean_span(
        self,
        parent: SpanContext | None,
        attributes: dict[str, str | int],
        status: Status,
        start_ns: int,
        end_ns: int,
    ) -> SpanContext:
        """What ``Tracer.start_span`` + ``end`` do for a span without links or events,
        handing the processors one finished ``ReadableSpan``."""
        tracer: Any = self._tracer
        ids = tracer.id_generator
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = ids.generate_trace_id()
            random_trace_id = ids.is_trace_id_random()
        else:
            trace_id = parent.trace_id
            random_trace_id = bool(parent.trace_flags & _RANDOM_TRACE_ID)
        sampling = tracer.sampler.should_sample(
            _as_context(parent), trace_id, SPAN_NAME, SpanKind.SERVER, attributes, ()
        )
        flags = _SAMPLED if sampling.decision.is_sampled() else _NOT_SAMPLED
        if random_trace_id and _RANDOM_TRACE_ID:
            flags = TraceFlags(flags | _RANDOM_TRACE_ID)
        context = SpanContext(
            trace_id,
            ids.generate_span_id(),
            is_remote=False,
            trace_flags=flags,
            trace_state=sampling.trace_state,
        )
        processors, _, direct = self._verdict
        if direct and flags.sampled:
            # The only processor exports with the lean encoder: encode from the parts,
            # no ReadableSpan (equal bytes: tests/unit/test_authz_span_encoding.py).
            processor, encoder = direct
            processor.enqueue(
                EncodedSpan(
                    tracer.resource,
                    tracer._instrumentation_scope,
                    encoder.fields(
                        context,
                        parent=parent,
                        name=SPAN_NAME,
                        kind=SpanKind.SERVER,
                        start_time=start_ns,
                        end_time=end_ns,
                        attributes=sampling.attributes,
                        status=status,
                    ),
                    None,
                )
            )
        elif sampling.decision.is_recording() and processors:
            # (No processor — tracing off, no exporter configured: only the context is
            # needed, for the decision log's trace id.)
            tracer.span_processor.on_end(
                ReadableSpan(
                    name=SPAN_NAME,
                    context=context,
                    parent=parent,
                    resource=tracer.resource,
                    # What the SDK records too: the sampler's attributes (for the SDK's
                    # samplers, a read-only view of ``attributes``).
                    attributes=sampling.attributes,
                    kind=SpanKind.SERVER,
                    instrumentation_info=tracer.instrumentation_info,
                    status=status,
                    start_time=start_ns,
                    end_time=end_ns,
                    instrumentation_scope=tracer._instrumentation_scope,
                )
            )
        return context


def _direct(tracer: Any, processors: tuple[Any, ...]) -> Any:
    """(processor, encoder) when the tracer's one processor is a counting batch
    processor that encodes for the lean OTLP exporter and the tracer's resource and
    scope are encodable; else ``None``."""
    if len(processors) != 1 or type(processors[0]) is not CountingBatchSpanProcessor:
        return None
    processor = processors[0]
    encoder = getattr(processor.exporter, "span_encoder", None)
    if not processor.encodes or not isinstance(encoder, SpanEncoder):
        return None
    if not encoder.can_encode(tracer.resource, tracer._instrumentation_scope):
        return None
    return processor, encoder


def _lean_capable(tracer: trace.Tracer) -> bool:
    """Whether ``tracer`` is one the lean path reproduces exactly: the SDK's tracer,
    with the synchronous multi-processor, no attribute length limit, room for every
    attribute, and no SDK self-metrics."""
    if not isinstance(tracer, SdkTracer):
        return False
    needed = ("sampler", "resource", "span_processor", "id_generator", "instrumentation_info")
    if not all(hasattr(tracer, name) for name in (*needed, "_instrumentation_scope")):
        return False
    if not isinstance(tracer.span_processor, SynchronousMultiSpanProcessor):
        return False
    limits = getattr(tracer, "_span_limits", None)
    if limits is None or getattr(limits, "max_span_attribute_length", 0) is not None:
        return False
    max_attributes = getattr(limits, "max_span_attributes", None)
    if max_attributes is not None and max_attributes < MAX_ATTRIBUTES:
        return False
    metrics = getattr(tracer, "_tracer_metrics", None)
    return metrics is None or type(metrics).__name__ == "NoOpTracerMetrics"


def trace_id_hex(span_context: SpanContext) -> str:
    """``trace_id`` as 32 hex digits, empty when invalid."""
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""


# -- export -------------------------------------------------------------------------------


def setup_tracer_provider(service_name: str) -> TracerProvider:
    """A tracer provider for a meshward process; not installed globally.

    Spans are exported with OTLP/gRPC through a bounded, counting batch processor
    (:func:`span_export_of` finds it) only when one of
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (the
    exporter reads them, and the other ``OTEL_EXPORTER_OTLP_*`` settings, itself);
    otherwise spans are made (trace ids reach the decision log) but go nowhere.
    ``service_name`` is the default ``service.name``; ``OTEL_SERVICE_NAME`` overrides it. Call
    ``shutdown()`` on exit to flush. Raises :class:`TracingSetupError` when the
    exporter cannot be imported (the xds-protos file clash) or an ``OTEL_BSP_*``
    setting is not a positive integer.
    """
    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES (the operator's choice) win.
    configured = "service.name" in OTELResourceDetector().detect().attributes
    resource = Resource.create({} if configured else {"service.name": service_name})
    provider = TracerProvider(resource=resource)
    if any(os.environ.get(name) for name in OTLP_ENDPOINT_VARS):
        try:
            exporter = lean_otlp_exporter()
        except ImportError as error:
            from meshward.install_check import repair_command

            raise TracingSetupError(
                f"the OTLP trace exporter cannot be imported ({error}); xds-protos has "
                f"overwritten opentelemetry-proto. Repair with: {repair_command()}"
            ) from error
        try:
            processor = CountingBatchSpanProcessor.from_env(
                exporter, encode=getattr(exporter, "encode_one", None)
            )
        except SpanExportSettingError as error:
            raise TracingSetupError(str(error)) from error
        provider.add_span_processor(processor)
        _EXPORTS[provider] = processor
    return provider


#: Each provider made by :func:`setup_tracer_provider` → its export processor.
_EXPORTS: weakref.WeakKeyDictionary[TracerProvider, CountingBatchSpanProcessor] = (
    weakref.WeakKeyDictionary()
)


def span_export_of(provider: TracerProvider) -> CountingBatchSpanProcessor | None:
    """The export processor :func:`setup_tracer_provider` gave ``provider`` (its
    counters feed the spans-exported/dropped metrics); None when spans go nowhere."""
    return _EXPORTS.get(provider)


def lean_otlp_exporter() -> Any:
    """The stock OTLP/gRPC span exporter (it reads the ``OTEL_EXPORTER_OTLP_*``
    variables), encoding with a :class:`SpanEncoder` when that agrees with the stock
    encoder on sample spans (checked here), else exactly the stock exporter. Raises
    ``ImportError`` when the exporter cannot be imported."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import (
        encode_spans as stock_encode,
    )
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    encoder = SpanEncoder()
    if not hasattr(OTLPSpanExporter, "_translate_data") or not encoder.agrees_with(stock_encode):
        _log.warning("lean OTLP span encoding not available; using the stock encoder")
        return OTLPSpanExporter()

    class LeanOtlpSpanExporter(OTLPSpanExporter):
        """The stock exporter, with the encoder swapped (same requests, ~5x less CPU);
        the stock encoder for a batch the lean one does not handle."""

        #: For :class:`~authz.span_export.CountingBatchSpanProcessor`: encode each span
        #: as it ends; this exporter then receives :class:`EncodedSpan` batches.
        encode_one = staticmethod(encoder.encode_one)
        span_encoder = encoder

        def __init__(self) -> None:
            super().__init__()
            #: Whether requests go to the channel as the encoder's bytes (not parsed
            #: into a message only for the stub to serialize it again).
            self.raw = _raw_stub_possible(self)
            if self.raw:
                self._stub = _RawTraceStub
                self._client = _RawTraceStub(self._channel)  # type: ignore[assignment]

        def _translate_data(self, data: Sequence[Any]) -> Any:
            request = encoder.encode(data, raw=self.raw)
            if request is None:  # several resources/scopes: grouped, not byte-exact
                request = encoder.encode(data, exact=False, raw=self.raw)
            if request is not None:
                return request
            spans = [d.span if type(d) is EncodedSpan else d for d in data]
            return stock_encode([s for s in spans if s is not None])

    return LeanOtlpSpanExporter()


_EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _serialize_request(request: Any) -> bytes:
    """Encoder bytes as they are; a message (the stock encoder's) serialized."""
    return request if type(request) is bytes else bytes(request.SerializeToString())


class _RawTraceStub:
    """``TraceServiceStub`` whose ``Export`` takes the request's wire bytes too."""

    def __init__(self, channel: Any) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceResponse,
        )

        self.Export = channel.unary_unary(
            _EXPORT_METHOD,
            request_serializer=_serialize_request,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )


def _raw_stub_possible(exporter: Any) -> bool:
    """Whether the stock exporter keeps its stub class and channel where this module
    swaps them (``_stub``, ``_channel``, ``_client``, rebuilt by
    ``_initialize_channel_and_stub`` on reconnect); else requests stay messages."""
    return (
        all(hasattr(exporter, name) for name in ("_stub", "_channel", "_client"))
        and callable(getattr(exporter, "_initialize_channel_and_stub", None))
        and getattr(exporter._channel, "unary_unary", None) is not None
    )


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS = tuple(bytes([n]) for n in range(0x80))


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited protobuf field: its tag byte(s), the length, the payload."""
    return tag + _varint(len(payload)) + payload


_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE = struct.Struct("<d").pack
_FLAG_HAS_IS_REMOTE = 0x100  # SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_FLAG_IS_REMOTE = 0x200  # SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


class EncodedSpan(NamedTuple):
    """A finished span's encoded ``ScopeSpans.spans`` entry (``None``: only the stock
    encoder can encode it) with its resource and scope, and the span itself unless it
    was encoded from its parts (the lean path: then ``data`` is never ``None``)."""

    resource: Resource
    scope: Any
    data: bytes | None
    span: ReadableSpan | None


class SpanEncoder:
    """Spans → OTLP ``ExportTraceServiceRequest``, the message the stock
    ``encode_spans`` makes, built as protobuf wire bytes and parsed once by protobuf's C
    code. Serialized attribute entries are cached by key and value: most values repeat
    (route, service, reason, policy version, ...); ids are encoded each time. Used by
    one export thread at a time (the batch processor exports under a lock).
    """

    #: Spans encoded between offers of the GIL to the serving thread (~0.2 ms).
    YIELD_EVERY = 32
    #: Attribute keys whose entries are cached, and entries cached per key.
    MAX_KEYS = 64
    VALUES_PER_KEY = 256

    def __init__(self) -> None:
        self._attributes: dict[str, dict[Any, tuple[type, bytes]]] = {}
        #: (resource, scope) by identity → (them, serialized resource field, scope field)
        self._headers: dict[tuple[int, int], tuple[Any, Any, bytes, bytes]] = {}

    def agrees_with(self, stock: Any) -> bool:
        """Whether :meth:`encode` gives the same request as ``stock`` on spans of every
        shape a decision span takes (root or remote parent, trace state, statuses,
        attribute types)."""
        resource = Resource.create({"service.name": "check", "n": 1, "f": 0.5, "b": True})
        parent = SpanContext(7, 8, is_remote=True, trace_state=TraceState([("k", "v")]))
        spans = [
            ReadableSpan(
                SPAN_NAME,
                SpanContext((1 << 100) + i, 3 + i, is_remote=False, trace_flags=_SAMPLED),
                parent=None if i % 2 else parent,
                resource=resource,
                # "c": one key, values that compare equal across types (True, 1, 1.0)
                attributes={"s": "x" * i, "i": i - 1, "c": (True, 1, 1.0, "1")[i], "u": "é"},
                kind=SpanKind.SERVER,
                status=_INTERNAL_ERROR if i == 2 else _UNSET,
                start_time=1_700_000_000_000_000_000 + i,
                end_time=1_700_000_000_000_100_000 + i,
            )
            for i in range(4)
        ]
        try:
            ours = self.encode(spans)
            return ours is not None and bool(ours == stock(spans))
        except Exception:  # any surprise: the stock encoder it is
            _log.exception("lean OTLP span encoder failed its self-check")
            return False

    def encode_one(self, span: ReadableSpan) -> EncodedSpan:
        """``span`` with its ``ScopeSpans.spans`` entry, encoded now — on the thread
        that ended the span, while its data is hot, leaving the export thread only the
        batch to join (measured: ~half the export thread's CPU per span). Safe from
        several threads: the attribute cache only ever gains equal entries."""
        try:
            data = self._span(span)
        except UnicodeEncodeError:  # a lone surrogate: the stock encoder decides
            data = None
        return EncodedSpan(span.resource, span.instrumentation_scope, data, span)

    def can_encode(self, resource: Resource, scope: Any) -> bool:
        """Whether spans of this resource and scope can be encoded without the stock
        encoder (primitive attribute values only)."""
        return self._header(resource, scope) is not None

    def encode(
        self, spans: Sequence[ReadableSpan | EncodedSpan], *, exact: bool = True, raw: bool = False
    ) -> Any:
        """The request for ``spans`` (finished spans, or :meth:`encode_one`'s results);
        ``None`` when one needs the stock encoder (events, links, dropped attributes,
        non-primitive attribute values, more than one resource or scope in the batch
        unless ``exact`` is false). ``raw``: the request's wire bytes instead of the
        message. One export thread at a time."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        grouped: dict[tuple[int, int], list[bytes]] = {}
        for count, item in enumerate(spans, 1):
            if isinstance(item, EncodedSpan):
                resource, scope, encoded, _ = item
            else:
                span = item
                if not count % self.YIELD_EVERY:
                    time.sleep(0)  # let a waiting Check thread have the GIL mid-batch
                try:
                    encoded = self._span(span)
                except UnicodeEncodeError:  # a lone surrogate: the stock encoder decides
                    return None
                resource, scope = span.resource, span.instrumentation_scope
            if encoded is None:
                return None
            key = (id(resource), id(scope))
            if key not in self._headers:
                header = self._header(resource, scope)
                if header is None:
                    return None
                self._headers[key] = header
            grouped.setdefault(key, []).append(encoded)
        if len(grouped) > 1 and exact:
            # The stock encoder groups by resource/scope *equality*; distinct objects
            # that compare equal are not worth matching here (decision spans share one
            # tracer's resource and scope): exactness first, the stock encoder it is.
            return None
        by_resource: dict[int, list[bytes]] = {}
        for key, encoded_spans in grouped.items():
            _, scope, _, scope_field = self._headers[key]
            scope_spans = scope_field + b"".join(encoded_spans)
            if scope is not None and scope.schema_url:
                scope_spans += _field(b"\x1a", scope.schema_url.encode())
            by_resource.setdefault(key[0], []).append(_field(b"\x12", scope_spans))
        body = []
        for key in grouped:
            if key[0] not in by_resource:
                continue
            resource, _, resource_field, _ = self._headers[key]
            entry = resource_field + b"".join(by_resource.pop(key[0]))
            if resource.schema_url:
                entry += _field(b"\x1a", resource.schema_url.encode())
            body.append(_field(b"\x0a", entry))
        if len(self._headers) > 64:  # resources and scopes are few; never grow unbounded
            self._headers.clear()
        if raw:
            return b"".join(body)
        return ExportTraceServiceRequest.FromString(b"".join(body))

    def _attribute(self, tag: bytes, key: str, value: Any) -> bytes | None:
        """An ``attributes`` entry (a KeyValue field numbered by ``tag``) for a primitive
        value; None for others. Written directly: ``AnyValue.value`` is a oneof, so
        even ``""``/``0``/``False`` are present, while an empty ``KeyValue.key`` (plain
        proto3) is left out."""
        kind = type(value)
        if kind is str:
            any_value = _field(b"\x0a", value.encode())
        elif kind is bool:
            any_value = b"\x10\x01" if value else b"\x10\x00"
        elif kind is int:
            if not -(1 << 63) <= value < 1 << 63:
                return None  # the stock encoder's business (it raises)
            any_value = b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
        elif kind is float:
            any_value = b"\x21" + _DOUBLE(value)
        else:
            return None
        entry = _field(b"\x0a", key.encode()) if key else b""
        return _field(tag, entry + _field(b"\x12", any_value))

    def _attribute_list(self, attributes: Mapping[str, Any] | None) -> bytes | None:
        """Resource / InstrumentationScope ``attributes`` (field 1)."""
        parts = []
        for key, value in (attributes or {}).items():
            entry = self._attribute(b"\x0a", key, value)
            if entry is None:
                return None
            parts.append(entry)
        return b"".join(parts)

    def _header(self, resource: Resource, scope: Any) -> tuple[Any, Any, bytes, bytes] | None:
        """``ResourceSpans.resource`` and ``ScopeSpans.scope``, serialized."""
        resource_attributes = self._attribute_list(resource.attributes)
        if resource_attributes is None:
            return None
        scope_body = b""
        if scope is not None:
            if scope.name:
                scope_body += _field(b"\x0a", scope.name.encode())
            if scope.version:
                scope_body += _field(b"\x12", scope.version.encode())
            scope_attributes = self._attribute_list(scope.attributes)
            if scope_attributes is None:
                return None
            scope_body += scope_attributes
        return resource, scope, _field(b"\x0a", resource_attributes), _field(b"\x0a", scope_body)

    def _span(self, span: ReadableSpan) -> bytes | None:
        """One ``ScopeSpans.spans`` entry, fields in number order."""
        context = span.context
        if context is None or span.events or span.links or span.dropped_attributes:
            return None
        return self.fields(
            context,
            parent=span.parent,
            name=span.name,
            kind=span.kind,
            start_time=span.start_time,
            end_time=span.end_time,
            attributes=span.attributes,
            status=span.status,
        )

    def fields(
        self,
        context: SpanContext,
        *,
        parent: SpanContext | None,
        name: str,
        kind: SpanKind,
        start_time: int | None,
        end_time: int | None,
        attributes: Mapping[str, Any] | None,
        status: Status,
    ) -> bytes | None:
        """The ``ScopeSpans.spans`` entry of a span without events or links, from its
        parts (the lean span path encodes without building a ``ReadableSpan``)."""
        parts = [
            b"\x0a\x10",
            context.trace_id.to_bytes(16, "big"),
            b"\x12\x08",
            context.span_id.to_bytes(8, "big"),
        ]
        state = context.trace_state
        if state:
            parts.append(_field(b"\x1a", ",".join(f"{k}={v}" for k, v in state.items()).encode()))
        if parent is not None:
            parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
        parts.append(_field(b"\x2a", name.encode()))
        parts += (b"\x30", _varint(kind.value + 1))  # SpanKind.X → SPAN_KIND_X
        if start_time:
            parts += (b"\x39", _FIXED64(start_time))
        if end_time:
            parts += (b"\x41", _FIXED64(end_time))
        by_key = self._attributes
        for key, value in (attributes or {}).items():
            # Cached per key, then per value; the type check keeps True, 1 and 1.0 apart.
            values = by_key.get(key)
            if values is None:
                values = {} if len(by_key) < self.MAX_KEYS else None
                if values is not None:
                    by_key[key] = values
            hit = values.get(value) if values is not None else None
            if hit is not None and hit[0] is type(value):
                parts.append(hit[1])
                continue
            entry = self._attribute(b"\x4a", key, value)
            if entry is None:
                return None
            if values is not None and len(values) < self.VALUES_PER_KEY:
                # A key with many values (ids, paths) fills its share once and then
                # is encoded each time: bounded memory, no churn.
                values[value] = (type(value), entry)
            parts.append(entry)
        # Status: message = 2, code = 3
        status_body = _field(b"\x12", status.description.encode()) if status.description else b""
        if status.status_code.value:
            status_body += b"\x18" + _varint(status.status_code.value)
        parts.append(_field(b"\x7a", status_body))
        flags = _FLAG_HAS_IS_REMOTE
        if parent is not None and parent.is_remote:
            flags |= _FLAG_IS_REMOTE
        parts += (b"\x85\x01", _FIXED32(flags))
        return _field(b"\x12", b"".join(parts))
