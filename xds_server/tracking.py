"""Versions, ACK/NACK state and convergence of every connected node, plus the metrics.

Shared by both stream protocols (:mod:`xds_server.server` for SotW,
:mod:`xds_server.delta` for Delta): a protocol says *what happened* on its stream
(content sent, unchanged, ACKed, NACKed) and :class:`NodeStatus` keeps the meaning.

Versions here are snapshot versions used as labels for a type's *content*: when a new
snapshot leaves a type's content unchanged, the stream sends nothing for it, and the
type is counted as sent (and ACKed, if the client had ACKed that content) at the new
version. So a node's **applied version** is the newest snapshot version for which every
type it subscribed to is ACKed or unchanged; that snapshot is also what the stream rolls
back to after a NACK.

**Convergence** of a node to version V is the time from the moment
:meth:`XdsService.set_policy <xds_server.service.XdsService.set_policy>` applied V
(:class:`VersionClock`) to the moment the node applied V. It is recorded only for
versions applied while the node was connected: the initial sync of a proxy that
connects later measures its own start-up, not a policy change.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from xds_server import resources as rs
from xds_server.cache import Snapshot

PUSH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONVERGENCE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class XdsMetrics:
    """The ADS server's Prometheus metrics, registered in the given registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.streams = Gauge(
            "meshward_xds_connected_streams", "Open ADS streams.", registry=registry
        )
        self.proxies = Gauge(
            "meshward_xds_connected_proxies",
            "Connected nodes (open ADS streams, SotW or Delta), by node group.",
            ["group"],
            registry=registry,
        )
        self.responses = Counter(
            "meshward_xds_responses",
            "DiscoveryResponses sent, by type.",
            ["type"],
            registry=registry,
        )
        self.nacks = Counter(
            "meshward_xds_nacks",
            "DiscoveryRequests that rejected a response (NACK), by type.",
            ["type"],
            registry=registry,
        )
        self.rollbacks = Counter(
            "meshward_xds_rollbacks",
            "NACKs answered by rolling the node back to its last fully ACKed snapshot.",
            registry=registry,
        )
        self.stale = Counter(
            "meshward_xds_stale_requests",
            "DiscoveryRequests ignored because their nonce was not the latest sent.",
            ["type"],
            registry=registry,
        )
        self.push_duration = Histogram(
            "meshward_xds_push_duration_seconds",
            "Time to write one snapshot push to every stream of a node group.",
            buckets=PUSH_BUCKETS,
            registry=registry,
        )
        self.convergence = Histogram(
            "meshward_xds_convergence_seconds",
            "Time from a policy change to a node having applied it (per node, per version).",
            buckets=CONVERGENCE_BUCKETS,
            registry=registry,
        )


@dataclass(frozen=True)
class AppliedAt:
    """When a snapshot version was applied: wall clock (for status) and monotonic."""

    wall: float
    monotonic: float


class VersionClock:
    """Snapshot version → when :meth:`XdsService.set_policy` applied it (newest ``limit``)."""

    def __init__(self, limit: int = 256) -> None:
        self._limit = limit
        self._times: OrderedDict[str, AppliedAt] = OrderedDict()

    def mark(self, version: str) -> None:
        """Record that ``version`` was applied now (again, if it comes back)."""
        self._times.pop(version, None)
        self._times[version] = AppliedAt(time.time(), time.monotonic())
        while len(self._times) > self._limit:
            self._times.popitem(last=False)

    def applied_at(self, version: str) -> AppliedAt | None:
        return self._times.get(version)


@dataclass
class TypeStatus:
    """One node's view of one type: which version's content it was sent and ACKed.

    ``sent_digest``/``acked_digest`` identify the content (see
    :meth:`Snapshot.digest <xds_server.cache.Snapshot.digest>`); ``None`` as
    ``sent_digest`` means "unknown" (after a NACK the client may hold part of the
    rejected content), so the next push always sends the type. The ``nack_*`` fields
    keep the last NACK of the type (history; the node-level ``error`` is the live one).
    """

    sent: str | None = None
    acked: str | None = None
    nack_version: str | None = None
    nack_error: str | None = None
    nack_at: float | None = None
    sent_digest: str | None = field(default=None, repr=False)
    acked_digest: str | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "acked": self.acked,
            "nack_version": self.nack_version,
            "nack_error": self.nack_error,
            "nack_at": self.nack_at,
        }


class NodeStatus:
    """Versions, errors and convergence of the node behind one stream."""

    def __init__(
        self,
        *,
        stream_id: int,
        node_id: str,
        group: str,
        protocol: str,
        peer: str,
        clock: VersionClock | None = None,
        metrics: XdsMetrics | None = None,
    ) -> None:
        self.stream_id = stream_id
        self.node_id = node_id
        self.group = group
        self.protocol = protocol
        self.peer = peer
        self.connected_at = time.time()
        self._connected_monotonic = time.monotonic()
        self._clock = clock
        self._metrics = metrics
        self.types: dict[str, TypeStatus] = {}
        self.applied_version: str | None = None
        #: The last snapshot every subscribed type ACKed: the rollback target.
        self.applied_snapshot: Snapshot | None = None
        self.last_ack_at: float | None = None
        self.converged_version: str | None = None
        self.convergence_seconds: float | None = None
        self.error: str | None = None
        self.error_type: str | None = None
        self.error_version: str | None = None
        self.error_at: float | None = None

    def subscribe(self, type_url: str) -> TypeStatus:
        return self.types.setdefault(type_url, TypeStatus())

    def sent(self, type_url: str, version: str, digest: str | None) -> None:
        """A response of ``version`` was written; ``digest`` is its content (None: partial)."""
        state = self.types[type_url]
        state.sent = version
        state.sent_digest = digest

    def unchanged(self, type_url: str, version: str, digest: str) -> None:
        """``version`` leaves the type as the client already has it: nothing was sent.

        If the client had ACKed everything sent for the type, it counts as ACKed at
        ``version`` too; otherwise the pending ACK will carry it there.
        """
        state = self.types[type_url]
        if state.acked_digest is not None and state.acked_digest == state.sent_digest:
            state.acked = version
            state.acked_digest = digest
        state.sent = version
        state.sent_digest = digest

    def acked(self, type_url: str) -> None:
        """The client ACKed the latest response of the type."""
        state = self.types[type_url]
        state.acked = state.sent
        state.acked_digest = state.sent_digest
        self.last_ack_at = time.time()

    def nacked(self, type_url: str, error: str) -> str | None:
        """The client rejected the latest response of the type; returns its version."""
        state = self.types[type_url]
        rejected = state.sent
        state.nack_version = rejected
        state.nack_error = error
        state.nack_at = time.time()
        state.sent_digest = None
        self.error = error
        self.error_type = rs.short_name(type_url)
        self.error_version = rejected
        self.error_at = state.nack_at
        return rejected

    def check_applied(self, snapshot: Snapshot | None) -> bool:
        """If every subscribed type is ACKed at ``snapshot``, make it the applied one.

        A newly applied version clears the node's error and records its convergence.
        Returns whether ``snapshot`` is the applied snapshot now.
        """
        if snapshot is None or not self.types:
            return False
        version = snapshot.version
        if any(state.acked != version for state in self.types.values()):
            return False
        self.applied_snapshot = snapshot
        if self.applied_version == version:
            return True
        self.applied_version = version
        self.error = self.error_type = self.error_version = self.error_at = None
        applied_at = self._clock.applied_at(version) if self._clock is not None else None
        if applied_at is not None and applied_at.monotonic >= self._connected_monotonic:
            self.converged_version = version
            self.convergence_seconds = time.monotonic() - applied_at.monotonic
            if self._metrics is not None:
                self._metrics.convergence.observe(self.convergence_seconds)
        return True

    def as_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream_id,
            "id": self.node_id,
            "group": self.group,
            "protocol": self.protocol,
            "peer": self.peer,
            "connected_at": self.connected_at,
            "applied_version": self.applied_version,
            "last_ack_at": self.last_ack_at,
            "converged_version": self.converged_version,
            "convergence_seconds": self.convergence_seconds,
            "error": self.error,
            "error_type": self.error_type,
            "error_version": self.error_version,
            "error_at": self.error_at,
            "types": {rs.short_name(t): s.as_dict() for t, s in self.types.items()},
        }
