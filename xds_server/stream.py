"""What SotW and Delta ADS streams share: identity, writes, push targets and rollback.

The counterpart of go-control-plane's ``pkg/server/stream``. A :class:`Stream` is one
open ADS stream of either protocol; the protocol subclasses
(:class:`xds_server.server.SotwStream`, :class:`xds_server.delta.DeltaStream`) decide
what goes on the wire, this class decides *which snapshot* the stream is brought to:

* Normally the group's current snapshot, pushing only the types whose content differs
  from what the stream last sent (``push only what changed``).
* After a NACK of version V, the node is **rolled back** to its last fully ACKed
  snapshot (:attr:`NodeStatus.applied_snapshot <xds_server.tracking.NodeStatus>`):
  every type whose content differs from it is pushed again, in push order, so the
  types the client accepted at V return to the old consistent set too. V is never
  sent to this stream again; a newer snapshot is pushed normally. With no ACKed
  snapshot yet (the first config was rejected) the stream holds and waits for a new
  version, answering only fresh subscriptions.

Writes go through :meth:`Stream.write`: the shared pre-serialized body plus a nonce
(:func:`with_nonce`). When a new snapshot fans out to every stream of a group (a
:class:`PushRound`), the nonce is the round's, not the stream's, so the framed bytes
are built once per round and shared by all N streams: a nonce only has to be unique
per response on one stream, and each stream gets each round's response once. Other
responses (first request, name change, rollback) get a per-stream nonce. Large
writes (a 1,000-route RDS is ~300 KB) take a slot of a server-wide semaphore, so a
fan-out to thousands of streams never holds thousands of copies in gRPC's send
buffers at once. A failed write (peer gone, cancelled, ``INTERNAL``) raises
:class:`StreamClosedError`, which just ends the stream.

:class:`StreamCallbacks` (go-control-plane's ``server.Callbacks``) lets the service
follow stream life without touching the protocol: a stream opened (with the node of its
first request), first *applied* a snapshot (every subscribed type ACKed), closed. The
xDS service uses them to register authz replicas (:mod:`xds_server.replicas`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import grpc
from envoy.config.core.v3 import base_pb2

from xds_server import resources as rs
from xds_server.cache import Snapshot, SnapshotCache
from xds_server.tracking import NodeStatus, VersionClock, XdsMetrics

log = logging.getLogger("meshward.xds")

#: The nonce field of both DiscoveryResponse and DeltaDiscoveryResponse (field 5, bytes).
_NONCE_TAG = bytes([(5 << 3) | 2])
#: At most this many rejected versions are remembered per stream.
_REJECTED_LIMIT = 64
#: Writes larger than this take a slot of the server's write semaphore.
LARGE_WRITE_BYTES = 64 * 1024


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def with_nonce(body: bytes, nonce: str) -> bytes:
    """``body`` (a serialized (Delta)DiscoveryResponse without nonce) with ``nonce`` set.

    Protobuf parsers merge fields in any order, so appending the encoded field is the
    same message as setting it before serializing.
    """
    raw = nonce.encode()
    return body + _NONCE_TAG + _varint(len(raw)) + raw


class StreamClosedError(Exception):
    """The peer is gone (closed, cancelled, INTERNAL): end the handler quietly."""


class StreamCallbacks(Protocol):
    """What the ADS server tells its owner about stream life (all on the event loop).

    Callbacks must not block and must not write to streams; an exception is logged
    and the stream goes on.
    """

    def on_stream_open(self, stream: Stream, node: base_pb2.Node) -> None:
        """``stream`` opened; ``node`` is the node of its first request."""

    def on_stream_applied(self, stream: Stream) -> None:
        """``stream``'s node applied a snapshot for the first time on this stream (every
        type it subscribed to is ACKed): it holds a complete configuration."""

    def on_stream_closed(self, stream: Stream) -> None:
        """``stream`` ended (any reason); it is no longer served."""

    def holds_group(self, group: str) -> bool:
        """Whether the owner holds ``group``'s snapshot back on purpose for now (its
        proxies wait, keeping what they have; not worth a warning)."""


class Stream:
    """One open ADS stream (either protocol) of one node. Single-threaded (event loop)."""

    protocol: ClassVar[str] = ""

    def __init__(
        self,
        *,
        stream_id: int,
        node_id: str,
        group: str,
        peer: str,
        context: grpc.aio.ServicerContext[Any, Any],
        cache: SnapshotCache,
        metrics: XdsMetrics | None = None,
        clock: VersionClock | None = None,
        write_slots: asyncio.Semaphore | None = None,
    ) -> None:
        self.stream_id = stream_id
        self.group = group
        self.status = NodeStatus(
            stream_id=stream_id,
            node_id=node_id,
            group=group,
            protocol=self.protocol,
            peer=peer,
            clock=clock,
            metrics=metrics,
        )
        self._context = context
        self._cache = cache
        self._metrics = metrics
        self._nonces = itertools.count(1)
        self._write_slots = write_slots
        #: The fan-out round being handled, whose nonce and framed bytes are shared.
        self._round: PushRound | None = None
        #: Versions this stream rejected, oldest first: never sent to it again.
        self._rejected: dict[str, None] = {}
        #: The snapshot the stream was last brought to (current or rollback target).
        self.pushed: Snapshot | None = None
        #: Called once, the first time the node applies a snapshot on this stream.
        self.on_first_applied: Callable[[Stream], None] | None = None
        self._applied_once = False

    @property
    def node_id(self) -> str:
        return self.status.node_id

    # -- protocol hooks -------------------------------------------------------------

    async def on_request(self, request: Any) -> None:
        """Handle one client request (a DiscoveryRequest or DeltaDiscoveryRequest)."""
        raise NotImplementedError

    def subscribed_types(self) -> Sequence[str]:
        """Type URLs the client has subscribed to on this stream."""
        raise NotImplementedError

    async def push(self, snapshot: Snapshot, types: Sequence[str], force: str | None) -> None:
        """Bring ``types`` (in push order) to ``snapshot``, sending only what differs.

        ``force`` is a type that gets a response even if nothing differs (a fresh
        subscription: the client waits for an answer).
        """
        raise NotImplementedError

    def protocol_state(self) -> dict[str, dict[str, Any]]:
        """Per short type name: protocol details for the status page (nonce, names...)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------

    async def on_snapshot(self, round_: PushRound | None = None) -> None:
        """The group's snapshot changed: bring the stream to it (as part of ``round_``)."""
        self._round = round_
        try:
            await self.bring()
        finally:
            self._round = None

    async def bring(self, force: str | None = None) -> None:
        """Bring every subscribed type to the stream's target snapshot (see module doc)."""
        current = self._cache.get_snapshot(self.group)
        if current is None:
            return
        target = self._target(current)
        if target is None:  # current rejected and nothing ACKed to fall back on: hold
            if force is not None:
                await self.push(current, [force], force)
            return
        await self.push(target, self._ordered(), force)
        self.pushed = target
        self._check_applied(target)

    def acked(self, type_url: str) -> None:
        """The latest response of ``type_url`` was ACKed."""
        self.status.acked(type_url)
        self._check_applied(self.pushed)

    def _check_applied(self, snapshot: Snapshot | None) -> None:
        if self.status.check_applied(snapshot) and not self._applied_once:
            self._applied_once = True
            if self.on_first_applied is not None:
                try:
                    self.on_first_applied(self)
                except Exception:
                    log.exception("stream callback failed", extra={"node": self.node_id})

    def nacked(self, type_url: str, error: str, kept_version: str | None) -> None:
        """Record a NACK of the latest response of ``type_url`` (then call :meth:`bring`).

        Marks the rejected version as never to be sent again, logs and counts it.
        """
        version = self.status.nacked(type_url, error)
        if version is not None:
            self._rejected[version] = None
            while len(self._rejected) > _REJECTED_LIMIT:
                del self._rejected[next(iter(self._rejected))]
        fallback = self.status.applied_snapshot
        rollback = None
        if fallback is not None and fallback.version != version:
            rollback = fallback.version
        if self._metrics is not None:
            self._metrics.nacks.labels(rs.short_name(type_url)).inc()
            if rollback is not None:
                self._metrics.rollbacks.inc()
        log.warning(
            "xds NACK: proxy rejected %s version %s",
            rs.short_name(type_url),
            version,
            extra={
                "node": self.node_id,
                "group": self.group,
                "protocol": self.protocol,
                "type": rs.short_name(type_url),
                "version": version,
                "kept_version": kept_version,
                "rollback_to": rollback,
                "error": error,
            },
        )

    def count_stale(self, type_url: str) -> None:
        if self._metrics is not None:
            self._metrics.stale.labels(rs.short_name(type_url)).inc()

    async def write(self, type_url: str, body: bytes) -> str:
        """Send ``body`` with a fresh nonce (the round's, during a fan-out); returns it."""
        if self._round is not None:
            nonce, framed = self._round.frame(body)
        else:
            nonce = f"{self.stream_id}-{next(self._nonces)}"
            framed = with_nonce(body, nonce)
        try:
            if self._write_slots is not None and len(framed) > LARGE_WRITE_BYTES:
                async with self._write_slots:
                    await self._context.write(framed)
            else:
                await self._context.write(framed)
        except Exception as exc:  # closed/cancelled/INTERNAL: the stream is gone
            raise StreamClosedError from exc
        if self._metrics is not None:
            self._metrics.responses.labels(rs.short_name(type_url)).inc()
        return nonce

    def as_dict(self) -> dict[str, Any]:
        out = self.status.as_dict()
        for short, extra in self.protocol_state().items():
            out["types"].setdefault(short, {}).update(extra)
        return out

    def _target(self, current: Snapshot) -> Snapshot | None:
        if current.version not in self._rejected:
            return current
        fallback = self.status.applied_snapshot
        if fallback is None or fallback.version in self._rejected:
            return None
        return fallback

    def _ordered(self) -> list[str]:
        subscribed = self.subscribed_types()
        ordered = [t for t in rs.PUSH_ORDER if t in subscribed]
        return ordered + [t for t in subscribed if t not in rs.PUSH_ORDER]


class ServerShutdown:
    """Stream event: the server is stopping."""


class SnapshotPush:
    """Stream event: the group has a new snapshot; ``done()`` when handled."""

    __slots__ = ("round",)

    def __init__(self, round_: PushRound) -> None:
        self.round = round_


class PushRound:
    """One snapshot fanned out to the N streams of a group; observes the time to all N.

    It also frames each distinct response body once for the whole round (nonce
    ``p<round>.<k>``), so N streams share one bytes object instead of N copies.
    """

    __slots__ = ("_framed", "_histogram", "_id", "_pending", "_started")
    _ids: ClassVar[itertools.count[int]] = itertools.count(1)

    def __init__(self, count: int, metrics: XdsMetrics | None) -> None:
        self._pending = count
        self._histogram = metrics.push_duration if metrics is not None else None
        self._started = time.perf_counter()
        self._id = next(PushRound._ids)
        #: id(body) → (body kept alive so the id stays unique, nonce, framed bytes)
        self._framed: dict[int, tuple[bytes, str, bytes]] = {}

    def frame(self, body: bytes) -> tuple[str, bytes]:
        """The round's nonce and framed bytes for ``body`` (built on first use)."""
        hit = self._framed.get(id(body))
        if hit is None or hit[0] is not body:
            nonce = f"p{self._id}.{len(self._framed) + 1}"
            hit = (body, nonce, with_nonce(body, nonce))
            self._framed[id(body)] = hit
        return hit[1], hit[2]

    def done(self) -> None:
        self._pending -= 1
        if self._pending == 0 and self._histogram is not None:
            self._histogram.observe(time.perf_counter() - self._started)
