"""The built-in OTLP receiver in-process, over real gRPC: spans from the real OTLP
exporter reach memory and the sink, health is served, a busy port is a clear error."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from meshward.otlp_receiver import TRACE_SERVICE, OtlpReceiver, ReceiverListenError
from meshward.spans_file import ReceivedSpan, SpansFileWriter, read_spans


@pytest.fixture
def receiver_and_file(tmp_path: Path) -> Iterator[tuple[OtlpReceiver, Path]]:
    path = tmp_path / "spans.jsonl"
    writer = SpansFileWriter(path)
    receiver = OtlpReceiver(on_spans=writer.write)
    receiver.start()
    try:
        yield receiver, path
    finally:
        receiver.stop()
        writer.close()


def _export(port: int) -> tuple[str, str, str]:
    provider = TracerProvider(resource=Resource.create({"service.name": "unit"}))
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}", insecure=True))
    )
    tracer = provider.get_tracer("test")
    with (
        tracer.start_as_current_span("parent") as parent,
        tracer.start_as_current_span("child", attributes={"n": 7, "raw": b"\x00\x01"}) as c,
    ):
        pass
    provider.shutdown()
    ctx = parent.get_span_context()
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", f"{c.get_span_context().span_id:016x}"


def test_exported_spans_reach_memory_and_the_spans_file(
    receiver_and_file: tuple[OtlpReceiver, Path],
) -> None:
    receiver, path = receiver_and_file
    trace_id, parent_id, child_id = _export(receiver.port)
    spans = receiver.wait_for(lambda s: s.trace_id == trace_id and s.name == "parent", 10)
    assert len(spans) == 1
    on_disk = {s.name: s for s in read_spans(path)}
    assert set(on_disk) == {"parent", "child"}
    child = on_disk["child"]
    assert (child.trace_id, child.span_id, child.parent_span_id) == (trace_id, child_id, parent_id)
    assert on_disk["parent"].parent_span_id == ""
    assert child.service == "unit"
    assert child.attributes == {"n": 7, "raw": "0001"}  # bytes as hex on disk
    assert child.end_ns >= child.start_ns > 0
    assert receiver.received == 2 and receiver.failed == 0


def test_health_is_serving(
    receiver_and_file: tuple[OtlpReceiver, Path],
) -> None:
    receiver, _ = receiver_and_file
    with grpc.insecure_channel(f"127.0.0.1:{receiver.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", TRACE_SERVICE):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_busy_port_is_an_error_naming_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ReceiverListenError, match=rf"cannot listen on {address}: .*--listen"):
            OtlpReceiver(address).start()


def test_a_failing_sink_is_counted_and_the_export_still_succeeds() -> None:
    def broken(spans: list[ReceivedSpan]) -> None:
        raise OSError("No space left on device")

    receiver = OtlpReceiver(capacity=0, on_spans=broken)
    receiver.start()
    request = trace_service_pb2.ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add().spans
    for span_id in (b"\x01" * 8, b"\x02" * 8):
        spans.add(trace_id=b"\x0a" * 16, span_id=span_id, name="s")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{receiver.port}") as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)  # type: ignore[no-untyped-call]
            stub.Export(request, timeout=5)  # answered OK: retrying would not help
        assert receiver.received == 2
        assert receiver.failed == 2
        assert receiver.spans() == []  # capacity 0 keeps nothing in memory
    finally:
        receiver.stop()
