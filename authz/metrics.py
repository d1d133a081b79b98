"""Prometheus metrics of one authz service, in its own registry (no global registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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


class AuthzMetrics:
    """Decisions by decision and reason, Check latency, the policy version served."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
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
