"""Prometheus metrics of one authz service, in its own registry (no global registry).

Hot-path metrics (decisions, latency) are prometheus_client children resolved once.
Counts kept elsewhere as plain integers — the token cache's hits and misses, the span
export processor's exported/dropped spans, the decision log's dropped lines — are read
at scrape time by :class:`_Gauges`, so a Check pays nothing extra for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from authz import reasons

#: Check handling time buckets (seconds): the handler itself costs tens of µs.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
)


class _Gauges(Collector):
    """Series read at scrape time from counters other objects keep."""

    def __init__(self) -> None:
        self.token_cache: Any = None  # authz.identity.jwt.TokenCacheStats
        self.spans: Any = None  # authz.span_export.CountingBatchSpanProcessor
        self.decision_log_dropped: Callable[[], int] | None = None

    def collect(self) -> Iterator[Any]:
        if self.token_cache is not None:
            hits, misses = self.token_cache.hits, self.token_cache.misses
            lookups = CounterMetricFamily(
                "meshward_authz_token_cache_lookups",
                "Verified-token cache lookups by result (hit: no signature check).",
                labels=["result"],
            )
            lookups.add_metric(["hit"], hits)
            lookups.add_metric(["miss"], misses)
            yield lookups
            yield GaugeMetricFamily(
                "meshward_authz_token_cache_hit_ratio",
                "Token cache hits / lookups since start (0 before any lookup).",
                value=hits / (hits + misses) if hits + misses else 0.0,
            )
        if self.spans is not None:
            stats = self.spans.stats()
            exported = CounterMetricFamily(
                "meshward_authz_spans_exported",
                "Decision spans the OTLP exporter accepted.",
            )
            exported.add_metric([], stats["exported"])
            yield exported
            dropped = CounterMetricFamily(
                "meshward_authz_spans_dropped",
                "Decision spans lost: queue_full (collector slow or down, the queue is "
                "bounded) or export_failed (the exporter gave up on the batch).",
                labels=["reason"],
            )
            dropped.add_metric(["queue_full"], stats["dropped_queue_full"])
            dropped.add_metric(["export_failed"], stats["dropped_export_failed"])
            yield dropped
            yield GaugeMetricFamily(
                "meshward_authz_spans_queued",
                "Decision spans waiting for export.",
                value=stats["queued"],
            )
        if self.decision_log_dropped is not None:
            lines = CounterMetricFamily(
                "meshward_authz_decision_log_dropped",
                "Decision-log lines dropped because the writer fell behind.",
            )
            lines.add_metric([], self.decision_log_dropped())
            yield lines


class AuthzMetrics:
    """Decisions by decision and reason, Check latency, the policy version served, token
    cache hits, JWKS fetches, span export and decision-log losses."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        #: Attach the token cache stats, span processor and decision log here.
        self.read_at_scrape = _Gauges()
        registry.register(self.read_at_scrape)
        self._decisions = Counter(
            "meshward_authz_decisions",
            "Authorization decisions by outcome and reason code.",
            ["decision", "reason"],
            registry=registry,
        )
        self._latency = Histogram(
            "meshward_authz_check_duration_seconds",
            "Time spent handling one Check (parse, decide, respond, span, log), "
            "excluding gRPC transport.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._policy = Gauge(
            "meshward_authz_policy_info",
            "The policy version authz decides with (value 1).",
            ["version"],
            registry=registry,
        )
        self._reloads = Counter(
            "meshward_authz_policy_loads",
            "Policies compiled and swapped in (including the first).",
            registry=registry,
        )
        self._jwks_fetches = Counter(
            "meshward_authz_jwks_fetches",
            "Fetches of issuers' jwks_uri key sets, by URL and outcome (success, error).",
            ["jwks_uri", "outcome"],
            registry=registry,
        )
        # Resolve every label child once: the hot path then costs one dict lookup.
        self._children = {
            (allowed, reason): self._decisions.labels("allow" if allowed else "deny", reason)
            for reason in reasons.ALL
            for allowed in ((True,) if reason == reasons.ALLOWED else (False,))
        }

    def observe(self, allowed: bool, reason: str, seconds: float) -> None:
        child = self._children.get((allowed, reason))
        if child is None:
            child = self._decisions.labels("allow" if allowed else "deny", reason)
        child.inc()
        self._latency.observe(seconds)

    def policy_loaded(self, version: str) -> None:
        self._policy.clear()
        self._policy.labels(version).set(1)
        self._reloads.inc()

    def jwks_fetched(self, jwks_uri: str, outcome: str) -> None:
        """One JWKS fetch ended (:class:`authz.identity.jwks_remote.JwksRegistry`'s
        ``on_fetch``)."""
        self._jwks_fetches.labels(jwks_uri, outcome).inc()
