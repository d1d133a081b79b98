"""authz replicas, registered by their own ADS streams: the live endpoints of the authz
cluster.

Every ``meshward authz --xds`` process keeps one ADS stream open to the xDS server to
get its policy and SVID (:mod:`authz.policy_source`), as node group
:data:`~meshward.policy.wire.AUTHZ_GROUP`, and announces where it serves Checks in
the node metadata key :data:`LISTEN_METADATA_KEY` (``HOST:PORT``). That stream is the
registration: no separate registry, no heartbeats, no TTL. A replica **counts** from
the moment its stream has *applied* a snapshot (policy and SVID both ACKed: before
that its Checks would all be denied ``503 no_policy`` or its TLS handshakes fail) until
the stream ends (clean stop, crash, SIGKILL: the kernel closes the socket; a vanished
host: the server's keepalive pings time out).

The address it is reached at (:func:`replica_address`):

* the announced IP and port;
* a wildcard host (``0.0.0.0``, ``::``) or none (``:9191``): the IP the stream comes
  from (gRPC's ``context.peer()``) with the announced port. This is what makes a
  replica listening on ``0.0.0.0`` in a container work: the xDS server sees its
  container IP;
* anything else is refused and logged once per (node, announcement): no port, a bad
  port, a host name (EDS carries IPs only; the authz cluster must not depend on DNS
  the xDS server cannot see), a wildcard from a peer without an IP (a Unix socket).

Several streams announcing the same address (a replica that restarted before its old
stream was noticed gone) are one endpoint; it stays while any of them is open.
"""

from __future__ import annotations

import ipaddress
import logging
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import base_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge

from meshward.policy.wire import AUTHZ_GROUP

log = logging.getLogger("meshward.xds")

#: Node metadata key holding the authz gRPC address (``HOST:PORT``) a replica serves on;
#: the same key as :data:`authz.policy_source.LISTEN_METADATA_KEY` (a test keeps them equal).
LISTEN_METADATA_KEY = "meshward.authz.listen"
#: How many refused (node, announcement) pairs are remembered so each is logged once.
_WARNED_LIMIT = 256

Address = tuple[str, int]


class UnusableAnnouncementError(ValueError):
    """A replica's announced address cannot be an EDS endpoint; the message says why."""


def peer_ip(peer: str) -> str | None:
    """The IP of a gRPC peer string (``ipv4:10.0.0.7:51234``, ``ipv6:[::1]:51234``,
    possibly percent-encoded), IPv4-mapped IPv6 as IPv4; ``None`` for a Unix socket or
    anything else without an IP."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = rest.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.compressed


def replica_address(announced: str, peer: str) -> tuple[Address, str]:
    """Where to reach a replica that announced ``announced`` over a stream from ``peer``.

    Returns ``((ip, port), source)`` with source ``"announced"`` (the host it gave) or
    ``"peer"`` (a wildcard or missing host, replaced by the stream's peer IP). Raises
    :class:`UnusableAnnouncementError` naming the problem and the fix.
    """
    host, sep, port_text = announced.strip().rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UnusableAnnouncementError(
            f"{LISTEN_METADATA_KEY}={announced!r} has no usable port: announce HOST:PORT "
            "(meshward authz --listen IP:PORT)"
        )
    port = int(port_text)
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise UnusableAnnouncementError(
                f"{LISTEN_METADATA_KEY}={announced!r}: {host!r} is not an IP address (EDS "
                "carries IPs only): listen on an IP, or on 0.0.0.0 to be reached at the "
                "address the xDS server sees"
            ) from None
        if not ip.is_unspecified:
            return (ip.compressed, port), "announced"
    from_peer = peer_ip(peer)
    if from_peer is None:
        raise UnusableAnnouncementError(
            f"{LISTEN_METADATA_KEY}={announced!r} has a wildcard host and the stream's "
            f"peer {peer!r} has no IP to use instead: announce the IP to reach it at"
        )
    return (from_peer, port), "peer"


@dataclass
class Replica:
    """One registered replica: one open ADS stream of node group ``meshward-authz``."""

    stream_id: int
    node_id: str
    announced: str
    address: Address
    #: ``announced`` (its own IP) or ``peer`` (wildcard host → the stream's peer IP).
    source: str
    peer: str
    connected_at: float
    #: When the replica applied its first snapshot (policy + SVID); ``None``: not yet.
    ready_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        host, port = self.address
        return {
            "node": self.node_id,
            "stream": self.stream_id,
            "address": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            "announced": self.announced,
            "source": self.source,
            "peer": self.peer,
            "connected_at": self.connected_at,
            "ready": self.ready_at is not None,
            "ready_at": self.ready_at,
        }


class AuthzReplicas:
    """The authz replicas of the open ADS streams. Single-threaded (the event loop).

    Feed it stream events (:meth:`opened`, :meth:`applied`, :meth:`closed`; streams of
    other node groups are ignored); ``on_change()`` is called whenever
    :meth:`endpoints` may have changed. Metrics: ``meshward_xds_authz_replicas``
    (replicas ready, i.e. endpoints they provide, by address) and
    ``meshward_xds_authz_announcements_rejected_total``.
    """

    def __init__(
        self, on_change: Callable[[], None], registry: CollectorRegistry | None = None
    ) -> None:
        self._on_change = on_change
        self._replicas: dict[int, Replica] = {}
        self._warned: OrderedDict[tuple[str, str], None] = OrderedDict()
        registry = registry if registry is not None else CollectorRegistry()
        self._ready_gauge = Gauge(
            "meshward_xds_authz_replicas",
            "authz replicas registered over ADS and ready (stream open, usable address, "
            "policy and SVID applied): distinct endpoints they add to the authz cluster.",
            registry=registry,
        )
        self._rejected = Counter(
            "meshward_xds_authz_announcements_rejected",
            f"authz streams whose {LISTEN_METADATA_KEY} announcement was unusable "
            "(no port, a host name, ...): not registered.",
            registry=registry,
        )

    def opened(self, stream_id: int, node: base_pb2.Node, peer: str) -> None:
        """A stream opened; registers it (not yet ready) if it is a usable replica."""
        if node.cluster != AUTHZ_GROUP:
            return
        value = node.metadata.fields.get(LISTEN_METADATA_KEY)
        announced = value.string_value if value is not None else ""
        try:
            if value is None or value.WhichOneof("kind") != "string_value":
                raise UnusableAnnouncementError(
                    f"no {LISTEN_METADATA_KEY} string in the node metadata: the replica "
                    "cannot be an endpoint of the authz cluster (start it with "
                    "meshward authz --xds, which announces its --listen address)"
                )
            address, source = replica_address(announced, peer)
        except UnusableAnnouncementError as exc:
            self._rejected.inc()
            key = (node.id, announced)
            level = logging.DEBUG if key in self._warned else logging.WARNING
            self._warned[key] = None
            while len(self._warned) > _WARNED_LIMIT:
                self._warned.popitem(last=False)
            log.log(
                level,
                "authz replica ignored: unusable address announcement",
                extra={"node": node.id, "peer": peer, "error": str(exc)},
            )
            return
        self._replicas[stream_id] = Replica(
            stream_id, node.id, announced, address, source, peer, time.time()
        )

    def applied(self, stream_id: int) -> None:
        """The stream's node applied its first snapshot: the replica counts from now."""
        replica = self._replicas.get(stream_id)
        if replica is None or replica.ready_at is not None:
            return
        replica.ready_at = time.time()
        log.info("authz replica registered", extra=replica.as_dict())
        self._changed()

    def closed(self, stream_id: int) -> None:
        """The stream ended: the replica no longer counts."""
        replica = self._replicas.pop(stream_id, None)
        if replica is None:
            return
        if replica.ready_at is not None:
            log.info("authz replica gone", extra=replica.as_dict())
            self._changed()

    def endpoints(self) -> tuple[Address, ...]:
        """The distinct addresses of the ready replicas, in a stable order (by IP, port):
        the same set always gives the same EDS content."""
        ready = {r.address for r in self._replicas.values() if r.ready_at is not None}
        return tuple(sorted(ready, key=_address_order))

    def status(self) -> list[dict[str, Any]]:
        """Every registered replica (ready or not yet), by stream."""
        return [self._replicas[k].as_dict() for k in sorted(self._replicas)]

    def _changed(self) -> None:
        self._ready_gauge.set(len(self.endpoints()))
        self._on_change()


def _address_order(address: Address) -> tuple[int, int, int]:
    ip = ipaddress.ip_address(address[0])
    return ip.version, int(ip), address[1]
