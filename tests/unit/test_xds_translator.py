"""Policy → Envoy resources (xds_server.translator), checked on the protos themselves."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf.message import Message

from meshward import route_context
from meshward.policy import wire
from meshward.policy.model import (
    Binding,
    Endpoint,
    Gateway,
    Issuer,
    Permission,
    Policy,
    Role,
    Route,
    RouteMatch,
    Service,
)
from xds_server import resources as rs
from xds_server.cache import Snapshot
from xds_server.translator import (
    AUTHZ_CLUSTER,
    AUTHZ_GROUP,
    DEFAULT_AUTHZ_ENDPOINTS,
    EXT_AUTHZ_FILTER,
    ROUTER_FILTER,
    snapshot_version,
    translate,
)

AUTHZ = [("127.0.0.1", 9191), ("127.0.0.2", 9192)]


def _policy() -> Policy:
    return Policy.build(
        services=(
            Service("orders", (Endpoint("127.0.0.1", 10101), Endpoint("::1", 10111))),
            Service("catalog", (Endpoint("catalog.internal", 10102),)),
            Service("unused", (Endpoint("127.0.0.1", 10103),)),
            Service("admin", (Endpoint("127.0.0.1", 10104),)),
        ),
        gateways=(
            Gateway(
                "edge",
                10000,
                (
                    Route(
                        "orders-api",
                        RouteMatch(prefix="/orders", methods=("GET", "POST")),
                        "orders",
                    ),
                    Route(
                        "shop-catalog",
                        RouteMatch(prefix="/catalog", hosts=("Shop.example", "www.example")),
                        "catalog",
                    ),
                    Route("health", RouteMatch(path="/healthz"), "orders"),
                    Route("shop-admin", RouteMatch(prefix="/", hosts=("shop.example",)), "catalog"),
                ),
                address="0.0.0.0",
            ),
            Gateway("internal", 10001, (Route("admin", RouteMatch(prefix="/"), "admin"),)),
        ),
        issuers=(Issuer("demo", "https://issuer", ("aud",), jwks={"keys": []}),),
        roles=(Role("reader", (Permission(methods=("GET",), paths=("/orders/*",)),)),),
        bindings=(Binding("b", "reader", groups=("staff",)),),
    )


def _by_name(messages: Sequence[Message]) -> dict[str, Message]:
    return {rs.resource_name(m): m for m in messages}


def _hcm(listener: listener_pb2.Listener) -> hcm_pb2.HttpConnectionManager:
    [chain] = listener.filter_chains
    [network_filter] = chain.filters
    assert network_filter.name == "envoy.filters.network.http_connection_manager"
    manager = hcm_pb2.HttpConnectionManager()
    assert network_filter.typed_config.Unpack(manager)
    return manager


def test_one_node_group_per_gateway_with_every_type() -> None:
    groups = translate(_policy(), AUTHZ)
    assert sorted(groups) == ["edge", "internal", AUTHZ_GROUP]
    for name, resources in groups.items():
        if name == AUTHZ_GROUP:
            continue
        assert set(resources) == {rs.CLUSTER, rs.ENDPOINT, rs.LISTENER, rs.ROUTE}
        # Snapshot-ready: every message sits under its own type URL.
        for type_url, messages in resources.items():
            assert all(rs.type_url_of(m) == type_url for m in messages)


def test_clusters_only_for_services_the_gateway_routes_to_plus_authz() -> None:
    edge = translate(_policy(), AUTHZ)["edge"]
    assert [rs.resource_name(c) for c in edge[rs.CLUSTER]] == ["orders", "catalog", AUTHZ_CLUSTER]
    internal = translate(_policy(), AUTHZ)["internal"]
    assert [rs.resource_name(c) for c in internal[rs.CLUSTER]] == ["admin", AUTHZ_CLUSTER]


def test_ip_endpoints_use_eds_over_ads_and_dns_names_use_strict_dns() -> None:
    edge = translate(_policy(), AUTHZ)["edge"]
    clusters = _by_name(edge[rs.CLUSTER])
    assignments = _by_name(edge[rs.ENDPOINT])

    orders = clusters["orders"]
    assert isinstance(orders, cluster_pb2.Cluster)
    assert orders.type == cluster_pb2.Cluster.EDS
    assert orders.eds_cluster_config.eds_config.HasField("ads")
    assert orders.eds_cluster_config.eds_config.resource_api_version == 2  # V3
    assert orders.connect_timeout.seconds == 1
    assert not orders.HasField("load_assignment")
    cla = assignments["orders"]
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    got = [
        (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
        for locality in cla.endpoints
        for e in locality.lb_endpoints
    ]
    assert got == [("127.0.0.1", 10101), ("::1", 10111)]

    catalog = clusters["catalog"]
    assert isinstance(catalog, cluster_pb2.Cluster)
    assert catalog.type == cluster_pb2.Cluster.STRICT_DNS
    assert not catalog.HasField("eds_cluster_config")
    [locality] = catalog.load_assignment.endpoints
    [lb] = locality.lb_endpoints
    assert lb.endpoint.address.socket_address.address == "catalog.internal"
    assert lb.endpoint.address.socket_address.port_value == 10102
    assert "catalog" not in assignments  # EDS cannot carry a DNS name
    assert set(assignments) == {"orders", AUTHZ_CLUSTER}


def test_authz_cluster_is_http2_with_the_given_endpoints() -> None:
    edge = translate(_policy(), AUTHZ)["edge"]
    authz = _by_name(edge[rs.CLUSTER])[AUTHZ_CLUSTER]
    assert isinstance(authz, cluster_pb2.Cluster)
    options = http_protocol_options_pb2.HttpProtocolOptions()
    packed = authz.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert packed.Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")
    assert authz.type == cluster_pb2.Cluster.EDS
    cla = _by_name(edge[rs.ENDPOINT])[AUTHZ_CLUSTER]
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    got = [
        (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
        for e in cla.endpoints[0].lb_endpoints
    ]
    assert got == AUTHZ

    by_dns = translate(_policy(), [("authz.internal", 9191)])["edge"]
    authz = _by_name(by_dns[rs.CLUSTER])[AUTHZ_CLUSTER]
    assert isinstance(authz, cluster_pb2.Cluster)
    assert authz.type == cluster_pb2.Cluster.STRICT_DNS
    assert "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" in (
        authz.typed_extension_protocol_options
    )
    assert AUTHZ_CLUSTER not in _by_name(by_dns[rs.ENDPOINT])
    # Only the authz cluster is HTTP/2; services keep Envoy's default (HTTP/1.1).
    orders = _by_name(by_dns[rs.CLUSTER])["orders"]
    assert isinstance(orders, cluster_pb2.Cluster)
    assert not orders.typed_extension_protocol_options


def test_listener_runs_ext_authz_fail_closed_then_router_last() -> None:
    [listener] = translate(_policy(), AUTHZ)["edge"][rs.LISTENER]
    assert isinstance(listener, listener_pb2.Listener)
    assert listener.name == "edge"
    assert listener.address.socket_address.address == "0.0.0.0"
    assert listener.address.socket_address.port_value == 10000
    manager = _hcm(listener)
    assert manager.stat_prefix == "edge"
    assert manager.strip_any_host_port
    assert manager.rds.route_config_name == "edge"
    assert manager.rds.config_source.HasField("ads")
    assert manager.generate_request_id.value
    assert manager.normalize_path.value and manager.merge_slashes
    assert [f.name for f in manager.http_filters] == [EXT_AUTHZ_FILTER, ROUTER_FILTER]

    ext_authz = ext_authz_pb2.ExtAuthz()
    assert manager.http_filters[0].typed_config.Unpack(ext_authz)
    assert ext_authz.grpc_service.envoy_grpc.cluster_name == AUTHZ_CLUSTER
    assert ext_authz.grpc_service.timeout.seconds == 1
    assert ext_authz.transport_api_version == 2  # V3
    assert ext_authz.failure_mode_allow is False
    assert ext_authz.status_on_error.code == 403


def _route_config(gateway: str = "edge") -> route_pb2.RouteConfiguration:
    [config] = translate(_policy(), AUTHZ)[gateway][rs.ROUTE]
    assert isinstance(config, route_pb2.RouteConfiguration)
    return config


def test_virtual_hosts_group_routes_by_host_in_policy_order() -> None:
    config = _route_config()
    assert config.name == "edge"
    vhosts = {tuple(v.domains): [r.name for r in v.routes] for v in config.virtual_hosts}
    assert vhosts == {
        ("shop.example",): ["orders-api", "shop-catalog", "health", "shop-admin"],
        ("www.example",): ["orders-api", "shop-catalog", "health"],
        ("*",): ["orders-api", "health"],
    }
    # The catch-all comes last, and every virtual host name is unique.
    assert list(config.virtual_hosts[-1].domains) == ["*"]
    assert len({v.name for v in config.virtual_hosts}) == len(config.virtual_hosts)


def test_route_match_action_and_context_extensions() -> None:
    policy = _policy()
    [config] = translate(policy, AUTHZ)["edge"][rs.ROUTE]
    assert isinstance(config, route_pb2.RouteConfiguration)
    routes = {r.name: r for r in config.virtual_hosts[0].routes}

    orders = routes["orders-api"]
    assert orders.match.prefix == "/orders"
    [method] = orders.match.headers
    assert method.name == ":method"
    assert method.string_match.safe_regex.regex == "^(GET|POST)$"
    assert orders.route.cluster == "orders"

    health = routes["health"]
    assert health.match.path == "/healthz"
    assert not health.match.headers  # no methods: any method

    per_route = ext_authz_pb2.ExtAuthzPerRoute()
    assert routes["shop-catalog"].typed_per_filter_config[EXT_AUTHZ_FILTER].Unpack(per_route)
    assert dict(per_route.check_settings.context_extensions) == {
        route_context.ROUTE: "shop-catalog",
        route_context.SERVICE: "catalog",
        route_context.GATEWAY: "edge",
        route_context.POLICY_VERSION: policy.version,
    }
    # Every route of every virtual host carries its own context.
    for vhost in config.virtual_hosts:
        for route in vhost.routes:
            assert isinstance(route, route_components_pb2.Route)
            assert route.typed_per_filter_config[EXT_AUTHZ_FILTER].Unpack(per_route)
            assert per_route.check_settings.context_extensions[route_context.ROUTE] == route.name


def test_gateway_without_routes_still_has_a_listener_and_catch_all() -> None:
    policy = Policy.build(gateways=(Gateway("empty", 10002, ()),))
    resources = translate(policy, AUTHZ)["empty"]
    assert [rs.resource_name(c) for c in resources[rs.CLUSTER]] == [AUTHZ_CLUSTER]
    [config] = resources[rs.ROUTE]
    assert isinstance(config, route_pb2.RouteConfiguration)
    assert [(list(v.domains), len(v.routes)) for v in config.virtual_hosts] == [(["*"], 0)]


def test_unknown_or_reserved_service_is_an_error() -> None:
    unknown = Policy.build(gateways=(Gateway("g", 1, (Route("r", RouteMatch("/"), "nope"),)),))
    with pytest.raises(ValueError, match="unknown service 'nope'"):
        translate(unknown, AUTHZ)
    reserved = Policy.build(
        services=(Service(AUTHZ_CLUSTER, (Endpoint("127.0.0.1", 1),)),),
        gateways=(Gateway("g", 1, (Route("r", RouteMatch("/"), AUTHZ_CLUSTER),)),),
    )
    with pytest.raises(ValueError, match="reserved"):
        translate(reserved, AUTHZ)


def test_snapshot_version_is_the_policy_version_plus_a_hash_of_other_inputs() -> None:
    policy = _policy()
    assert snapshot_version(policy, DEFAULT_AUTHZ_ENDPOINTS) == policy.version
    other = snapshot_version(policy, AUTHZ)
    assert other.startswith(policy.version + "-")
    assert len(other) == len(policy.version) + 9
    assert snapshot_version(policy, AUTHZ) == other  # deterministic
    assert snapshot_version(policy, [*AUTHZ[:1], ("127.0.0.1", 9999)]) != other


def test_translation_is_deterministic_and_builds_a_snapshot() -> None:
    first = translate(_policy(), AUTHZ)
    second = translate(_policy(), AUTHZ)
    for group in first:
        for type_url in first[group]:
            assert [m.SerializeToString(deterministic=True) for m in first[group][type_url]] == [
                m.SerializeToString(deterministic=True) for m in second[group][type_url]
            ]
    snapshot = Snapshot.build("v1", first["edge"])
    assert snapshot.names(rs.LISTENER) == ("edge",)
    assert snapshot.names(rs.ENDPOINT) == ("orders", AUTHZ_CLUSTER)


def test_authz_group_holds_exactly_the_policy_resource() -> None:
    policy = _policy()
    groups = translate(policy, AUTHZ)
    assert AUTHZ_GROUP == "meshward-authz"
    authz = groups[AUTHZ_GROUP]
    assert set(authz) == {rs.POLICY}
    [resource] = authz[rs.POLICY]
    assert rs.type_url_of(resource) == rs.POLICY
    assert rs.resource_name(resource) == "policy"
    # Through the snapshot, as the ADS server sends it: one packed resource.
    snapshot = Snapshot.build(snapshot_version(policy, AUTHZ), authz)
    assert snapshot.names(rs.POLICY) == ("policy",)
    assert snapshot.names(rs.LISTENER) == () and snapshot.names(rs.CLUSTER) == ()
    packed = snapshot.resources(rs.POLICY)["policy"]
    assert packed.type_url == rs.POLICY
    received = wire.PolicyResource()
    assert packed.Unpack(received)
    decoded = wire.from_resource(received)
    assert decoded == policy and decoded.version == policy.version
    assert decoded.issuers[0].jwks == policy.issuers[0].jwks
    # Gateway groups do not carry the policy.
    assert rs.POLICY not in groups["edge"]


def test_gateway_named_like_the_authz_group_is_an_error() -> None:
    policy = Policy.build(gateways=(Gateway(AUTHZ_GROUP, 10002, ()),))
    with pytest.raises(ValueError, match="reserved for authz"):
        translate(policy, AUTHZ)
