"""The ADS server on ``grpc.aio``: *how* snapshots reach Envoy (SotW here, Delta beside).

The counterpart of go-control-plane's ``pkg/server/sotw``. :class:`AdsServer` serves
both methods of ``envoy.service.discovery.v3.AggregatedDiscoveryService``:
``StreamAggregatedResources`` (State of the World, :class:`SotwStream`, below) and
``DeltaAggregatedResources`` (:class:`xds_server.delta.DeltaStream`). One stream
multiplexes every type. Its node group is the ``node.cluster`` of its first request;
the server watches each group with streams in the :class:`SnapshotCache` once and fans
a new snapshot out to the group's streams (timing the round:
``meshward_xds_push_duration_seconds``).

SotW rules, each learned the hard way with real Envoy:

* Answer the first request of a type, a change of requested names, and a new snapshot
  whose content differs. Never answer a plain ACK (same names): that loops.
* A request whose non-empty ``response_nonce`` is not the latest nonce sent for its
  type is stale (the client has not seen our newest response yet): ignore it entirely
  (SotW requests carry the full subscription, so nothing is lost).
* A NACK (``error_detail`` set) carries the *previous* good ``version_info``. Record it,
  then roll the node back to its last fully ACKed snapshot; never resend the rejected
  version (see :mod:`xds_server.stream`). A NACK that also changes RDS/EDS names is
  answered for the new names.
* An empty ``response_nonce`` is a fresh subscription. After an xDS server restart
  Envoy reconnects with its last ``version_info`` and no nonce; it gets the full
  current state even if the version matches.
* LDS and CDS are state of the world: every response carries all resources and a
  missing name is a deletion. RDS, EDS and SDS carry only the requested names.
* A new snapshot is pushed CDS, EDS, SDS, LDS, RDS (:data:`~xds_server.resources.PUSH_ORDER`),
  only the types whose content (for the names this stream requested) differs from what
  it last sent. The push does not wait for the previous response's ACK; that ACK
  becomes stale. Clusters that the new snapshot drops are removed last, after the
  routes that used them (see :meth:`SotwStream.push`).

A stream that closes, is cancelled, or fails with ``INTERNAL`` (connect storms) is just
a closed stream: it is cleaned up and never logged as an error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from xds_server import resources as rs
from xds_server.cache import Snapshot, SnapshotCache
from xds_server.delta import DeltaStream
from xds_server.stream import (
    PushRound,
    ServerShutdown,
    SnapshotPush,
    Stream,
    StreamCallbacks,
    StreamClosedError,
    with_nonce,
)
from xds_server.tracking import VersionClock, XdsMetrics

__all__ = ["ADS_SERVICE", "AdsServer", "SotwStream", "XdsMetrics", "with_nonce"]

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
ADS_METHOD = "StreamAggregatedResources"
DELTA_METHOD = "DeltaAggregatedResources"
#: Large responses (see xds_server.stream.LARGE_WRITE_BYTES) in flight at once, server-wide.
MAX_LARGE_WRITES = 32

log = logging.getLogger("meshward.xds")

_SHUTDOWN = ServerShutdown()
_Event: TypeAlias = Any  # a (Delta)DiscoveryRequest | SnapshotPush | ServerShutdown | None


@dataclass
class SotwTypeState:
    """SotW protocol state of one type on one stream."""

    names: frozenset[str] = frozenset()
    nonce: str | None = None
    responses: int = 0
    #: The snapshot the last response came from (to know what a new one removes).
    sent_snapshot: Snapshot | None = field(default=None, repr=False)


class SotwStream(Stream):
    """One ``StreamAggregatedResources`` stream."""

    protocol = "sotw"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._types: dict[str, SotwTypeState] = {}

    def subscribed_types(self) -> Sequence[str]:
        return tuple(self._types)

    def protocol_state(self) -> dict[str, dict[str, Any]]:
        return {
            rs.short_name(t): {
                "nonce": s.nonce,
                "names": sorted(s.names),
                "responses": s.responses,
            }
            for t, s in self._types.items()
        }

    async def on_request(self, request: discovery_pb2.DiscoveryRequest) -> None:
        type_url = request.type_url
        state = self._types.get(type_url)
        if state is None:
            state = self._types[type_url] = SotwTypeState()
            self.status.subscribe(type_url)
        nonce = request.response_nonce
        if nonce and state.nonce is not None and nonce != state.nonce:
            self.count_stale(type_url)
            return

        names = frozenset(request.resource_names)
        names_changed = type_url not in rs.WILDCARD_TYPES and names != state.names
        state.names = names
        force = type_url if names_changed else None

        if request.HasField("error_detail"):
            self.nacked(type_url, request.error_detail.message, request.version_info)
            await self.bring(force=force)  # the rollback (or hold)
        elif not nonce:
            # First request of the type, or a reconnect after our restart: answer even
            # if the client already has this version.
            await self.bring(force=type_url)
        elif names_changed:
            self.acked(type_url)
            await self.bring(force=force)
        else:
            self.acked(type_url)

    async def push(self, snapshot: Snapshot, types: Sequence[str], force: str | None) -> None:
        """Send each of ``types`` whose content for this stream differs from what it was
        last sent (or that is ``force``); the others count as unchanged at ``snapshot``.

        Clusters are removed last (make before break): if the new snapshot drops
        clusters this stream was sent, CDS first goes out with the new clusters *plus*
        the dropped ones, then EDS, LDS, RDS (which stop referencing them), then CDS
        once more with exactly the new set. Listeners are never kept that way: a
        renamed listener on the same port would clash with its old self.
        """
        finish: list[str] = []
        for type_url in types:
            state = self._types[type_url]
            digest = self._digest(snapshot, type_url)
            if type_url != force and digest == self.status.types[type_url].sent_digest:
                self.status.unchanged(type_url, snapshot.version, digest)
                state.sent_snapshot = snapshot
                continue
            body = None
            if type_url in rs.REMOVE_LAST_TYPES and state.sent_snapshot is not None:
                body = snapshot.transition_body(type_url, state.sent_snapshot)
            if body is not None:
                finish.append(type_url)
            await self._send(type_url, snapshot, None if body is not None else digest, body)
        for type_url in finish:
            await self._send(type_url, snapshot, self._digest(snapshot, type_url), None)

    def _digest(self, snapshot: Snapshot, type_url: str) -> str:
        names = None if type_url in rs.WILDCARD_TYPES else self._types[type_url].names
        return snapshot.digest(type_url, names)

    async def _send(
        self, type_url: str, snapshot: Snapshot, digest: str | None, body: bytes | None
    ) -> None:
        state = self._types[type_url]
        if body is None:
            names = None if type_url in rs.WILDCARD_TYPES else state.names
            body = snapshot.response_body(type_url, names)
        state.nonce = await self.write(type_url, body)
        state.sent_snapshot = snapshot
        state.responses += 1
        self.status.sent(type_url, snapshot.version, digest)
        log.debug(
            "xds response sent",
            extra={
                "node": self.node_id,
                "type": rs.short_name(type_url),
                "version": snapshot.version,
                "nonce": state.nonce,
            },
        )


StreamFactory: TypeAlias = Callable[..., Stream]


class AdsServer:
    """Serves ADS, SotW and Delta, from a :class:`SnapshotCache`. Register with :meth:`add_to`.

    ``callbacks`` (optional) hears of every stream's open, first applied snapshot and
    close (:class:`~xds_server.stream.StreamCallbacks`).
    """

    def __init__(
        self,
        cache: SnapshotCache,
        metrics: XdsMetrics | None = None,
        clock: VersionClock | None = None,
        callbacks: StreamCallbacks | None = None,
    ) -> None:
        self._cache = cache
        self._metrics = metrics
        self._clock = clock
        self._callbacks = callbacks
        self._streams: dict[int, Stream] = {}
        self._queues: dict[int, asyncio.Queue[_Event]] = {}
        self._groups: dict[str, dict[int, Stream]] = {}
        self._group_watches: dict[str, Callable[[], None]] = {}
        self._stream_ids = itertools.count(1)
        #: Bounds large writes in flight across all streams (see xds_server.stream).
        self._write_slots = asyncio.Semaphore(MAX_LARGE_WRITES)

    def add_to(self, server: grpc.aio.Server) -> None:
        """Register both ADS methods on ``server``; responses are pre-serialized bytes."""
        handlers = {
            ADS_METHOD: grpc.stream_stream_rpc_method_handler(
                self.stream_aggregated_resources,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_identity,
            ),
            DELTA_METHOD: grpc.stream_stream_rpc_method_handler(
                self.delta_aggregated_resources,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_identity,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ADS_SERVICE, handlers),)
        )

    def streams(self) -> list[Stream]:
        """The streams open now (those whose first request has arrived)."""
        return list(self._streams.values())

    def close_streams(self) -> None:
        """Ask every open stream to end (OK status) — for a clean shutdown."""
        for queue in self._queues.values():
            queue.put_nowait(_SHUTDOWN)

    async def stream_aggregated_resources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """One SotW ADS stream."""
        await self._serve(request_iterator, context, SotwStream)

    async def delta_aggregated_resources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """One Delta ADS stream."""
        await self._serve(request_iterator, context, DeltaStream)

    async def _serve(
        self,
        request_iterator: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
        factory: StreamFactory,
    ) -> None:
        """Merge client requests and snapshot pushes into one loop per stream."""
        stream_id = next(self._stream_ids)
        events: asyncio.Queue[_Event] = asyncio.Queue()
        self._queues[stream_id] = events
        reader = asyncio.create_task(_read_requests(request_iterator, events))
        stream: Stream | None = None
        try:
            while True:
                event = await events.get()
                if event is None or isinstance(event, ServerShutdown):
                    return
                if isinstance(event, SnapshotPush):
                    try:
                        if stream is not None:
                            await stream.on_snapshot(event.round)
                    finally:
                        event.round.done()
                    continue
                if stream is None:
                    stream = self._open(stream_id, event, context, factory)
                    if stream is None:
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            "node.cluster is empty: set it in the Envoy bootstrap to the "
                            "node group this proxy serves (a gateway name, or "
                            "<service>-sidecar)",
                        )
                        return
                await stream.on_request(event)
        except StreamClosedError:
            return
        finally:
            reader.cancel()
            self._queues.pop(stream_id, None)
            if stream is not None:
                self._close(stream)
            _finish_rounds(events)

    def _open(
        self,
        stream_id: int,
        first: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        factory: StreamFactory,
    ) -> Stream | None:
        group = first.node.cluster
        if not group:
            log.warning(
                "xds stream without node.cluster rejected",
                extra={"node": first.node.id, "peer": context.peer()},
            )
            return None
        stream = factory(
            stream_id=stream_id,
            node_id=first.node.id,
            group=group,
            peer=context.peer(),
            context=context,
            cache=self._cache,
            metrics=self._metrics,
            clock=self._clock,
            write_slots=self._write_slots,
        )
        self._streams[stream_id] = stream
        members = self._groups.setdefault(group, {})
        members[stream_id] = stream
        if group not in self._group_watches:
            self._group_watches[group] = self._cache.watch(group, self._watcher(group))
        if self._metrics is not None:
            self._metrics.streams.inc()
            self._metrics.proxies.labels(group).inc()
        log.info(
            "xds stream opened",
            extra={
                "node": stream.node_id,
                "group": group,
                "stream": stream_id,
                "protocol": stream.protocol,
            },
        )
        if self._callbacks is not None:
            stream.on_first_applied = self._callbacks.on_stream_applied
            _run_callback(self._callbacks.on_stream_open, stream, first.node)
        held = self._callbacks is not None and self._callbacks.holds_group(group)
        if self._cache.get_snapshot(group) is None and not held:
            log.warning(
                "no snapshot for node group: the proxy waits until the policy has a "
                "gateway with this name (or a service with a sidecar, for <service>-sidecar)",
                extra={"node": stream.node_id, "group": group},
            )
        return stream

    def _close(self, stream: Stream) -> None:
        self._streams.pop(stream.stream_id, None)
        members = self._groups.get(stream.group, {})
        members.pop(stream.stream_id, None)
        if not members:
            self._groups.pop(stream.group, None)
            cancel = self._group_watches.pop(stream.group, None)
            if cancel is not None:
                cancel()
        if self._metrics is not None:
            self._metrics.streams.dec()
            self._metrics.proxies.labels(stream.group).dec()
        log.info(
            "xds stream closed",
            extra={"node": stream.node_id, "group": stream.group, "stream": stream.stream_id},
        )
        if self._callbacks is not None:
            _run_callback(self._callbacks.on_stream_closed, stream)

    def _watcher(self, group: str) -> Callable[[Snapshot], None]:
        def on_snapshot(_snapshot: Snapshot) -> None:
            self._fan_out(group)

        return on_snapshot

    def _fan_out(self, group: str) -> None:
        """A new snapshot for ``group``: queue one push per stream, timed as one round."""
        members = list(self._groups.get(group, {}).values())
        if not members:
            return
        round_ = PushRound(len(members), self._metrics)
        for stream in members:
            queue = self._queues.get(stream.stream_id)
            if queue is None:
                round_.done()
            else:
                queue.put_nowait(SnapshotPush(round_))


def _finish_rounds(events: asyncio.Queue[_Event]) -> None:
    """A closed stream's unhandled pushes count as done (the round is not held up)."""
    while not events.empty():
        event = events.get_nowait()
        if isinstance(event, SnapshotPush):
            event.round.done()


def _run_callback(callback: Callable[..., None], *args: Any) -> None:
    """Run a stream callback; a failure is logged, never breaks the stream."""
    try:
        callback(*args)
    except Exception:
        log.exception("stream callback failed", extra={"callback": callback.__qualname__})


def _identity(body: bytes) -> bytes:
    return body


async def _read_requests(requests: AsyncIterator[Any], events: asyncio.Queue[_Event]) -> None:
    """Feed client requests into the stream's event queue; ``None`` marks the end."""
    try:
        async for request in requests:
            events.put_nowait(request)
    except Exception as exc:  # cancelled/INTERNAL/reset mid-read: just a closed stream
        log.debug("xds stream read ended: %s", exc)
    finally:
        events.put_nowait(None)
