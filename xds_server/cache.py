"""Snapshots and the snapshot cache: *what* each node group must see.

The counterpart of go-control-plane's ``pkg/cache`` (``SnapshotCache``). The cache
knows nothing about streams, nonces or ACKs (that is :mod:`xds_server.server`); it
holds one :class:`Snapshot` per node group and tells watchers when it changes.

A snapshot is one consistent, versioned set of resources for every type. It is
immutable once built, and everything expensive is done once per snapshot and shared
by every stream that sends it: each resource is packed into its ``Any`` once, and
each response body (a serialized ``DiscoveryResponse`` without its nonce) is built
once per (type, requested names) and reused as bytes. A stream adds only its own
nonce (see :func:`xds_server.stream.with_nonce`).

Content identity, computed once per snapshot and shared the same way:

* :meth:`Snapshot.resource_versions` — per resource, a hash of its serialized ``Any``:
  the Delta xDS resource version.
* :meth:`Snapshot.digest` — per type (or per requested subset of RDS/EDS names), a hash
  of those resource versions: a stream compares it with what it last sent and pushes
  only the types whose content changed.

Hashes are of the bytes the translator produced. Protobuf map order is stable within a
process but not across processes, so after a control-plane restart an unchanged
resource may hash differently: that costs one redundant resend, never a missed update.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import Message

from xds_server import resources as rs

SnapshotWatcher = Callable[["Snapshot"], None]


class Snapshot:
    """One versioned, immutable set of resources per type URL, for one node group.

    ``version`` is the ``version_info`` of every response built from this snapshot.
    Build with :meth:`build` from plain messages; resources keep the order given.
    """

    __slots__ = (
        "_bodies",
        "_delta_bodies",
        "_digests",
        "_resources",
        "_transitions",
        "_versions",
        "version",
    )

    def __init__(self, version: str, resources: Mapping[str, Mapping[str, AnyMessage]]) -> None:
        if not version:
            raise ValueError("a snapshot needs a non-empty version")
        self.version = version
        self._resources: Mapping[str, Mapping[str, AnyMessage]] = MappingProxyType(
            {t: MappingProxyType(dict(by_name)) for t, by_name in resources.items()}
        )
        # (type_url, effective names or None for "all") -> serialized response body.
        self._bodies: dict[tuple[str, frozenset[str] | None], bytes] = {}
        # (type_url, previous version) -> body keeping what the previous one had.
        self._transitions: dict[tuple[str, str], bytes] = {}
        # type_url -> name -> resource version (content hash), computed on first use.
        self._versions: dict[str, Mapping[str, str]] = {}
        # (type_url, names or None) -> content digest.
        self._digests: dict[tuple[str, frozenset[str] | None], str] = {}
        # (type_url, sent names, removed names) -> serialized DeltaDiscoveryResponse.
        self._delta_bodies: dict[tuple[str, tuple[str, ...], tuple[str, ...]], bytes] = {}

    @classmethod
    def build(cls, version: str, resources: Mapping[str, Iterable[Message]]) -> Snapshot:
        """Pack ``resources`` (type URL → messages) into a snapshot.

        Every type of :data:`~xds_server.resources.PUSH_ORDER` is present (empty when
        not given), so a group with nothing to serve deletes its listeners and
        clusters instead of leaving stale ones. Raises ``ValueError`` on a message
        whose type does not match its type URL, or on duplicate names.
        """
        packed: dict[str, dict[str, AnyMessage]] = {t: {} for t in rs.PUSH_ORDER}
        for type_url, messages in resources.items():
            by_name = packed.setdefault(type_url, {})
            for message in messages:
                if rs.type_url_of(message) != type_url:
                    raise ValueError(f"{rs.type_url_of(message)} listed under {type_url}")
                name = rs.resource_name(message)
                if name in by_name:
                    raise ValueError(f"duplicate {rs.short_name(type_url)} resource {name!r}")
                by_name[name] = rs.pack(message)
        return cls(version, packed)

    def with_resources(
        self, version: str, type_url: str, messages: Iterable[Message] = ()
    ) -> Snapshot:
        """This snapshot at ``version``, with the resources of ``type_url`` named like
        ``messages`` replaced by them (in place; names it lacked are appended).

        Every other resource keeps its packed ``Any`` (nothing is re-packed), so their
        content digests are unchanged and a stream brought to the result pushes only
        ``type_url`` — how a change of the authz cluster's endpoints goes out as EDS
        alone. Response bodies are not shared: they carry the version.
        """
        resources = {t: dict(by_name) for t, by_name in self._resources.items()}
        by_name = resources.setdefault(type_url, {})
        for message in messages:
            if rs.type_url_of(message) != type_url:
                raise ValueError(f"{rs.type_url_of(message)} listed under {type_url}")
            by_name[rs.resource_name(message)] = rs.pack(message)
        snapshot = Snapshot(version, resources)
        # Resource versions are content hashes: the untouched types keep theirs.
        snapshot._versions.update((t, v) for t, v in self._versions.items() if t != type_url)
        return snapshot

    @classmethod
    def empty(cls, version: str) -> Snapshot:
        """A snapshot with no resources: proxies that get it drop all listeners/clusters."""
        return cls.build(version, {})

    def type_urls(self) -> tuple[str, ...]:
        return tuple(self._resources)

    def names(self, type_url: str) -> tuple[str, ...]:
        """Names of the resources of ``type_url``, in snapshot order."""
        return tuple(self._resources.get(type_url, {}))

    def resources(self, type_url: str) -> Mapping[str, AnyMessage]:
        """name → packed resource (read-only)."""
        return self._resources.get(type_url, MappingProxyType({}))

    def resource_versions(self, type_url: str) -> Mapping[str, str]:
        """name → resource version (hash of the packed ``Any``), in snapshot order."""
        versions = self._versions.get(type_url)
        if versions is None:
            versions = MappingProxyType(
                {
                    name: hashlib.sha256(packed.SerializeToString()).hexdigest()[:16]
                    for name, packed in self.resources(type_url).items()
                }
            )
            self._versions[type_url] = versions
        return versions

    def digest(self, type_url: str, names: Iterable[str] | None = None) -> str:
        """A hash of the content of ``type_url`` (all of it, or only ``names`` ∩ present).

        Equal digests mean a client holding one has exactly the other: no push needed.
        """
        versions = self.resource_versions(type_url)
        key = self._names_key(type_url, names)
        digest = self._digests.get((type_url, key))
        if digest is None:
            hasher = hashlib.sha256()
            for name, version in versions.items():
                if key is None or name in key:
                    hasher.update(f"{name}\0{version}\0".encode())
            digest = hasher.hexdigest()[:16]
            self._digests[(type_url, key)] = digest
        return digest

    def _names_key(self, type_url: str, names: Iterable[str] | None) -> frozenset[str] | None:
        """``names`` ∩ the type's names, or ``None`` when that is all of them."""
        if names is None:
            return None
        by_name = self.resources(type_url)
        key = frozenset(names).intersection(by_name)
        return None if len(key) == len(by_name) else key

    def delta_body(self, type_url: str, send: Sequence[str], removed: Sequence[str]) -> bytes:
        """The serialized ``DeltaDiscoveryResponse`` (no nonce) carrying the resources
        ``send`` (each with its resource version) and the names ``removed``.

        Memoized per (type, names): streams of a group that are in the same state (the
        usual case) share the bytes.
        """
        key = (type_url, tuple(send), tuple(removed))
        body = self._delta_bodies.get(key)
        if body is None:
            by_name = self.resources(type_url)
            versions = self.resource_versions(type_url)
            response = discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=self.version,
                type_url=type_url,
                removed_resources=list(removed),
            )
            for name in send:
                response.resources.add(name=name, version=versions[name], resource=by_name[name])
            body = response.SerializeToString()
            self._delta_bodies[key] = body
        return body

    def response_body(self, type_url: str, names: Iterable[str] | None = None) -> bytes:
        """The serialized ``DiscoveryResponse`` (no nonce) for ``type_url``.

        ``names=None`` means every resource of the type (state-of-the-world types);
        otherwise only the requested names that exist, in snapshot order (a name
        the snapshot lacks is simply left out: for RDS/EDS that is not a deletion).
        Bodies are memoized, so streams asking for the same set share the bytes.
        """
        by_name = self.resources(type_url)
        key = self._names_key(type_url, names)
        body = self._bodies.get((type_url, key))
        if body is None:
            response = discovery_pb2.DiscoveryResponse(version_info=self.version, type_url=type_url)
            response.resources.extend(
                packed for name, packed in by_name.items() if key is None or name in key
            )
            body = response.SerializeToString()
            self._bodies[(type_url, key)] = body
        return body

    def transition_body(self, type_url: str, previous: Snapshot) -> bytes | None:
        """For a state-of-the-world type: this snapshot's resources *plus* those of
        ``previous`` that this one drops, as a response body; ``None`` if it drops none.

        Sent before the final body so that removals happen last (make before break).
        Memoized per previous version: the streams of a group share one body.
        """
        current = self.resources(type_url)
        dropped = [n for n in previous.names(type_url) if n not in current]
        if not dropped:
            return None
        key = (type_url, previous.version)
        body = self._transitions.get(key)
        if body is None:
            response = discovery_pb2.DiscoveryResponse(version_info=self.version, type_url=type_url)
            response.resources.extend(current.values())
            old = previous.resources(type_url)
            response.resources.extend(old[name] for name in dropped)
            body = response.SerializeToString()
            self._transitions[key] = body
        return body

    def __repr__(self) -> str:
        counts = ", ".join(f"{rs.short_name(t)}={len(r)}" for t, r in self._resources.items())
        return f"Snapshot(version={self.version!r}, {counts})"


class SnapshotCache:
    """Node group → latest :class:`Snapshot`, with change notification.

    Single-threaded by design: call every method from the event loop thread that
    runs the ADS server. Watchers are plain callbacks run synchronously inside
    :meth:`set_snapshot` (a stream's watcher just enqueues an event), so they must
    not block. Setting a snapshot notifies every watcher of the group even if the
    version is unchanged; streams compare content digests and skip what they already
    sent.
    """

    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: dict[str, dict[int, SnapshotWatcher]] = {}
        self._next_watch = 0

    def set_snapshot(self, group: str, snapshot: Snapshot) -> None:
        """Make ``snapshot`` the current one for ``group`` and notify its watchers."""
        self._snapshots[group] = snapshot
        for watcher in list(self._watchers.get(group, {}).values()):
            watcher(snapshot)

    def get_snapshot(self, group: str) -> Snapshot | None:
        return self._snapshots.get(group)

    def clear_snapshot(self, group: str) -> None:
        """Forget ``group``'s snapshot (watchers are not notified; streams keep what
        they were sent). To make proxies drop their config, set :meth:`Snapshot.empty`."""
        self._snapshots.pop(group, None)

    def groups(self) -> tuple[str, ...]:
        return tuple(self._snapshots)

    def watch(self, group: str, watcher: SnapshotWatcher) -> Callable[[], None]:
        """Call ``watcher(snapshot)`` on every :meth:`set_snapshot` for ``group``.

        Returns a function that cancels the watch (idempotent).
        """
        key = self._next_watch
        self._next_watch += 1
        self._watchers.setdefault(group, {})[key] = watcher

        def cancel() -> None:
            watchers = self._watchers.get(group)
            if watchers is not None:
                watchers.pop(key, None)
                if not watchers:
                    del self._watchers[group]

        return cancel

    def watcher_count(self, group: str) -> int:
        return len(self._watchers.get(group, {}))
