"""The counting batch span processor: bounded, off the request path, every span counted;
and the scrape-time metrics (token cache hit ratio, spans exported/dropped)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanContext, TraceFlags
from prometheus_client import CollectorRegistry, generate_latest

from authz.check import Checker
from authz.compiled import compile_policy
from authz.identity.jwt import TokenCacheStats
from authz.metrics import AuthzMetrics
from authz.span_export import (
    CountingBatchSpanProcessor,
    SpanExportSettingError,
    settings_from_env,
)
from authz.tracing import DecisionSpans
from tests import authz_helpers as testing


class Recording(SpanExporter):
    """Keeps exported spans; blocks while ``gate`` is clear; answers ``result``."""

    def __init__(self, result: SpanExportResult = SpanExportResult.SUCCESS) -> None:
        self.spans: list[ReadableSpan] = []
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.result = result
        self.entered = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.gate.wait(10)
        self.spans.extend(spans)
        self.batches.append(len(spans))
        return self.result

    def shutdown(self) -> None:
        pass


def spans(provider: TracerProvider, count: int) -> list[ReadableSpan]:
    tracer = provider.get_tracer("t")
    out = []
    for i in range(count):
        span = tracer.start_span(f"s{i}")
        span.end()
        out.append(span)
    return out  # type: ignore[return-value]


def test_exports_in_batches_and_counts() -> None:
    exporter = Recording()
    processor = CountingBatchSpanProcessor(
        exporter, max_queue_size=100, max_export_batch_size=10, schedule_delay_millis=5000
    )
    for span in spans(TracerProvider(), 35):
        processor.on_end(span)
    assert processor.force_flush(5000)
    assert len(exporter.spans) == 35
    assert max(exporter.batches) == 10
    assert processor.stats() == {
        "exported": 35,
        "dropped_queue_full": 0,
        "dropped_export_failed": 0,
        "queued": 0,
    }
    processor.shutdown()


def test_full_queue_drops_and_counts_without_blocking() -> None:
    exporter = Recording()
    exporter.gate.clear()  # the collector hangs
    processor = CountingBatchSpanProcessor(
        exporter, max_queue_size=20, max_export_batch_size=5, schedule_delay_millis=10
    )
    made = spans(TracerProvider(), 5)
    for span in made:
        processor.on_end(span)
    assert exporter.entered.wait(5)  # the worker holds one batch of 5 in export()
    started = time.perf_counter()
    for span in spans(TracerProvider(), 100):
        processor.on_end(span)
    assert time.perf_counter() - started < 0.5  # never waits for the exporter
    assert processor.queued == 20
    assert processor.dropped_queue_full == 80
    exporter.gate.set()
    assert processor.force_flush(5000)
    assert processor.exported == 25
    # The newest spans were kept: the held batch, then the last 20 handed in.
    assert [s.name for s in exporter.spans[5:]] == [f"s{i}" for i in range(80, 100)]
    assert processor.exported + processor.dropped_queue_full == 105
    processor.shutdown()


def test_failed_batches_are_counted_as_dropped() -> None:
    processor = CountingBatchSpanProcessor(
        Recording(SpanExportResult.FAILURE), max_queue_size=50, max_export_batch_size=8
    )
    for span in spans(TracerProvider(), 20):
        processor.on_end(span)
    assert processor.force_flush(5000)
    assert (processor.exported, processor.dropped_export_failed) == (0, 20)
    processor.shutdown()


def test_an_exporter_that_raises_does_not_stop_the_worker() -> None:
    class Raising(Recording):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            if not self.batches:
                self.batches.append(-1)
                raise RuntimeError("exporter bug")
            return super().export(spans)

    exporter = Raising()
    processor = CountingBatchSpanProcessor(exporter, max_queue_size=50, max_export_batch_size=4)
    for span in spans(TracerProvider(), 4):
        processor.on_end(span)
    assert processor.force_flush(5000)
    for span in spans(TracerProvider(), 4):
        processor.on_end(span)
    assert processor.force_flush(5000)
    assert (processor.dropped_export_failed, processor.exported) == (4, 4)
    processor.shutdown()


def test_unsampled_spans_are_not_queued() -> None:
    exporter = Recording()
    processor = CountingBatchSpanProcessor(exporter)
    unsampled = SpanContext(1, 2, is_remote=False, trace_flags=TraceFlags(TraceFlags.DEFAULT))
    for _ in range(10):  # a recording but unsampled span (RECORD_ONLY sampling)
        processor.on_end(ReadableSpan("s", context=unsampled))
    assert processor.force_flush(5000)
    assert processor.stats()["exported"] == 0 and exporter.spans == []
    processor.shutdown()


def test_shutdown_exports_what_is_queued() -> None:
    exporter = Recording()
    processor = CountingBatchSpanProcessor(
        exporter, max_queue_size=100, max_export_batch_size=50, schedule_delay_millis=60_000
    )
    for span in spans(TracerProvider(), 7):
        processor.on_end(span)
    processor.shutdown()
    assert len(exporter.spans) == 7
    processor.on_end(spans(TracerProvider(), 1)[0])  # after shutdown: ignored
    assert processor.queued == 0


def test_settings_from_env_defaults_and_errors() -> None:
    assert settings_from_env({})["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] == 64
    assert settings_from_env({"OTEL_BSP_MAX_QUEUE_SIZE": "512"})["OTEL_BSP_MAX_QUEUE_SIZE"] == 512
    with pytest.raises(SpanExportSettingError, match="OTEL_BSP_SCHEDULE_DELAY='soon'"):
        settings_from_env({"OTEL_BSP_SCHEDULE_DELAY": "soon"})
    with pytest.raises(SpanExportSettingError, match="OTEL_BSP_MAX_QUEUE_SIZE='-1'"):
        settings_from_env({"OTEL_BSP_MAX_QUEUE_SIZE": "-1"})
    with pytest.raises(SpanExportSettingError, match="must not exceed"):
        settings_from_env({"OTEL_BSP_MAX_QUEUE_SIZE": "8", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "9"})


def test_decision_spans_take_the_lean_path_through_it() -> None:
    """The lean path (no SDK start/end) is allowed with this processor, and its spans
    arrive whole."""
    exporter = Recording()
    processor = CountingBatchSpanProcessor(exporter, max_export_batch_size=1)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("meshward.authz")
    spans_ = DecisionSpans(tracer)
    assert spans_._lean and spans_._lean_now()
    key = testing.rsa_key()
    checker = Checker(compile_policy(testing.demo_policy(testing.jwks(key))), tracer)
    checker.check(testing.check_request("GET", "/orders/1"), ())
    assert processor.force_flush(5000)
    assert [s.name for s in exporter.spans] == ["meshward.authz.check"]
    processor.shutdown()


def scrape(registry: CollectorRegistry) -> dict[str, float]:
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_read_token_cache_spans_and_log_at_scrape() -> None:
    key = testing.rsa_key()
    stats = TokenCacheStats()
    compiled = compile_policy(testing.demo_policy(testing.jwks(key)), token_cache_stats=stats)
    registry = CollectorRegistry()
    metrics = AuthzMetrics(registry)
    exporter = Recording()
    processor = CountingBatchSpanProcessor(exporter, max_export_batch_size=1)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    metrics.read_at_scrape.token_cache = stats
    metrics.read_at_scrape.spans = processor
    metrics.read_at_scrape.decision_log_dropped = lambda: 3
    checker = Checker(compiled, provider.get_tracer("t"), metrics)
    token = key.sign(testing.claims("alice", ["orders-readers"]))
    request = testing.check_request("GET", "/orders/1", {"authorization": f"Bearer {token}"})
    for _ in range(4):  # one signature check, then three cache hits
        checker.check(request, ())
    assert processor.force_flush(5000)
    values = scrape(registry)
    assert values['meshward_authz_token_cache_lookups_total{result="hit"}'] == 3
    assert values['meshward_authz_token_cache_lookups_total{result="miss"}'] == 1
    assert values["meshward_authz_token_cache_hit_ratio"] == 0.75
    assert values["meshward_authz_spans_exported_total"] == 4
    assert values['meshward_authz_spans_dropped_total{reason="queue_full"}'] == 0
    assert values["meshward_authz_decision_log_dropped_total"] == 3
    decided = sum(v for k, v in values.items() if k.startswith("meshward_authz_decisions_total"))
    assert decided == 4
    processor.shutdown()
