"""A built-in OTLP/gRPC trace receiver (opentelemetry-proto's ``TraceService``).

It keeps the most recent spans in memory (bounded) as plain :class:`ReceivedSpan`
records, so tests and ``meshward`` tools can see what Envoy and authz exported
without an external collector. It is a real OTLP endpoint: point
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or Envoy's OpenTelemetry tracer) at it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, flattened: ids as lowercase hex, attributes as Python values."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int


def _value(v: common_pb2.AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


def flatten(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """Turn one OTLP export request into flat span records."""
    out = []
    for rs in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
        service = str(resource.get("service.name", ""))
        for ss in rs.scope_spans:
            for span in ss.spans:
                out.append(
                    ReceivedSpan(
                        service=service,
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=span.kind,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes={kv.key: _value(kv.value) for kv in span.attributes},
                        status_code=span.status.code,
                    )
                )
    return out


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(  # noqa: N802 - gRPC method name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._receiver.add(flatten(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """An OTLP/gRPC trace endpoint on ``listen`` that remembers the last ``capacity`` spans."""

    def __init__(self, listen: str = "127.0.0.1:0", capacity: int = 100_000) -> None:
        self._spans: deque[ReceivedSpan] = deque(maxlen=capacity)
        self._cond = threading.Condition()
        self._listen = listen
        self._server: grpc.Server | None = None
        self.port = 0

    def start(self) -> int:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self), server
        )
        self.port = server.add_insecure_port(self._listen)
        server.start()
        self._server = server
        return self.port

    @property
    def endpoint(self) -> str:
        """The value for ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0.5).wait()
            self._server = None

    def add(self, spans: Iterable[ReceivedSpan]) -> None:
        with self._cond:
            self._spans.extend(spans)
            self._cond.notify_all()

    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            return list(self._spans)

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> list[ReceivedSpan]:
        """Block until ``predicate(span)`` holds for at least one span; return the matches."""
        with self._cond:
            self._cond.wait_for(lambda: any(predicate(s) for s in self._spans), timeout)
            return [s for s in self._spans if predicate(s)]
