"""The ADS stream protocol (State of the World) on ``grpc.aio``: *how* snapshots reach Envoy.

The counterpart of go-control-plane's ``pkg/server/sotw``. One
``envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources``
stream multiplexes every type. The stream's node group is the ``node.cluster`` of its
first request; the stream watches that group in the :class:`SnapshotCache`.

Per stream and per type URL the server tracks the requested names, the version and
nonce it last sent, the version the client last ACKed and the last NACK error. The
rules, each learned the hard way with real Envoy:

* Answer the first request of a type, a change of requested names, and a new snapshot
  version. Never answer a plain ACK (same names, version already sent): that loops.
* A request whose non-empty ``response_nonce`` is not the latest nonce sent for its
  type is stale (the client has not seen our newest response yet): ignore it entirely.
* A NACK (``error_detail`` set) carries the *previous* good ``version_info``. Record and
  log the error, and do not resend the rejected version: the next snapshot fixes it.
  (A NACK that also changes RDS/EDS names is answered for the new names.)
* An empty ``response_nonce`` is a fresh subscription. After an xDS server restart
  Envoy reconnects with its last ``version_info`` and no nonce; it gets the full
  current state even if the version matches.
* LDS and CDS are state of the world: every response carries all resources and a
  missing name is a deletion. RDS and EDS carry only the requested names.
* A new snapshot is pushed CDS, EDS, LDS, RDS (:data:`~xds_server.resources.PUSH_ORDER`),
  for each type the stream has subscribed to and not yet been sent at that version.
  The push does not wait for the previous response's ACK; that ACK becomes stale.
  Clusters that the new snapshot drops are removed last, after the routes that
  used them (see :meth:`AdsServer._push`).

A stream that closes, is cancelled, or fails with ``INTERNAL`` (connect storms) is just
a closed stream: it is cleaned up and never logged as an error.

Responses are sent as bytes: the snapshot's shared, pre-serialized body plus this
stream's nonce appended as one more protobuf field (:func:`with_nonce`), so a push to N
streams serializes each response once, not N times. Delta xDS is not implemented yet
(``DeltaAggregatedResources`` answers ``UNIMPLEMENTED``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge

from xds_server import resources as rs
from xds_server.cache import Snapshot, SnapshotCache

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
ADS_METHOD = "StreamAggregatedResources"

_NONCE_TAG = bytes([(5 << 3) | 2])  # DiscoveryResponse.nonce: field 5, length-delimited

log = logging.getLogger("meshward.xds")


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
    """``body`` (a serialized DiscoveryResponse without nonce) with ``nonce`` set.

    Protobuf parsers merge fields in any order, so appending the encoded field is the
    same message as setting it before serializing.
    """
    raw = nonce.encode()
    return body + _NONCE_TAG + _varint(len(raw)) + raw


class XdsMetrics:
    """The ADS server's Prometheus metrics, registered in the given registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.streams = Gauge(
            "meshward_xds_connected_streams", "Open ADS streams.", registry=registry
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
        self.stale = Counter(
            "meshward_xds_stale_requests",
            "DiscoveryRequests ignored because their nonce was not the latest sent.",
            ["type"],
            registry=registry,
        )


@dataclass
class TypeState:
    """What one stream knows about one type URL."""

    names: frozenset[str] = frozenset()
    last_sent_version: str | None = None
    last_nonce: str | None = None
    last_acked_version: str | None = None
    last_nack_error: str | None = None
    last_nack_version: str | None = None
    responses: int = 0
    #: The snapshot the last response came from (to know what a new one removes).
    sent_snapshot: Snapshot | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.last_sent_version,
            "acked": self.last_acked_version,
            "nonce": self.last_nonce,
            "names": sorted(self.names),
            "nack_error": self.last_nack_error,
            "nack_version": self.last_nack_version,
            "responses": self.responses,
        }


@dataclass
class StreamState:
    """One open ADS stream: the node behind it and per-type protocol state."""

    stream_id: int
    node_id: str
    group: str
    peer: str
    connected_at: float = field(default_factory=time.time)
    types: dict[str, TypeState] = field(default_factory=dict)
    _nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def next_nonce(self) -> str:
        return f"{self.stream_id}-{next(self._nonces)}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream_id,
            "id": self.node_id,
            "group": self.group,
            "peer": self.peer,
            "connected_at": self.connected_at,
            "types": {rs.short_name(t): s.as_dict() for t, s in self.types.items()},
        }


class _StreamClosedError(Exception):
    """The peer is gone (closed, cancelled, INTERNAL): end the handler quietly."""


class _Shutdown:
    """Queue marker: the server is stopping."""


_SHUTDOWN = _Shutdown()
_Event: TypeAlias = discovery_pb2.DiscoveryRequest | Snapshot | _Shutdown | None


class AdsServer:
    """Serves ADS (SotW) from a :class:`SnapshotCache`. Register with :meth:`add_to`."""

    def __init__(self, cache: SnapshotCache, metrics: XdsMetrics | None = None) -> None:
        self._cache = cache
        self._metrics = metrics
        self._streams: dict[int, StreamState] = {}
        self._queues: dict[int, asyncio.Queue[_Event]] = {}
        self._stream_ids = itertools.count(1)

    def add_to(self, server: grpc.aio.Server) -> None:
        """Register the ADS method on ``server``; responses are pre-serialized bytes."""
        handler = grpc.stream_stream_rpc_method_handler(
            self.stream_aggregated_resources,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=_identity,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ADS_SERVICE, {ADS_METHOD: handler}),)
        )

    def streams(self) -> list[StreamState]:
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
        """One ADS stream: merge client requests and snapshot changes into one loop."""
        stream_id = next(self._stream_ids)
        events: asyncio.Queue[_Event] = asyncio.Queue()
        self._queues[stream_id] = events
        reader = asyncio.create_task(_read_requests(request_iterator, events))
        stream: StreamState | None = None
        cancel_watch: Callable[[], None] | None = None
        try:
            while True:
                event = await events.get()
                if event is None or isinstance(event, _Shutdown):
                    return
                if isinstance(event, Snapshot):
                    if stream is not None:
                        await self._push(stream, context)
                    continue
                if stream is None:
                    stream = self._open(stream_id, event, context)
                    if stream is None:
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            "node.cluster is empty: set it in the Envoy bootstrap to the "
                            "gateway name this proxy serves",
                        )
                        return
                    cancel_watch = self._cache.watch(stream.group, events.put_nowait)
                await self._on_request(stream, event, context)
        except _StreamClosedError:
            return
        finally:
            reader.cancel()
            if cancel_watch is not None:
                cancel_watch()
            self._queues.pop(stream_id, None)
            if stream is not None:
                self._streams.pop(stream_id, None)
                if self._metrics is not None:
                    self._metrics.streams.dec()
                log.info(
                    "xds stream closed",
                    extra={"node": stream.node_id, "group": stream.group, "stream": stream_id},
                )

    def _open(
        self,
        stream_id: int,
        first: discovery_pb2.DiscoveryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> StreamState | None:
        group = first.node.cluster
        if not group:
            log.warning(
                "xds stream without node.cluster rejected",
                extra={"node": first.node.id, "peer": context.peer()},
            )
            return None
        stream = StreamState(
            stream_id=stream_id, node_id=first.node.id, group=group, peer=context.peer()
        )
        self._streams[stream_id] = stream
        if self._metrics is not None:
            self._metrics.streams.inc()
        log.info(
            "xds stream opened",
            extra={"node": stream.node_id, "group": group, "stream": stream_id},
        )
        if self._cache.get_snapshot(group) is None:
            log.warning(
                "no snapshot for node group: the proxy waits until the policy has a "
                "gateway with this name",
                extra={"node": stream.node_id, "group": group},
            )
        return stream

    async def _on_request(
        self,
        stream: StreamState,
        request: discovery_pb2.DiscoveryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        type_url = request.type_url
        state = stream.types.get(type_url)
        if state is None:
            state = stream.types[type_url] = TypeState()
        nonce = request.response_nonce
        if nonce and state.last_nonce is not None and nonce != state.last_nonce:
            if self._metrics is not None:
                self._metrics.stale.labels(rs.short_name(type_url)).inc()
            return

        names = frozenset(request.resource_names)
        names_changed = type_url not in rs.WILDCARD_TYPES and names != state.names
        state.names = names

        if request.HasField("error_detail"):
            state.last_nack_error = request.error_detail.message
            state.last_nack_version = state.last_sent_version
            if self._metrics is not None:
                self._metrics.nacks.labels(rs.short_name(type_url)).inc()
            log.warning(
                "xds NACK: proxy rejected %s version %s",
                rs.short_name(type_url),
                state.last_sent_version,
                extra={
                    "node": stream.node_id,
                    "group": stream.group,
                    "type": rs.short_name(type_url),
                    "rejected_version": state.last_sent_version,
                    "kept_version": request.version_info,
                    "error": request.error_detail.message,
                },
            )
            if names_changed:
                await self._push(stream, context, force=type_url)
        elif not nonce:
            # First request of the type, or a reconnect after our restart: answer even
            # if the client already has this version.
            await self._push(stream, context, force=type_url)
        else:
            state.last_acked_version = request.version_info
            await self._push(stream, context, force=type_url if names_changed else None)

    async def _push(
        self,
        stream: StreamState,
        context: grpc.aio.ServicerContext[Any, Any],
        force: str | None = None,
    ) -> None:
        """Bring every subscribed type to the group's current snapshot, in push order.

        Types already sent at this version are skipped, except ``force`` (a fresh
        subscription or new names). Every response goes through here, so a reply to
        one request never overtakes a pending push of a type earlier in the order.

        Clusters are removed last (make before break): if the new snapshot drops
        clusters this stream was sent, CDS first goes out with the new clusters *plus*
        the dropped ones, then EDS, LDS, RDS (which stop referencing them), then CDS
        once more with exactly the new set. Listeners are never kept that way: a
        renamed listener on the same port would clash with its old self.
        """
        snapshot = self._cache.get_snapshot(stream.group)
        if snapshot is None:
            return
        ordered = [t for t in rs.PUSH_ORDER if t in stream.types]
        ordered += [t for t in stream.types if t not in rs.PUSH_ORDER]
        finish: list[str] = []
        for type_url in ordered:
            state = stream.types[type_url]
            if state.last_sent_version == snapshot.version and type_url != force:
                continue
            body = None
            if type_url in rs.REMOVE_LAST_TYPES and state.sent_snapshot is not None:
                body = snapshot.transition_body(type_url, state.sent_snapshot)
            if body is not None:
                finish.append(type_url)
            await self._send(stream, state, type_url, snapshot, context, body=body)
        for type_url in finish:
            await self._send(stream, stream.types[type_url], type_url, snapshot, context)

    async def _send(
        self,
        stream: StreamState,
        state: TypeState,
        type_url: str,
        snapshot: Snapshot,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        body: bytes | None = None,
    ) -> None:
        if body is None:
            names = None if type_url in rs.WILDCARD_TYPES else state.names
            body = snapshot.response_body(type_url, names)
        nonce = stream.next_nonce()
        try:
            await context.write(with_nonce(body, nonce))
        except Exception as exc:  # closed/cancelled/INTERNAL: the stream is gone
            raise _StreamClosedError from exc
        state.last_sent_version = snapshot.version
        state.sent_snapshot = snapshot
        state.last_nonce = nonce
        state.responses += 1
        if self._metrics is not None:
            self._metrics.responses.labels(rs.short_name(type_url)).inc()
        log.debug(
            "xds response sent",
            extra={
                "node": stream.node_id,
                "type": rs.short_name(type_url),
                "version": snapshot.version,
                "nonce": nonce,
            },
        )


def _identity(body: bytes) -> bytes:
    return body


async def _read_requests(
    requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
    events: asyncio.Queue[_Event],
) -> None:
    """Feed client requests into the stream's event queue; ``None`` marks the end."""
    try:
        async for request in requests:
            events.put_nowait(request)
    except Exception as exc:  # cancelled/INTERNAL/reset mid-read: just a closed stream
        log.debug("xds stream read ended: %s", exc)
    finally:
        events.put_nowait(None)
