"""Batched span export off the request path, bounded, with every lost span counted.

:class:`CountingBatchSpanProcessor` is the SDK's batch processor contract (``on_end``
queues, a worker thread exports in batches) with the two things a Check path needs
that the SDK's ``BatchSpanProcessor`` does not give without its self-metrics:

* **never block, never grow**: ``on_end`` only appends to a queue of at most
  ``max_queue_size`` spans; when it is full the *oldest* queued span is dropped and
  counted (``queue_full``), as the SDK's queue does, so after an outage the collector
  gets the most recent spans — and no log line per span, which under an outage would
  itself be the slowest part of a Check;
* **every span accounted for**: :attr:`exported`, :attr:`dropped_queue_full` and
  :attr:`dropped_export_failed` (a batch the exporter did not accept, after its own
  retries). ``exported + dropped_* + queued`` is every sampled span handed in.

When the collector is down the exporter (the stock OTLP/gRPC one retries with backoff
until its timeout) keeps the worker busy, the queue fills, and Checks go on deciding
while the drop counter climbs — the behaviour issue 6 asks for. The settings are the
SDK's ``OTEL_BSP_*`` variables; meshward's defaults are smaller batches (64) so the
export thread never holds the GIL long enough to stall a Check.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

_log = logging.getLogger("meshward.tracing")

#: ``OTEL_BSP_*`` variable → (default). Batches of 64 keep each export short.
SETTINGS = {
    "OTEL_BSP_MAX_QUEUE_SIZE": 2048,
    "OTEL_BSP_SCHEDULE_DELAY": 500,
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 64,
    "OTEL_BSP_EXPORT_TIMEOUT": 30000,
}


class SpanExportSettingError(ValueError):
    """An ``OTEL_BSP_*`` variable is not a positive integer (the message names it)."""


def settings_from_env(environ: dict[str, str] | None = None) -> dict[str, int]:
    """The ``OTEL_BSP_*`` settings (milliseconds / span counts), defaults filled in."""
    env = os.environ if environ is None else environ
    out: dict[str, int] = {}
    for name, default in SETTINGS.items():
        raw = env.get(name, "").strip()
        if not raw:
            out[name] = default
            continue
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value <= 0:
            raise SpanExportSettingError(
                f"{name}={raw!r}: must be a positive integer (or unset for {default})"
            )
        out[name] = value
    if out["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] > out["OTEL_BSP_MAX_QUEUE_SIZE"]:
        raise SpanExportSettingError(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE must not exceed OTEL_BSP_MAX_QUEUE_SIZE "
            f"({out['OTEL_BSP_MAX_EXPORT_BATCH_SIZE']} > {out['OTEL_BSP_MAX_QUEUE_SIZE']})"
        )
    return out


class CountingBatchSpanProcessor(SpanProcessor):
    """Queues finished sampled spans and exports them in batches on one thread.

    ``on_start`` and ``_on_ending`` do nothing, so the lean span path of
    :mod:`authz.tracing` may hand it finished spans directly. Counters are plain ints
    written under :attr:`_lock` (shared by ``on_end`` callers and the worker).
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int = SETTINGS["OTEL_BSP_MAX_QUEUE_SIZE"],
        schedule_delay_millis: int = SETTINGS["OTEL_BSP_SCHEDULE_DELAY"],
        max_export_batch_size: int = SETTINGS["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"],
        export_timeout_millis: int = SETTINGS["OTEL_BSP_EXPORT_TIMEOUT"],
        encode: Callable[[ReadableSpan], Any] | None = None,
    ) -> None:
        """``encode``: applied to each span in ``on_end`` (on the thread that ended it);
        the exporter then gets batches of its results (the lean OTLP exporter's
        ``encode_one``, see :mod:`authz.tracing`)."""
        if not 0 < max_export_batch_size <= max_queue_size:
            raise ValueError("need 0 < max_export_batch_size <= max_queue_size")
        self._exporter = exporter
        self._max_queue = max_queue_size
        self._delay = schedule_delay_millis / 1000
        self._batch = max_export_batch_size
        self._timeout = export_timeout_millis / 1000
        self._encode = encode
        self._queue: deque[Any] = deque(maxlen=max_queue_size)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._exporting = False
        self._shutdown = False
        #: Spans the exporter accepted.
        self.exported = 0
        #: Spans dropped because the queue was full (collector slow or down).
        self.dropped_queue_full = 0
        #: Spans in batches the exporter failed (after its own retries) or raised on.
        self.dropped_export_failed = 0
        self._worker = threading.Thread(target=self._run, name="meshward-span-export", daemon=True)
        self._worker.start()

    @classmethod
    def from_env(
        cls, exporter: SpanExporter, encode: Callable[[ReadableSpan], Any] | None = None
    ) -> CountingBatchSpanProcessor:
        """Configured by the ``OTEL_BSP_*`` variables (see :data:`SETTINGS`)."""
        s = settings_from_env()
        return cls(
            exporter,
            max_queue_size=s["OTEL_BSP_MAX_QUEUE_SIZE"],
            schedule_delay_millis=s["OTEL_BSP_SCHEDULE_DELAY"],
            max_export_batch_size=s["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"],
            export_timeout_millis=s["OTEL_BSP_EXPORT_TIMEOUT"],
            encode=encode,
        )

    # -- SpanProcessor -------------------------------------------------------------

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def _on_ending(self, span: Span) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        self.enqueue(span if self._encode is None else self._encode(span))

    @property
    def exporter(self) -> SpanExporter:
        return self._exporter

    @property
    def encodes(self) -> bool:
        """Whether queued spans are encoded as they end (the exporter takes those)."""
        return self._encode is not None

    def enqueue(self, item: Any) -> None:
        """Queue one sampled span as the exporter takes it (already encoded, when this
        processor encodes): what ``on_end`` does after its checks, for a caller that
        made the item itself (the lean span path of :mod:`authz.tracing`)."""
        if self._shutdown:
            return
        queue = self._queue
        if len(queue) >= self._max_queue:  # the append below evicts the oldest
            with self._lock:
                self.dropped_queue_full += 1
        queue.append(item)
        if len(queue) >= self._batch and not self._wake.is_set():
            self._wake.set()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export everything queued now; False if it did not finish in time."""
        deadline = time.monotonic() + timeout_millis / 1000
        self._wake.set()
        with self._lock:
            while self._queue or self._exporting:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wake.set()
                self._idle.wait(min(remaining, 0.05))
        return True

    def shutdown(self) -> None:
        """Export what is queued (bounded by the export timeout), then stop."""
        if self._shutdown:
            return
        self._shutdown = True
        self._wake.set()
        self._worker.join(self._timeout + 1)
        self._exporter.shutdown()

    # -- the worker ----------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._delay)
            self._wake.clear()
            stopping = self._shutdown
            self._drain(everything=stopping)
            if stopping:
                return

    def _drain(self, *, everything: bool) -> None:
        """Export full batches (and, once per wake, a partial one)."""
        while self._queue:
            with self._lock:
                self._exporting = True
            batch = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
            ok = self._export(batch)
            with self._lock:
                if ok:
                    self.exported += len(batch)
                else:
                    self.dropped_export_failed += len(batch)
                self._exporting = False
                self._idle.notify_all()
            if not everything and len(self._queue) < self._batch:
                break
        with self._lock:
            self._idle.notify_all()

    def _export(self, batch: list[Any]) -> bool:
        try:
            return self._exporter.export(batch) is SpanExportResult.SUCCESS
        except Exception:  # an exporter bug must not kill the worker
            _log.exception("span export raised; %d spans dropped", len(batch))
            return False

    def stats(self) -> dict[str, Any]:
        """Counters for metrics and status pages."""
        return {
            "exported": self.exported,
            "dropped_queue_full": self.dropped_queue_full,
            "dropped_export_failed": self.dropped_export_failed,
            "queued": len(self._queue),
        }
