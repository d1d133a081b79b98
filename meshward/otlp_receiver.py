"""A built-in OTLP/gRPC trace receiver (opentelemetry-proto's ``TraceService``).

It is a real OTLP endpoint: point ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or Envoy's
OpenTelemetry tracer) at it. Each export is flattened into :class:`ReceivedSpan`
records, kept in memory (the most recent ``capacity``: tests read them there) and
handed to ``on_spans`` (``meshward otlp-receiver`` appends them to the spans file,
:mod:`meshward.spans_file`). It also serves ``grpc.health.v1`` (SERVING for ``""`` and
the TraceService until it stops).

Memory stays bounded: the span buffer has a fixed capacity, gRPC caps each export at
4 MiB, and at most :data:`MAX_CONCURRENT_EXPORTS` exports are in flight (more are
refused with RESOURCE_EXHAUSTED, which OTLP exporters retry).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

from meshward.spans_file import ReceivedSpan

__all__ = ["OtlpReceiver", "ReceivedSpan", "ReceiverListenError", "flatten", "serve"]

TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
MAX_CONCURRENT_EXPORTS = 64
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_log = logging.getLogger("meshward.otlp_receiver")


class ReceiverListenError(Exception):
    """The receiver cannot listen on its address (message names it and the fix)."""


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
    """An OTLP/gRPC trace endpoint on ``listen`` that remembers the last ``capacity`` spans
    and passes every export's spans to ``on_spans`` (on a gRPC worker thread)."""

    def __init__(
        self,
        listen: str = "127.0.0.1:0",
        capacity: int = 100_000,
        on_spans: Callable[[list[ReceivedSpan]], None] | None = None,
    ) -> None:
        self._spans: deque[ReceivedSpan] = deque(maxlen=capacity)
        self._cond = threading.Condition()
        self._listen = listen
        self._on_spans = on_spans
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer()
        #: Spans received, and spans that ``on_spans`` failed to take (disk full, ...).
        self.received = 0
        self.failed = 0
        self._failure_logged = False
        self.port = 0

    def start(self) -> int:
        """Bind and serve; returns the port. Raises :class:`ReceiverListenError`."""
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp"),
            maximum_concurrent_rpcs=MAX_CONCURRENT_EXPORTS,
            # Fail loudly on a port already in use instead of sharing it.
            options=[("grpc.so_reuseport", 0)],
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            port = int(server.add_insecure_port(self._listen))
        except RuntimeError:
            port = 0
        if port == 0:
            server.stop(0)
            raise ReceiverListenError(
                f"cannot listen on {self._listen}: the address is in use or not local "
                "(is another OTLP collector running there? stop it, or choose another "
                "address with --listen HOST:PORT)"
            )
        for name in ("", TRACE_SERVICE):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        server.start()
        self._server = server
        self.port = port
        return port

    @property
    def endpoint(self) -> str:
        """The value for ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self, grace: float = 0.5) -> None:
        """Report NOT_SERVING, then let exports in flight finish (at most ``grace`` s)."""
        if self._server is not None:
            self._health.enter_graceful_shutdown()
            self._server.stop(grace).wait()
            self._server = None

    def add(self, spans: Iterable[ReceivedSpan]) -> None:
        batch = list(spans)
        with self._cond:
            self.received += len(batch)
            self._spans.extend(batch)
            self._cond.notify_all()
        if self._on_spans is None or not batch:
            return
        try:
            self._on_spans(batch)
        except Exception as error:  # the exporter cannot fix our disk: count, log once
            self.failed += len(batch)
            if not self._failure_logged:
                self._failure_logged = True
                _log.error(
                    "cannot store received spans; they are counted and dropped (logged once)",
                    extra={"error": str(error)},
                )

    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            return list(self._spans)

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> list[ReceivedSpan]:
        """Block until ``predicate(span)`` holds for at least one span; return the matches."""
        with self._cond:
            self._cond.wait_for(lambda: any(predicate(s) for s in self._spans), timeout)
            return [s for s in self._spans if predicate(s)]


def serve(listen: str, spans_file: str, max_bytes: int, backups: int) -> int:
    """Receive spans into ``spans_file`` until SIGTERM/SIGINT (``meshward otlp-receiver``).

    Returns 0 after a clean stop, 1 when it cannot start (address in use, file not
    writable), 2 for a malformed ``listen``.
    """
    from meshward.http_status import parse_listen
    from meshward.logs import setup
    from meshward.spans_file import SpansFileError, SpansFileWriter

    log = setup("info", "meshward.otlp_receiver")
    try:
        parse_listen(listen)
    except ValueError as error:
        print(f"meshward otlp-receiver: --listen: {error}", file=sys.stderr)
        return 2
    try:
        writer = SpansFileWriter(spans_file, max_bytes, backups)
    except SpansFileError as error:
        print(f"meshward otlp-receiver: {error}", file=sys.stderr)
        return 1
    # The file is the record; keeping no spans in memory keeps the process small.
    receiver = OtlpReceiver(listen, capacity=0, on_spans=writer.write)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in _STOP_SIGNALS}
    try:
        try:
            port = receiver.start()
        except ReceiverListenError as error:
            print(f"meshward otlp-receiver: {error}", file=sys.stderr)
            return 1
        log.info(
            "otlp receiver serving",
            extra={"listen": listen, "port": port, "spans_file": spans_file},
        )
        while not stop.wait(0.5):
            pass
        receiver.stop(grace=2.0)
        log.info(
            "otlp receiver stopped",
            extra={"received": receiver.received, "failed": receiver.failed},
        )
        return 0
    finally:
        writer.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
