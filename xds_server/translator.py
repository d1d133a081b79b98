"""Policy → Envoy resources, per node group. Pure: no I/O, no state.

One node group per :class:`~meshward.policy.model.Gateway` (keyed by its name, which is
the ``node.cluster`` its Envoys announce). For each gateway:

* **CDS/EDS** — one cluster per service its routes reference (cluster name = service
  name), fed by EDS over ADS; plus :data:`AUTHZ_CLUSTER` (HTTP/2, the ext_authz gRPC
  service). EDS can only carry IP addresses, so a cluster with any DNS-named endpoint
  is ``STRICT_DNS`` with an inline ``load_assignment`` and has no EDS resource.
* **LDS** — one listener (name = gateway name) whose HTTP connection manager gets its
  routes by RDS over ADS and runs ``ext_authz`` then ``router`` (the router is always
  last: filters after it never run).
* **RDS** — one route configuration (name = gateway name). A virtual host per distinct
  host named by a route, holding in policy order the routes for that host and the
  host-less routes; and a ``*`` virtual host holding only the host-less routes. Every
  route carries ``ExtAuthzPerRoute.check_settings.context_extensions`` with the keys of
  :mod:`meshward.route_context`, which is how authz learns which route matched.
  (Envoy marks ``context_extensions`` sensitive: ``/config_dump`` shows the keys with
  ``[redacted]`` values; authz receives the real values.)

Plus one node group for authz replicas, :data:`AUTHZ_GROUP` (the ``node.cluster`` that
:mod:`authz.policy_source` announces), holding exactly one
``meshward.v1.PolicyResource`` named :data:`POLICY_RESOURCE_NAME`: the whole policy
(JWKS included) as canonical JSON plus its version (:mod:`meshward.policy.wire`). The
loader reserves gateway names starting with ``meshward-`` so no gateway can take it.

Requests that match no route: the router answers ``404`` and no
upstream is contacted. ``ext_authz`` is *not* consulted for them: Envoy's ext_authz
filter skips the check when the request has no route (verified with Envoy 1.40 in
``tests/integration/test_xds_envoy.py``, which counts Check calls), so authz never
sees a request without ``meshward.route``.

Path normalization (``normalize_path``, ``merge_slashes``, escaped-slash unescape and
redirect) is on, so the path that routes, the path authz checks and the path the
upstream serves are the same string (``/orders/../admin`` cannot take ``/orders``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2, grpc_service_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.request_id.uuid.v3 import uuid_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.wrappers_pb2 import BoolValue

from meshward import route_context
from meshward.policy import wire
from meshward.policy.model import Gateway, Policy, Route
from xds_server import resources as rs

#: Name of the cluster that reaches the ext_authz gRPC service (every node group has it).
AUTHZ_CLUSTER = "meshward_authz"
#: The HTTP filter names, as Envoy knows them (also the ``typed_per_filter_config`` keys).
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
ROUTER_FILTER = "envoy.filters.http.router"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
#: The node group (``node.cluster``) of authz replicas: they get the policy over ADS.
AUTHZ_GROUP = wire.AUTHZ_GROUP
#: The name of the one policy resource in :data:`AUTHZ_GROUP`.
POLICY_RESOURCE_NAME = rs.SINGLETON_NAMES[rs.POLICY]
#: Where authz listens when nothing else is said (``meshward xds --authz``).
DEFAULT_AUTHZ_ENDPOINTS: tuple[tuple[str, int], ...] = (("127.0.0.1", 9191),)

_CONNECT_TIMEOUT = Duration(seconds=1)
_AUTHZ_TIMEOUT = Duration(seconds=1)
_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

#: type URL → resources of that type, for one node group.
GroupResources = dict[str, list[Message]]


#: HTTP statuses Envoy may answer with when authz cannot be reached (fail closed).
AUTHZ_FAILURE_STATUSES = {
    403: http_status_pb2.StatusCode.Forbidden,
    503: http_status_pb2.StatusCode.ServiceUnavailable,
}
DEFAULT_AUTHZ_FAILURE_STATUS = 403


def translate(
    policy: Policy,
    authz_endpoints: Sequence[tuple[str, int]] = DEFAULT_AUTHZ_ENDPOINTS,
    *,
    authz_failure_status: int = DEFAULT_AUTHZ_FAILURE_STATUS,
) -> dict[str, GroupResources]:
    """Translate ``policy`` into resources for every node group: Envoy resources per
    gateway name, and the policy resource for :data:`AUTHZ_GROUP`.

    ``authz_endpoints`` are the (host, port) pairs of the ext_authz service;
    ``authz_failure_status`` (403 or 503) is what Envoy answers when authz cannot be
    reached or fails: Envoy always fails closed (``failure_mode_allow: false``). Raises
    ``ValueError`` if the policy references a service it does not define, names a
    service like the authz cluster, or names a gateway like the authz group (the loader
    rejects all of these first).
    """
    if authz_failure_status not in AUTHZ_FAILURE_STATUSES:
        raise ValueError(
            f"authz failure status {authz_failure_status} is not supported; use 403 or 503"
        )
    groups: dict[str, GroupResources] = {}
    for gateway in policy.gateways:
        if gateway.name == AUTHZ_GROUP:
            raise ValueError(f"gateway name {gateway.name!r} is reserved for authz replicas")
        groups[gateway.name] = _gateway_resources(
            policy, gateway, authz_endpoints, authz_failure_status
        )
    groups[AUTHZ_GROUP] = {rs.POLICY: [wire.to_resource(policy)]}
    return groups


def snapshot_version(
    policy: Policy,
    authz_endpoints: Sequence[tuple[str, int]] = DEFAULT_AUTHZ_ENDPOINTS,
    *,
    authz_failure_status: int = DEFAULT_AUTHZ_FAILURE_STATUS,
) -> str:
    """The ``version_info`` of the snapshots built from these inputs.

    It is the policy version itself when the other translator inputs are the defaults;
    otherwise ``"<policy version>-<8 hex digits of their hash>"``, so a change of authz
    endpoints is a new version even though the policy did not change.
    """
    endpoints = [[host, port] for host, port in authz_endpoints]
    inputs: list[object] = [endpoints]
    if authz_failure_status != DEFAULT_AUTHZ_FAILURE_STATUS:
        inputs.append(authz_failure_status)
    if inputs == [[[h, p] for h, p in DEFAULT_AUTHZ_ENDPOINTS]]:
        return policy.version
    digest = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()
    return f"{policy.version}-{digest[:8]}"


def _gateway_resources(
    policy: Policy,
    gateway: Gateway,
    authz_endpoints: Sequence[tuple[str, int]],
    authz_failure_status: int,
) -> GroupResources:
    clusters: list[Message] = []
    assignments: list[Message] = []

    service_names: list[str] = []
    for route in gateway.routes:
        if route.service not in service_names:
            service_names.append(route.service)
    for name in service_names:
        if name == AUTHZ_CLUSTER:
            raise ValueError(f"service name {name!r} is reserved for the authz cluster")
        try:
            service = policy.service(name)
        except KeyError:
            raise ValueError(
                f"gateway {gateway.name!r} routes to unknown service {name!r}"
            ) from None
        addresses = [(e.address, e.port) for e in service.endpoints]
        cluster, assignment = _cluster(name, addresses)
        clusters.append(cluster)
        if assignment is not None:
            assignments.append(assignment)

    cluster, assignment = _cluster(AUTHZ_CLUSTER, list(authz_endpoints), http2=True)
    clusters.append(cluster)
    if assignment is not None:
        assignments.append(assignment)

    return {
        rs.CLUSTER: clusters,
        rs.ENDPOINT: assignments,
        rs.LISTENER: [_listener(gateway, authz_failure_status)],
        rs.ROUTE: [_route_configuration(policy, gateway)],
    }


def is_ip(address: str) -> bool:
    """True for an IPv4/IPv6 literal (what EDS can carry), False for a DNS name."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _cluster(
    name: str, addresses: Sequence[tuple[str, int]], *, http2: bool = False
) -> tuple[cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment | None]:
    """An EDS cluster and its assignment, or a STRICT_DNS cluster (assignment None)."""
    assignment = _load_assignment(name, addresses)
    cluster = cluster_pb2.Cluster(name=name, connect_timeout=_CONNECT_TIMEOUT)
    if http2:
        options = http_protocol_options_pb2.HttpProtocolOptions(
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http2_protocol_options={}
            )
        )
        cluster.typed_extension_protocol_options[_HTTP_PROTOCOL_OPTIONS].CopyFrom(rs.pack(options))
    if all(is_ip(host) for host, _ in addresses):
        cluster.type = cluster_pb2.Cluster.EDS
        cluster.eds_cluster_config.eds_config.CopyFrom(_ads_config_source())
        return cluster, assignment
    cluster.type = cluster_pb2.Cluster.STRICT_DNS
    cluster.dns_lookup_family = cluster_pb2.Cluster.V4_PREFERRED
    cluster.load_assignment.CopyFrom(assignment)
    return cluster, None


def _load_assignment(
    name: str, addresses: Iterable[tuple[str, int]]
) -> endpoint_pb2.ClusterLoadAssignment:
    locality = endpoint_components_pb2.LocalityLbEndpoints()
    for host, port in addresses:
        locality.lb_endpoints.add().endpoint.address.CopyFrom(_socket_address(host, port))
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[locality])


def _socket_address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def _ads_config_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def _listener(gateway: Gateway, authz_failure_status: int) -> listener_pb2.Listener:
    ext_authz = ext_authz_pb2.ExtAuthz(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=AUTHZ_CLUSTER),
            timeout=_AUTHZ_TIMEOUT,
        ),
        transport_api_version=config_source_pb2.ApiVersion.V3,
        failure_mode_allow=False,
        status_on_error=http_status_pb2.HttpStatus(
            code=AUTHZ_FAILURE_STATUSES[authz_failure_status]
        ),
    )
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=gateway.name,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads_config_source(), route_config_name=gateway.name),
        strip_any_host_port=True,
        normalize_path=BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.UNESCAPE_AND_REDIRECT,
        # Envoy's defaults, stated: generate x-request-id (UUID) for every request.
        generate_request_id=BoolValue(value=True),
        request_id_extension=hcm_pb2.RequestIDExtension(
            typed_config=rs.pack(uuid_pb2.UuidRequestIdConfig())
        ),
        http_filters=[
            hcm_pb2.HttpFilter(name=EXT_AUTHZ_FILTER, typed_config=rs.pack(ext_authz)),
            # The router must be last: it ends the filter chain.
            hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=rs.pack(router_pb2.Router())),
        ],
    )
    return listener_pb2.Listener(
        name=gateway.name,
        address=_socket_address(gateway.address, gateway.port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(name=HCM_FILTER, typed_config=rs.pack(manager))
                ]
            )
        ],
    )


def _route_configuration(policy: Policy, gateway: Gateway) -> route_pb2.RouteConfiguration:
    hosts: list[str] = []
    for route in gateway.routes:
        for host in _hosts(route):
            if host not in hosts:
                hosts.append(host)
    virtual_hosts = [
        route_components_pb2.VirtualHost(
            name=f"{gateway.name}:{host}",
            domains=[host],
            routes=[
                _route(policy, gateway, r)
                for r in gateway.routes
                if not _hosts(r) or host in _hosts(r)
            ],
        )
        for host in hosts
    ]
    virtual_hosts.append(
        route_components_pb2.VirtualHost(
            name=f"{gateway.name}:*",
            domains=["*"],
            routes=[_route(policy, gateway, r) for r in gateway.routes if not _hosts(r)],
        )
    )
    return route_pb2.RouteConfiguration(name=gateway.name, virtual_hosts=virtual_hosts)


def _hosts(route: Route) -> tuple[str, ...]:
    """The route's host names, lower-cased (Envoy matches domains case-insensitively
    and rejects duplicates); ``*`` among them means any host, i.e. host-less."""
    hosts = tuple(dict.fromkeys(h.lower() for h in route.match.hosts))
    return () if "*" in hosts else hosts


def _route(policy: Policy, gateway: Gateway, route: Route) -> route_components_pb2.Route:
    match = route_components_pb2.RouteMatch()
    if route.match.path is not None:
        match.path = route.match.path
    else:
        match.prefix = route.match.prefix if route.match.prefix is not None else "/"
    if route.match.methods:
        alternatives = "|".join(re.escape(m) for m in route.match.methods)
        match.headers.append(
            route_components_pb2.HeaderMatcher(
                name=":method",
                string_match=string_pb2.StringMatcher(
                    safe_regex=regex_pb2.RegexMatcher(regex=f"^({alternatives})$")
                ),
            )
        )
    per_route = ext_authz_pb2.ExtAuthzPerRoute(
        check_settings=ext_authz_pb2.CheckSettings(
            context_extensions={
                route_context.ROUTE: route.name,
                route_context.SERVICE: route.service,
                route_context.GATEWAY: gateway.name,
                route_context.POLICY_VERSION: policy.version,
            }
        )
    )
    envoy_route = route_components_pb2.Route(
        name=route.name,
        match=match,
        route=route_components_pb2.RouteAction(cluster=route.service),
    )
    envoy_route.typed_per_filter_config[EXT_AUTHZ_FILTER].CopyFrom(rs.pack(per_route))
    return envoy_route
