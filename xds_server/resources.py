"""xDS resource types: type URLs, their short names, and ``Any`` packing.

The counterpart of go-control-plane's ``pkg/resource``. The order of
:data:`PUSH_ORDER` is the order a new snapshot is pushed on a stream: clusters and
their endpoints before the listeners and routes that reference them, so Envoy never
holds a route to a cluster it does not know yet.

Secrets (SDS) go after CDS/EDS and before LDS/RDS. Envoy asks for a secret *by name*
(like RDS and EDS) once a cluster or listener that references it arrives, and that
first request is answered at once, whatever the push order. The order matters for
*updates* of secrets Envoy already holds: pushed before the listeners, a listener
update that arrives in the same snapshot starts handshaking with the new certificate,
never with one the snapshot already replaced; pushed after the clusters, a cluster
whose TLS settings changed in the same snapshot still finds its (unchanged-name)
secrets in place. A certificate rotation changes only secrets, so only SDS goes out.
"""

from __future__ import annotations

from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import Message

_PREFIX = "type.googleapis.com/"

CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
#: SDS: certificates, private keys and trust bundles, requested by name.
SECRET = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
#: meshward's own resource: the compiled policy, served to authz replicas over ADS.
POLICY = _PREFIX + "meshward.v1.PolicyResource"

#: Push order for a new snapshot on one stream: CDS, EDS, SDS, LDS, RDS (then meshward's
#: own). See the module docstring for why secrets sit between endpoints and listeners.
PUSH_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, SECRET, LISTENER, ROUTE, POLICY)

#: State-of-the-world types: every response carries *all* resources of the type and a
#: name missing from a response is a deletion. The other types (RDS, EDS, SDS) carry
#: only the names the client asked for.
WILDCARD_TYPES = frozenset({CLUSTER, LISTENER, POLICY})

#: Types whose dropped resources are removed only after the rest of a push (make before
#: break): routes may still point at a cluster until the new RDS arrives.
REMOVE_LAST_TYPES = frozenset({CLUSTER})

#: Short names for logs, metrics labels and status pages.
SHORT_NAMES: dict[str, str] = {
    CLUSTER: "cds",
    ENDPOINT: "eds",
    LISTENER: "lds",
    ROUTE: "rds",
    SECRET: "sds",
    POLICY: "policy",
}


def short_name(type_url: str) -> str:
    """``cds``/``eds``/``sds``/``lds``/``rds`` for known types, else the message name."""
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])


def pack(message: Message) -> AnyMessage:
    """Wrap ``message`` in an ``Any`` (serializes it once)."""
    wrapped = AnyMessage()
    wrapped.Pack(message)
    return wrapped


def type_url_of(message: Message) -> str:
    """The ``type.googleapis.com/...`` URL of a message."""
    return _PREFIX + message.DESCRIPTOR.full_name


#: Types with one resource per snapshot and no name field: the fixed name it goes by.
SINGLETON_NAMES: dict[str, str] = {POLICY: "policy"}


def resource_name(message: Message) -> str:
    """The xDS name of a resource: ``cluster_name`` for a ClusterLoadAssignment, the
    fixed :data:`SINGLETON_NAMES` entry for a singleton type, else ``name``."""
    full_name = message.DESCRIPTOR.full_name
    if full_name == "envoy.config.endpoint.v3.ClusterLoadAssignment":
        return str(getattr(message, "cluster_name"))  # noqa: B009
    singleton = SINGLETON_NAMES.get(_PREFIX + full_name)
    if singleton is not None:
        return singleton
    return str(getattr(message, "name"))  # noqa: B009
