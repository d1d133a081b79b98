"""Delta (incremental) ADS: ``DeltaAggregatedResources`` from the same snapshot cache.

The counterpart of go-control-plane's ``pkg/server/delta``. Where SotW resends every
resource of a type, Delta sends only the resources whose *resource version* (a content
hash of the packed ``Any``, :meth:`Snapshot.resource_versions
<xds_server.cache.Snapshot.resource_versions>`) differs from what the client has, and
names the ones that disappeared in ``removed_resources``. Per stream and type the
server tracks:

* **Subscriptions.** LDS, CDS (and meshward's POLICY) are wildcard when the first
  request subscribes to nothing; any type is wildcard after subscribing to ``*``
  (until ``*`` is unsubscribed). RDS/EDS carry explicit names:
  ``resource_names_subscribe`` adds, ``resource_names_unsubscribe`` drops (the client
  forgets an unsubscribed resource itself: no removal is sent). A newly subscribed name
  the snapshot lacks is answered in ``removed_resources`` ("does not exist").
* **What the client has**: name → resource version. It starts from
  ``initial_resource_versions`` (a reconnect, e.g. after our restart), so the first
  answer carries only what differs plus removals of names the snapshot no longer has.
* **Nonces.** A request echoing a nonce other than the latest sent for its type is
  stale: its ACK/NACK meaning is ignored, but its subscription changes still apply
  (Envoy sends each change once).
* **ACK/NACK.** An ACK (latest nonce, no ``error_detail``) confirms the last response.
  A NACK records the error, marks the rejected response's resources as unknown on the
  client, and rolls the node back to its last fully ACKed snapshot
  (:mod:`xds_server.stream`); the rejected version is never sent again.

A push goes CDS→EDS→SDS→LDS→RDS; removed clusters go last, in a CDS response of their own
after the routes stopped using them. Every response has ``system_version_info`` = the
snapshot version. The first request of a type is always answered (even with nothing),
so the client's initial fetch completes; otherwise a type with nothing new is not sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from xds_server import resources as rs
from xds_server.cache import Snapshot
from xds_server.stream import Stream

WILDCARD = "*"
#: A resource version that never matches: "the client may hold anything under this name".
_UNKNOWN = ""


@dataclass
class DeltaTypeState:
    """Delta protocol state of one type on one stream."""

    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    #: name → resource version the client holds (as far as we know).
    client: dict[str, str] = field(default_factory=dict)
    #: Newly subscribed names to report as absent if the snapshot lacks them.
    missing: set[str] = field(default_factory=set)
    nonce: str | None = None
    #: Names carried by the last response (sent or removed): unknown after a NACK.
    last_names: tuple[str, ...] = ()
    responses: int = 0


class DeltaStream(Stream):
    """One ``DeltaAggregatedResources`` stream."""

    protocol = "delta"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._types: dict[str, DeltaTypeState] = {}

    def subscribed_types(self) -> Sequence[str]:
        return tuple(self._types)

    def protocol_state(self) -> dict[str, dict[str, Any]]:
        return {
            rs.short_name(t): {
                "nonce": s.nonce,
                "names": sorted(s.names | ({WILDCARD} if s.wildcard else set())),
                "resources": len(s.client),
                "responses": s.responses,
            }
            for t, s in self._types.items()
        }

    async def on_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        type_url = request.type_url
        state = self._types.get(type_url)
        first = state is None
        if state is None:
            state = self._types[type_url] = DeltaTypeState(
                client=dict(request.initial_resource_versions)
            )
            self.status.subscribe(type_url)
            if type_url in rs.WILDCARD_TYPES and not request.resource_names_subscribe:
                state.wildcard = True
        added = _subscribe(
            state, request.resource_names_subscribe, request.resource_names_unsubscribe
        )

        if first:
            # Nothing was sent for this type on this stream: whatever the request echoes,
            # it is a fresh subscription and must be answered.
            await self.bring(force=type_url)
            return
        nonce = request.response_nonce
        if nonce and nonce != state.nonce:
            self.count_stale(type_url)
            if added:
                await self.bring()
            return
        if nonce and request.HasField("error_detail"):
            self.nacked(type_url, request.error_detail.message, None)
            for name in state.last_names:
                state.client[name] = _UNKNOWN
            await self.bring()  # the rollback (or hold), plus any new subscriptions
        elif nonce:
            self.acked(type_url)
            if added:
                await self.bring()
        elif added:
            await self.bring()

    async def push(self, snapshot: Snapshot, types: Sequence[str], force: str | None) -> None:
        """Send each type's changed resources and removals; clusters removed last."""
        deferred: list[tuple[str, list[str], str]] = []
        for type_url in types:
            state = self._types[type_url]
            digest = snapshot.digest(type_url, None if state.wildcard else state.names)
            if (
                type_url != force
                and not state.missing
                and digest == self.status.types[type_url].sent_digest
            ):
                # Same content as the stream was last brought to: skip the per-resource
                # diff (the common case in a fan-out of a change to other types).
                self.status.unchanged(type_url, snapshot.version, digest)
                continue
            versions = snapshot.resource_versions(type_url)
            desired = [n for n in versions if state.wildcard or n in state.names]
            wanted = set(desired)
            send = [n for n in desired if state.client.get(n) != versions[n]]
            removed = [n for n in state.client if n not in wanted]
            removed += sorted(n for n in state.missing if n not in wanted and n not in removed)
            state.missing.clear()
            if type_url in rs.REMOVE_LAST_TYPES and removed:
                deferred.append((type_url, removed, digest))
                if send:
                    await self._send(type_url, snapshot, send, [], None)
            elif send or removed or type_url == force:
                await self._send(type_url, snapshot, send, removed, digest)
            else:
                self.status.unchanged(type_url, snapshot.version, digest)
        for type_url, removed, digest in deferred:
            await self._send(type_url, snapshot, [], removed, digest)

    async def _send(
        self,
        type_url: str,
        snapshot: Snapshot,
        send: list[str],
        removed: list[str],
        digest: str | None,
    ) -> None:
        state = self._types[type_url]
        state.nonce = await self.write(type_url, snapshot.delta_body(type_url, send, removed))
        versions = snapshot.resource_versions(type_url)
        for name in send:
            state.client[name] = versions[name]
        for name in removed:
            state.client.pop(name, None)
        state.last_names = (*send, *removed)
        state.responses += 1
        self.status.sent(type_url, snapshot.version, digest)


def _subscribe(state: DeltaTypeState, subscribe: Sequence[str], unsubscribe: Sequence[str]) -> bool:
    """Apply a request's subscription changes; True if something was added."""
    added = False
    for name in subscribe:
        if name == WILDCARD:
            added = added or not state.wildcard
            state.wildcard = True
        elif name not in state.names:
            state.names.add(name)
            state.missing.add(name)
            added = True
    for name in unsubscribe:
        if name == WILDCARD:
            state.wildcard = False
            state.client = {n: v for n, v in state.client.items() if n in state.names}
        else:
            state.names.discard(name)
            state.missing.discard(name)
            if not state.wildcard:
                state.client.pop(name, None)
    return added
