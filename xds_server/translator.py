"""Policy → Envoy resources, per node group. Pure: no I/O, no state.

One node group per :class:`~meshward.policy.model.Gateway` (keyed by its name, which is
the ``node.cluster`` its Envoys announce). For each gateway:

* **CDS/EDS** — one cluster per service its routes reference (cluster name = service
  name), fed by EDS over ADS; plus :data:`AUTHZ_CLUSTER` (HTTP/2, ``LEAST_REQUEST``,
  the ext_authz gRPC service; its endpoints are what the caller passes: the static
  ``--authz`` ones plus the replicas registered over ADS, see
  :mod:`xds_server.replicas`). EDS can only carry IP addresses, so a cluster with any
  DNS-named endpoint is ``STRICT_DNS`` with an inline ``load_assignment`` and has no
  EDS resource.
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

**Zero-trust transport.** Certificates come in as a :class:`Credentials` value (built by
:mod:`xds_server.credentials` from the PKI), so translation stays pure. Every secret
travels over SDS on the same ADS stream; listeners and clusters name it with an
``sds_config`` of ADS, ``V3`` and ``initial_fetch_timeout`` :data:`SDS_FETCH_TIMEOUT`
(a missing secret holds a proxy for that long, not Envoy's default 15 s). The secrets of
a node group, by their fixed names:

* :data:`SVID_SECRET` (``svid``) — the workload's X.509 SVID: chain + private key;
* :data:`TRUST_BUNDLE_SECRET` (``trust-bundle``) — the mesh CA bundle (``trusted_ca``);
* :data:`SERVER_CERT_SECRET` (``server-cert``) — a TLS gateway's server certificate.

A group holds only the secrets its listeners and clusters reference.

* **Gateway with ``tls``** — the listener terminates TLS (``DownstreamTlsContext``,
  ``server-cert``; TLS 1.2 to 1.3, or 1.3 only with ``min_version: "1.3"``; TLS 1.2 only
  with ECDHE + AES-GCM/CHACHA20 suites; ALPN ``h2``, ``http/1.1``; codec AUTO). Without
  ``tls``, plaintext HTTP.
* **Route to a service with a ``sidecar``** — the gateway's cluster for that service
  points at the sidecar's address and port, over mTLS (``UpstreamTlsContext``): the
  gateway's ``svid`` as client certificate; the peer must chain to ``trust-bundle``
  *and* carry the URI SAN that is exactly the service's SPIFFE ID
  (``combined_validation_context``), so a certificate of another workload of the same
  CA is refused. Services without a sidecar are reached in plaintext, as before.
* **Sidecar node group** (:meth:`Policy.sidecar_group
  <meshward.policy.model.Policy.sidecar_group>`, ``<service>-sidecar``) — one mTLS-only
  listener (name = group) on the sidecar address: ``require_client_certificate``, the
  service's ``svid``, peers must chain to ``trust-bundle`` and carry a URI SAN starting
  with ``spiffe://<trust domain>/``. Its HTTP connection manager runs the same
  ``ext_authz`` as a gateway, then the router; one route, :func:`inbound_route_name`
  (``<service>.inbound``), ``prefix: /``, to a plaintext cluster (name = service) of
  the service's endpoints, with ``context_extensions`` route = ``<service>.inbound``,
  service = the service, gateway = the sidecar group, policy version. Envoy puts the
  peer's URI SAN into ``CheckRequest.attributes.source.principal``.
* **x-forwarded-client-cert** — never trusted from a client. Gateways ``SANITIZE`` it
  (removed; outside clients present no certificate to forward). Sidecars
  ``SANITIZE_SET`` with ``uri: true``: a client-sent value is dropped and replaced by
  one Envoy builds from the verified peer (``By=<sidecar SPIFFE ID>;Hash=…;URI=<peer
  SPIFFE ID>``), so the app may read its caller's identity from it.
* **Mesh-internal hops are TLS 1.3 only** (both ends are Envoy), gateway → sidecar.
* **Envoy → authz** (when ``credentials`` hold an SVID for :data:`AUTHZ_GROUP`, i.e.
  always with the PKI wired): the ``meshward_authz`` cluster of every node group is
  mTLS (TLS 1.3, ALPN ``h2``) with the group's ``svid`` as client certificate, and authz
  must chain to ``trust-bundle`` and carry exactly :meth:`Policy.spiffe_id
  <meshward.policy.model.Policy.spiffe_id>` ``("meshward-authz")``. Every gateway then
  has an SVID. The :data:`AUTHZ_GROUP` snapshot carries ``svid`` (authz's SVID) and
  ``trust-bundle`` beside the policy; authz serves gRPC over TLS with them and requires
  a client certificate of the trust domain (:mod:`authz.transport`).
* Known gap (loopback only): the ADS connection that carries the secrets (private keys
  included) is still plaintext.

**Tracing** (only with ``policy.tracing``; without it nothing about tracing is emitted).
Every Envoy node group (gateways and sidecars, not :data:`AUTHZ_GROUP`) gets the cluster
:data:`COLLECTOR_CLUSTER`: HTTP/2 (OTLP/gRPC), plaintext, ``STATIC`` for an IP collector
and ``STRICT_DNS`` for a DNS name (inline endpoints either way: no EDS round trip).
Every HTTP connection manager gets ``tracing`` with Envoy's OpenTelemetry tracer
(:data:`OTEL_TRACER`) exporting to it, ``service_name`` = the node group (``edge``,
``orders-sidecar``: the ``service.name`` of its spans), a parent-based sampler around a
trace-id ratio sampler at the policy's ``sampling_percent`` (the connection manager's
own ``random_sampling`` stays 100 %: see :func:`_hcm_tracing`) and
``spawn_upstream_span``, so each proxy's trace is ``ingress`` (SERVER) → ``async
envoy.service.auth.v3.Authorization.Check egress`` (CLIENT, whose ``traceparent`` Envoy
sends in the Check's gRPC metadata: authz's decision span continues it) and ``router
<cluster> egress`` (CLIENT, whose ``traceparent`` goes upstream: a sidecar's ``ingress``
continues the gateway's trace). A request arriving with a ``traceparent`` keeps its
sampled flag (sampled or not) whatever the percentage, so a sidecar traces exactly what
its gateway traced; ``x-client-trace-id`` forces nothing. Envoy exports in batches: when
5 spans are buffered or every 5 s (runtime keys
``tracing.opentelemetry.min_flush_spans`` and
``tracing.opentelemetry.flush_interval_ms``, set in the bootstrap, not over xDS).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    grpc_service_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.request_id.uuid.v3 import uuid_pb2
from envoy.extensions.tracers.opentelemetry.samplers.v3 import (
    parent_based_sampler_pb2,
    trace_id_ratio_based_sampler_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import http_status_pb2, percent_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.wrappers_pb2 import BoolValue

from meshward import route_context
from meshward.policy import wire
from meshward.policy.model import Gateway, Policy, Route, Service, Tracing
from xds_server import resources as rs

#: Name of the cluster that reaches the ext_authz gRPC service (every node group has it).
AUTHZ_CLUSTER = "meshward_authz"
#: Name of the cluster that reaches the OTLP/gRPC trace collector (every node group has it
#: when the policy has ``tracing``).
COLLECTOR_CLUSTER = "meshward-otlp-collector"
#: Envoy's OpenTelemetry tracer extension (``OpenTelemetryConfig``) and its samplers.
OTEL_TRACER = "envoy.tracers.opentelemetry"
PARENT_BASED_SAMPLER = "envoy.tracers.opentelemetry.samplers.parent_based"
RATIO_SAMPLER = "envoy.tracers.opentelemetry.samplers.trace_id_ratio_based"
#: The HTTP filter names, as Envoy knows them (also the ``typed_per_filter_config`` keys).
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
ROUTER_FILTER = "envoy.filters.http.router"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
#: The node group (``node.cluster``) of authz replicas: they get the policy over ADS.
AUTHZ_GROUP = wire.AUTHZ_GROUP
#: The name of the one policy resource in :data:`AUTHZ_GROUP`.
POLICY_RESOURCE_NAME = rs.SINGLETON_NAMES[rs.POLICY]
#: Where authz listens when nothing else is said (``meshward xds --authz``).
DEFAULT_AUTHZ_ENDPOINTS: tuple[tuple[str, int], ...] = (("127.0.0.1", 9191),)

#: SDS secret names, the same in every node group (one workload per group).
SVID_SECRET = "svid"  # noqa: S105 (a secret name, not a secret)
TRUST_BUNDLE_SECRET = "trust-bundle"  # noqa: S105
SERVER_CERT_SECRET = "server-cert"  # noqa: S105
#: How long a listener or cluster waits for a secret before giving up on it (and
#: letting the rest of the proxy initialize); Envoy's default is 15 s.
SDS_FETCH_TIMEOUT = Duration(seconds=5)
#: Suffix of a sidecar's one route name: ``<service>.inbound``.
INBOUND_ROUTE_SUFFIX = ".inbound"
#: TLS 1.2 cipher suites of TLS gateways: forward secrecy (ECDHE) and AEAD only.
#: (TLS 1.3 suites are fixed by BoringSSL and all modern.)
TLS12_CIPHER_SUITES = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
)
#: ALPN a TLS gateway offers outside clients (HTTP/2 first; the codec is AUTO).
GATEWAY_ALPN = ("h2", "http/1.1")

_CONNECT_TIMEOUT = Duration(seconds=1)
_AUTHZ_TIMEOUT = Duration(seconds=1)
_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TLS = common_pb2.TlsParameters
_HCM = hcm_pb2.HttpConnectionManager

#: type URL → resources of that type, for one node group.
GroupResources = dict[str, list[Message]]


#: HTTP statuses Envoy may answer with when authz cannot be reached (fail closed).
AUTHZ_FAILURE_STATUSES = {
    403: http_status_pb2.StatusCode.Forbidden,
    503: http_status_pb2.StatusCode.ServiceUnavailable,
}
DEFAULT_AUTHZ_FAILURE_STATUS = 403


class KeyPair(Protocol):
    """What the translator needs of an issued certificate (``meshward.pki.IssuedCert``)."""

    @property
    def chain_pem(self) -> bytes: ...

    @property
    def key_pem(self) -> bytes: ...


@dataclass(frozen=True)
class Credentials:
    """The certificates a translation may reference: the translator's PKI input.

    ``svids``: workload (service or gateway name, or :data:`AUTHZ_GROUP` for authz's
    own SVID, which turns on mTLS to authz) → its SVID; ``server_certs``: TLS
    gateway name → its server certificate; ``bundle_pem``: the CA bundle peers are
    verified against; ``generation``: changes whenever any of them does (it becomes
    part of the snapshot version).
    """

    bundle_pem: bytes
    svids: Mapping[str, KeyPair] = field(default_factory=dict)
    server_certs: Mapping[str, KeyPair] = field(default_factory=dict)
    generation: str = ""


@dataclass(frozen=True)
class CredentialNeeds:
    """Which certificates a policy's translation references.

    ``svids``: workloads that need an SVID (every sidecar'd service; every gateway that
    routes to one); ``server_certs``: TLS gateway → the DNS names of its certificate.
    """

    svids: tuple[str, ...] = ()
    server_certs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.svids or self.server_certs)


def credential_needs(policy: Policy, *, authz_mtls: bool = False) -> CredentialNeeds:
    """The certificates :func:`translate` will reference for ``policy`` (pure).

    ``authz_mtls``: the Envoy → authz hop is mTLS, so every gateway needs an SVID and
    authz needs one too (workload :data:`AUTHZ_GROUP`)."""
    sidecars = {s.name for s in policy.services if s.sidecar is not None}
    svids = [
        g.name
        for g in policy.gateways
        if authz_mtls or any(r.service in sidecars for r in g.routes)
    ]
    svids += [s.name for s in policy.services if s.sidecar is not None]
    if authz_mtls:
        svids.append(AUTHZ_GROUP)
    servers = {g.name: g.tls.dns_names for g in policy.gateways if g.tls is not None}
    return CredentialNeeds(tuple(dict.fromkeys(svids)), servers)


def inbound_route_name(service: str) -> str:
    """The name of a sidecar's one route (``<service>.inbound``): what authz sees as
    ``meshward.route`` for requests arriving at the service's sidecar."""
    return service + INBOUND_ROUTE_SUFFIX


def translate(
    policy: Policy,
    authz_endpoints: Sequence[tuple[str, int]] = DEFAULT_AUTHZ_ENDPOINTS,
    *,
    authz_failure_status: int = DEFAULT_AUTHZ_FAILURE_STATUS,
    credentials: Credentials | None = None,
) -> dict[str, GroupResources]:
    """Translate ``policy`` into resources for every node group: Envoy resources per
    gateway name and per sidecar group, and the policy resource for :data:`AUTHZ_GROUP`.

    ``authz_endpoints`` are the (host, port) pairs of the ext_authz service;
    ``authz_failure_status`` (403 or 503) is what Envoy answers when authz cannot be
    reached or fails: Envoy always fails closed (``failure_mode_allow: false``).
    ``credentials`` must hold every certificate of :func:`credential_needs` (``None``
    is fine for a policy without TLS gateways and sidecars). Raises ``ValueError`` if
    the policy references a service it does not define, names a service like the
    authz cluster (or, with tracing, like the collector cluster), a gateway like the
    authz group, a route like a sidecar's inbound route, or needs a certificate
    ``credentials`` lacks.
    """
    if authz_failure_status not in AUTHZ_FAILURE_STATUSES:
        raise ValueError(
            f"authz failure status {authz_failure_status} is not supported; use 403 or 503"
        )
    _check_credentials(policy, credentials)
    authz_mtls = credentials is not None and AUTHZ_GROUP in credentials.svids
    if authz_mtls:
        for service in policy.services:
            if service.name == AUTHZ_GROUP:
                raise ValueError(
                    f"service name {service.name!r} is reserved for authz (its SPIFFE ID "
                    "would be authz's); rename the service"
                )
    if policy.tracing is not None:
        # A service the proxies get a cluster for (a gateway routes to it, or it has a
        # sidecar) cannot take the collector cluster's name.
        proxied = {r.service for r in policy.routes()}
        proxied |= {s.name for s in policy.services if s.sidecar is not None}
        if COLLECTOR_CLUSTER in proxied:
            raise ValueError(
                f"service name {COLLECTOR_CLUSTER!r} is reserved for the trace collector "
                "cluster; rename the service"
            )
    inbound = {inbound_route_name(s.name) for s in policy.services if s.sidecar is not None}
    for route in policy.routes():
        if route.name in inbound:
            raise ValueError(
                f"route name {route.name!r} is reserved for the inbound route of the "
                "sidecar of that service; rename the route"
            )
    groups: dict[str, GroupResources] = {}
    for gateway in policy.gateways:
        if gateway.name == AUTHZ_GROUP:
            raise ValueError(f"gateway name {gateway.name!r} is reserved for authz replicas")
        groups[gateway.name] = _gateway_resources(
            policy, gateway, authz_endpoints, authz_failure_status, credentials
        )
    for service in policy.services:
        if service.sidecar is not None and credentials is not None:
            group = policy.sidecar_group(service.name)
            if group in groups:
                raise ValueError(
                    f"gateway {group!r} has the node group name of the sidecar of service "
                    f"{service.name!r}; rename the gateway"
                )
            groups[group] = _sidecar_resources(
                policy, service, authz_endpoints, authz_failure_status, credentials
            )
    groups[AUTHZ_GROUP] = {rs.POLICY: [wire.to_resource(policy)]}
    if credentials is not None and authz_mtls:
        groups[AUTHZ_GROUP][rs.SECRET] = [
            _certificate_secret(SVID_SECRET, credentials.svids[AUTHZ_GROUP]),
            _bundle_secret(credentials.bundle_pem),
        ]
    return groups


def _check_credentials(policy: Policy, credentials: Credentials | None) -> None:
    authz_mtls = credentials is not None and AUTHZ_GROUP in credentials.svids
    needs = credential_needs(policy, authz_mtls=authz_mtls)
    if not needs:
        return
    if credentials is None:
        what = [f"gateway {g!r} has tls" for g in needs.server_certs]
        what += [
            f"service {s.name!r} has a sidecar" for s in policy.services if s.sidecar is not None
        ]
        raise ValueError(
            f"the policy needs certificates ({'; '.join(what)}) but no CA is configured; "
            "give the xDS server a CA (meshward xds --ca-dir, or --ca-cert/--ca-key)"
        )
    missing = [f"SVID of {w!r}" for w in needs.svids if w not in credentials.svids]
    missing += [
        f"server certificate of gateway {g!r}"
        for g in needs.server_certs
        if g not in credentials.server_certs
    ]
    if missing:
        raise ValueError("credentials lack " + ", ".join(missing))


def snapshot_version(
    policy: Policy,
    authz_endpoints: Sequence[tuple[str, int]] = DEFAULT_AUTHZ_ENDPOINTS,
    *,
    authz_failure_status: int = DEFAULT_AUTHZ_FAILURE_STATUS,
    credentials: Credentials | None = None,
) -> str:
    """The ``version_info`` of the snapshots built from these inputs.

    ``<policy version>[-<8 hex digits>][+<credential generation>]``: the policy version
    itself when the other translator inputs are the defaults, otherwise followed by
    ``-`` and a hash of them (so a change of authz endpoints is a new version even though
    the policy did not change); with ``credentials``, followed by ``+`` and their
    generation, so a certificate rotation is a new snapshot version while the policy
    version stays the same.
    """
    endpoints = [[host, port] for host, port in authz_endpoints]
    inputs: list[object] = [endpoints]
    if authz_failure_status != DEFAULT_AUTHZ_FAILURE_STATUS:
        inputs.append(authz_failure_status)
    if inputs == [[[h, p] for h, p in DEFAULT_AUTHZ_ENDPOINTS]]:
        version = policy.version
    else:
        digest = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()
        version = f"{policy.version}-{digest[:8]}"
    if credentials is not None and credentials.generation:
        version = f"{version}+{credentials.generation}"
    return version


def _gateway_resources(
    policy: Policy,
    gateway: Gateway,
    authz_endpoints: Sequence[tuple[str, int]],
    authz_failure_status: int,
    credentials: Credentials | None,
) -> GroupResources:
    clusters: list[Message] = []
    assignments: list[Message] = []
    mtls_upstream = False

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
        if service.sidecar is not None:
            # Through the service's sidecar, over mTLS, checking its SPIFFE ID.
            sidecar = [(service.sidecar.address, service.sidecar.port)]
            cluster, assignment = _cluster(name, sidecar)
            cluster.transport_socket.CopyFrom(_upstream_tls(policy.spiffe_id(name)))
            mtls_upstream = True
        else:
            addresses = [(e.address, e.port) for e in service.endpoints]
            cluster, assignment = _cluster(name, addresses)
        clusters.append(cluster)
        if assignment is not None:
            assignments.append(assignment)

    cluster, assignment = _authz_cluster(policy, authz_endpoints, credentials)
    clusters.append(cluster)
    if assignment is not None:
        assignments.append(assignment)
    mtls_upstream = mtls_upstream or cluster.HasField("transport_socket")
    if policy.tracing is not None:
        clusters.append(_collector_cluster(policy.tracing))

    manager = _http_connection_manager(
        gateway.name, authz_failure_status, _HCM.SANITIZE, set_uri=False, tracing=policy.tracing
    )
    tls = None
    if gateway.tls is not None:
        only_13 = gateway.tls.min_version == "1.3"
        tls = tls_pb2.DownstreamTlsContext(
            common_tls_context=tls_pb2.CommonTlsContext(
                tls_params=_TLS(
                    tls_minimum_protocol_version=_TLS.TLSv1_3 if only_13 else _TLS.TLSv1_2,
                    tls_maximum_protocol_version=_TLS.TLSv1_3,
                    cipher_suites=[] if only_13 else list(TLS12_CIPHER_SUITES),
                ),
                tls_certificate_sds_secret_configs=[_sds(SERVER_CERT_SECRET)],
                alpn_protocols=list(GATEWAY_ALPN),
            )
        )
    resources: GroupResources = {
        rs.CLUSTER: clusters,
        rs.ENDPOINT: assignments,
        rs.LISTENER: [_listener(gateway.name, gateway.address, gateway.port, manager, tls)],
        rs.ROUTE: [_route_configuration(policy, gateway)],
    }
    secrets: list[Message] = []
    if credentials is not None and gateway.tls is not None:
        secrets.append(
            _certificate_secret(SERVER_CERT_SECRET, credentials.server_certs[gateway.name])
        )
    if credentials is not None and mtls_upstream:
        secrets.append(_certificate_secret(SVID_SECRET, credentials.svids[gateway.name]))
        secrets.append(_bundle_secret(credentials.bundle_pem))
    if secrets:
        resources[rs.SECRET] = secrets
    return resources


def _sidecar_resources(
    policy: Policy,
    service: Service,
    authz_endpoints: Sequence[tuple[str, int]],
    authz_failure_status: int,
    credentials: Credentials,
) -> GroupResources:
    assert service.sidecar is not None
    group = policy.sidecar_group(service.name)
    clusters: list[Message] = []
    assignments: list[Message] = []
    for cluster, assignment in (
        _cluster(service.name, [(e.address, e.port) for e in service.endpoints]),
        _authz_cluster(policy, authz_endpoints, credentials),
    ):
        clusters.append(cluster)
        if assignment is not None:
            assignments.append(assignment)
    if policy.tracing is not None:
        clusters.append(_collector_cluster(policy.tracing))

    manager = _http_connection_manager(
        group, authz_failure_status, _HCM.SANITIZE_SET, set_uri=True, tracing=policy.tracing
    )
    tls = tls_pb2.DownstreamTlsContext(
        require_client_certificate=BoolValue(value=True),
        common_tls_context=_mesh_tls_context(
            string_pb2.StringMatcher(prefix=f"spiffe://{policy.mesh.trust_domain}/")
        ),
    )
    listener = _listener(group, service.sidecar.address, service.sidecar.port, manager, tls)
    name = inbound_route_name(service.name)
    route = route_components_pb2.Route(
        name=name,
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(cluster=service.name),
    )
    route.typed_per_filter_config[EXT_AUTHZ_FILTER].CopyFrom(
        rs.pack(_per_route(policy, name, service.name, group))
    )
    routes = route_pb2.RouteConfiguration(
        name=group,
        virtual_hosts=[
            route_components_pb2.VirtualHost(name=f"{group}:*", domains=["*"], routes=[route])
        ],
    )
    return {
        rs.CLUSTER: clusters,
        rs.ENDPOINT: assignments,
        rs.SECRET: [
            _certificate_secret(SVID_SECRET, credentials.svids[service.name]),
            _bundle_secret(credentials.bundle_pem),
        ],
        rs.LISTENER: [listener],
        rs.ROUTE: [routes],
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


def authz_uses_eds(authz_endpoints: Sequence[tuple[str, int]]) -> bool:
    """Whether :data:`AUTHZ_CLUSTER` is an EDS cluster for these endpoints: yes unless one
    is a DNS name (then ``STRICT_DNS`` with inline endpoints; EDS carries IPs only).

    Only an EDS authz cluster can take the addresses of registered replicas: its
    endpoints change by EDS alone, the cluster (CDS) stays the same."""
    return all(is_ip(host) for host, _ in authz_endpoints)


def authz_load_assignment(
    authz_endpoints: Sequence[tuple[str, int]],
) -> endpoint_pb2.ClusterLoadAssignment:
    """The EDS resource of :data:`AUTHZ_CLUSTER`: one locality with every endpoint.

    An empty list is a valid assignment with no hosts: Envoy's ext_authz then fails
    every Check (``no healthy upstream``) and answers the configured failure status
    (``failure_mode_allow: false``): closed, never open."""
    return _load_assignment(AUTHZ_CLUSTER, authz_endpoints)


def _authz_cluster(
    policy: Policy,
    authz_endpoints: Sequence[tuple[str, int]],
    credentials: Credentials | None,
) -> tuple[cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment | None]:
    """The HTTP/2 ext_authz cluster; mTLS to authz's SPIFFE ID when authz has an SVID.

    Its endpoints are authz processes (replicas), each a separate endpoint. Envoy opens
    one long-lived HTTP/2 connection per endpoint (per worker) and picks an endpoint
    *per Check*, not per connection, so the load-balancing policy decides the spread:
    ``LEAST_REQUEST`` (power of two choices on in-flight Checks) rather than
    ``ROUND_ROBIN``, because replicas are single Python processes whose speed varies
    (GIL pauses, a shared or busier core): a slow replica accumulates in-flight Checks
    and gets fewer new ones, where round robin would keep feeding it its full share.
    With equal load it spreads evenly like round robin.

    Per-connection concurrency is not a limit: Envoy's HTTP/2 ``max_concurrent_streams``
    default (2^31 - 1) and authz's gRPC server (no ``MAX_CONCURRENT_STREAMS`` setting)
    let one connection carry every concurrent Check; a second connection to the same
    process would add no CPU to it. Scale by adding replicas (``meshward authz --xds``,
    one per free core, ``--cpu`` to pin each), which register themselves as endpoints.
    """
    cluster, assignment = _cluster(AUTHZ_CLUSTER, list(authz_endpoints), http2=True)
    cluster.lb_policy = cluster_pb2.Cluster.LEAST_REQUEST
    if credentials is not None and AUTHZ_GROUP in credentials.svids:
        cluster.transport_socket.CopyFrom(
            _upstream_tls(policy.spiffe_id(AUTHZ_GROUP), alpn=("h2",))
        )
    return cluster, assignment


def _collector_cluster(tracing: Tracing) -> cluster_pb2.Cluster:
    """The HTTP/2 plaintext cluster of the OTLP/gRPC collector, endpoints inline: ``STATIC``
    for an IP, ``STRICT_DNS`` (re-resolved) for a DNS name."""
    address = tracing.collector_address
    cluster, assignment = _cluster(
        COLLECTOR_CLUSTER, [(address, tracing.collector_port)], http2=True
    )
    if assignment is not None:  # an IP: _cluster made it EDS; a fixed address needs no EDS
        cluster.ClearField("eds_cluster_config")
        cluster.type = cluster_pb2.Cluster.STATIC
        cluster.load_assignment.CopyFrom(assignment)
    return cluster


def _hcm_tracing(tracing: Tracing, group: str) -> hcm_pb2.HttpConnectionManager.Tracing:
    """Envoy's OpenTelemetry tracer for one HTTP connection manager (see module doc).

    The sampling decision is the tracer's sampler, parent-based: a ``traceparent``'s
    sampled flag is kept, and a request without one is sampled at ``sampling_percent`` by
    its trace id. The connection manager's own ``random_sampling`` stays at 100 %: when
    it says "no", Envoy 1.40 does not consult the sampler and drops even a sampled
    parent, so a gateway at 10 % would break the traces of already-sampled requests
    (verified in ``tests/integration/test_xds_tracing_envoy.py``).
    """
    ratio = trace_id_ratio_based_sampler_pb2.TraceIdRatioBasedSamplerConfig(
        sampling_percentage=percent_pb2.FractionalPercent(
            numerator=round(tracing.sampling_percent * 10_000),
            denominator=percent_pb2.FractionalPercent.MILLION,
        )
    )
    sampler = parent_based_sampler_pb2.ParentBasedSamplerConfig(
        wrapped_sampler=extension_pb2.TypedExtensionConfig(
            name=RATIO_SAMPLER, typed_config=rs.pack(ratio)
        )
    )
    otel = opentelemetry_pb2.OpenTelemetryConfig(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=COLLECTOR_CLUSTER)
        ),
        service_name=group,
        sampler=extension_pb2.TypedExtensionConfig(
            name=PARENT_BASED_SAMPLER, typed_config=rs.pack(sampler)
        ),
    )
    return hcm_pb2.HttpConnectionManager.Tracing(
        random_sampling=percent_pb2.Percent(value=100.0),
        provider=http_tracer_pb2.Tracing.Http(name=OTEL_TRACER, typed_config=rs.pack(otel)),
        spawn_upstream_span=BoolValue(value=True),
    )


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


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    """A reference to secret ``name``, fetched over ADS (waits at most 5 s for it)."""
    source = _ads_config_source()
    source.initial_fetch_timeout.CopyFrom(SDS_FETCH_TIMEOUT)
    return secret_pb2.SdsSecretConfig(name=name, sds_config=source)


def _certificate_secret(name: str, cert: KeyPair) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=bytes(cert.chain_pem)),
            private_key=base_pb2.DataSource(inline_bytes=bytes(cert.key_pem)),
        ),
    )


def _bundle_secret(bundle_pem: bytes) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=TRUST_BUNDLE_SECRET,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=bytes(bundle_pem))
        ),
    )


def _mesh_tls_context(peer: string_pb2.StringMatcher) -> tls_pb2.CommonTlsContext:
    """The TLS 1.3 context of a mesh-internal hop: our SVID, peers verified against the
    trust bundle *and* a URI SAN matching ``peer``."""
    san = common_pb2.SubjectAltNameMatcher(
        san_type=common_pb2.SubjectAltNameMatcher.URI, matcher=peer
    )
    return tls_pb2.CommonTlsContext(
        tls_params=_TLS(
            tls_minimum_protocol_version=_TLS.TLSv1_3,
            tls_maximum_protocol_version=_TLS.TLSv1_3,
        ),
        tls_certificate_sds_secret_configs=[_sds(SVID_SECRET)],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=common_pb2.CertificateValidationContext(
                match_typed_subject_alt_names=[san]
            ),
            validation_context_sds_secret_config=_sds(TRUST_BUNDLE_SECRET),
        ),
    )


def _upstream_tls(spiffe_id: str, alpn: Sequence[str] = ()) -> base_pb2.TransportSocket:
    """mTLS to a peer (a sidecar, authz) that must present exactly ``spiffe_id``."""
    common = _mesh_tls_context(string_pb2.StringMatcher(exact=spiffe_id))
    common.alpn_protocols.extend(alpn)
    context = tls_pb2.UpstreamTlsContext(common_tls_context=common)
    return base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET, typed_config=rs.pack(context))


def _http_connection_manager(
    name: str,
    authz_failure_status: int,
    forward_client_cert: hcm_pb2.HttpConnectionManager.ForwardClientCertDetails.ValueType,
    *,
    set_uri: bool,
    tracing: Tracing | None = None,
) -> hcm_pb2.HttpConnectionManager:
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
        stat_prefix=name,
        codec_type=_HCM.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads_config_source(), route_config_name=name),
        strip_any_host_port=True,
        normalize_path=BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=_HCM.UNESCAPE_AND_REDIRECT,
        # Envoy's defaults, stated: generate x-request-id (UUID) for every request.
        generate_request_id=BoolValue(value=True),
        request_id_extension=hcm_pb2.RequestIDExtension(
            typed_config=rs.pack(uuid_pb2.UuidRequestIdConfig())
        ),
        # x-forwarded-client-cert is never trusted from a client (see module doc).
        forward_client_cert_details=forward_client_cert,
        http_filters=[
            hcm_pb2.HttpFilter(name=EXT_AUTHZ_FILTER, typed_config=rs.pack(ext_authz)),
            # The router must be last: it ends the filter chain.
            hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=rs.pack(router_pb2.Router())),
        ],
    )
    if set_uri:
        manager.set_current_client_cert_details.uri = True
    if tracing is not None:
        manager.tracing.CopyFrom(_hcm_tracing(tracing, name))
    return manager


def _listener(
    name: str,
    address: str,
    port: int,
    manager: hcm_pb2.HttpConnectionManager,
    tls: tls_pb2.DownstreamTlsContext | None,
) -> listener_pb2.Listener:
    chain = listener_components_pb2.FilterChain(
        filters=[listener_components_pb2.Filter(name=HCM_FILTER, typed_config=rs.pack(manager))]
    )
    if tls is not None:
        chain.transport_socket.CopyFrom(
            base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET, typed_config=rs.pack(tls))
        )
    return listener_pb2.Listener(
        name=name, address=_socket_address(address, port), filter_chains=[chain]
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


def _per_route(
    policy: Policy, route: str, service: str, group: str
) -> ext_authz_pb2.ExtAuthzPerRoute:
    return ext_authz_pb2.ExtAuthzPerRoute(
        check_settings=ext_authz_pb2.CheckSettings(
            context_extensions={
                route_context.ROUTE: route,
                route_context.SERVICE: service,
                route_context.GATEWAY: group,
                route_context.POLICY_VERSION: policy.version,
            }
        )
    )


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
    per_route = _per_route(policy, route.name, route.service, gateway.name)
    envoy_route = route_components_pb2.Route(
        name=route.name,
        match=match,
        route=route_components_pb2.RouteAction(cluster=route.service),
    )
    envoy_route.typed_per_filter_config[EXT_AUTHZ_FILTER].CopyFrom(rs.pack(per_route))
    return envoy_route
