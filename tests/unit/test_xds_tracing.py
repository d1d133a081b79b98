"""Tracing in the translator: the collector cluster and each HTTP connection manager's
OpenTelemetry tracer, for gateways and sidecars; nothing at all without ``tracing``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.trace.v3 import opentelemetry_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.tracers.opentelemetry.samplers.v3 import (
    parent_based_sampler_pb2,
    trace_id_ratio_based_sampler_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf.message import Message

from meshward.policy.model import (
    Endpoint,
    Gateway,
    Policy,
    Route,
    RouteMatch,
    Service,
    Sidecar,
    Tracing,
)
from xds_server import resources as rs
from xds_server.cache import Snapshot
from xds_server.translator import (
    AUTHZ_GROUP,
    COLLECTOR_CLUSTER,
    OTEL_TRACER,
    PARENT_BASED_SAMPLER,
    RATIO_SAMPLER,
    Credentials,
    credential_needs,
    snapshot_version,
    translate,
)

AUTHZ = [("127.0.0.1", 9191)]
GROUPS = ("edge", "orders-sidecar")
TRACING = Tracing("127.0.0.1", 4317, 25.0)


@dataclass(frozen=True)
class FakeCert:
    chain_pem: bytes
    key_pem: bytes


def _policy(tracing: Tracing | None = TRACING) -> Policy:
    return Policy.build(
        services=(
            Service("orders", (Endpoint("127.0.0.1", 10101),), Sidecar(10201)),
            Service("catalog", (Endpoint("127.0.0.1", 10102),)),
        ),
        gateways=(
            Gateway(
                "edge",
                10443,
                (
                    Route("orders-api", RouteMatch(prefix="/orders"), "orders"),
                    Route("catalog-api", RouteMatch(prefix="/catalog"), "catalog"),
                ),
            ),
        ),
        tracing=tracing,
    )


def _groups(policy: Policy) -> dict[str, dict[str, list[Message]]]:
    needs = credential_needs(policy)
    credentials = Credentials(
        bundle_pem=b"BUNDLE",
        svids={w: FakeCert(b"CHAIN", b"KEY") for w in needs.svids},
    )
    return translate(policy, AUTHZ, credentials=credentials)


def _by_name(messages: Sequence[Message]) -> dict[str, Message]:
    return {rs.resource_name(m): m for m in messages}


def _collector(groups: dict[str, dict[str, list[Message]]], group: str) -> cluster_pb2.Cluster:
    cluster = _by_name(groups[group][rs.CLUSTER])[COLLECTOR_CLUSTER]
    assert isinstance(cluster, cluster_pb2.Cluster)
    return cluster


def _hcm(groups: dict[str, dict[str, list[Message]]], group: str) -> hcm_pb2.HttpConnectionManager:
    [listener] = groups[group][rs.LISTENER]
    assert isinstance(listener, listener_pb2.Listener)
    [chain] = listener.filter_chains
    manager = hcm_pb2.HttpConnectionManager()
    assert chain.filters[0].typed_config.Unpack(manager)
    return manager


def _otel(manager: hcm_pb2.HttpConnectionManager) -> opentelemetry_pb2.OpenTelemetryConfig:
    assert manager.tracing.provider.name == OTEL_TRACER
    config = opentelemetry_pb2.OpenTelemetryConfig()
    assert manager.tracing.provider.typed_config.Unpack(config)
    return config


def _ratio(config: opentelemetry_pb2.OpenTelemetryConfig) -> percent_pb2.FractionalPercent:
    assert config.sampler.name == PARENT_BASED_SAMPLER
    parent_based = parent_based_sampler_pb2.ParentBasedSamplerConfig()
    assert config.sampler.typed_config.Unpack(parent_based)
    assert parent_based.wrapped_sampler.name == RATIO_SAMPLER
    ratio = trace_id_ratio_based_sampler_pb2.TraceIdRatioBasedSamplerConfig()
    assert parent_based.wrapped_sampler.typed_config.Unpack(ratio)
    return ratio.sampling_percentage


def test_every_node_group_gets_the_http2_collector_cluster_static_for_an_ip() -> None:
    groups = _groups(_policy())
    for group in GROUPS:
        cluster = _collector(groups, group)
        assert cluster.type == cluster_pb2.Cluster.STATIC
        assert not cluster.HasField("eds_cluster_config")
        assert not cluster.HasField("transport_socket")  # OTLP/gRPC plaintext
        [locality] = cluster.load_assignment.endpoints
        [endpoint] = locality.lb_endpoints
        address = endpoint.endpoint.address.socket_address
        assert (address.address, address.port_value) == ("127.0.0.1", 4317)
        options = http_protocol_options_pb2.HttpProtocolOptions()
        packed = cluster.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]
        assert packed.Unpack(options)
        assert options.explicit_http_config.HasField("http2_protocol_options")
        # Inline endpoints: no EDS resource for the collector.
        assert COLLECTOR_CLUSTER not in _by_name(groups[group][rs.ENDPOINT])
    assert rs.CLUSTER not in groups[AUTHZ_GROUP]


def test_a_dns_named_collector_is_strict_dns() -> None:
    groups = _groups(_policy(Tracing("otel-collector.internal", 4317)))
    cluster = _collector(groups, "edge")
    assert cluster.type == cluster_pb2.Cluster.STRICT_DNS
    address = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert address.socket_address.address == "otel-collector.internal"


def test_each_connection_manager_traces_to_the_collector_as_its_node_group() -> None:
    groups = _groups(_policy())
    for group in GROUPS:
        manager = _hcm(groups, group)
        # The manager says "trace" always: the tracer's sampler makes the decision.
        assert manager.tracing.random_sampling.value == 100.0
        assert manager.tracing.spawn_upstream_span.value is True
        config = _otel(manager)
        assert config.service_name == group
        assert config.grpc_service.envoy_grpc.cluster_name == COLLECTOR_CLUSTER
        ratio = _ratio(config)
        assert ratio.denominator == percent_pb2.FractionalPercent.MILLION
        assert ratio.numerator == 250_000  # 25 %


@pytest.mark.parametrize(("percent", "numerator"), [(0.0, 0), (0.5, 5_000), (100.0, 1_000_000)])
def test_sampling_percent_becomes_the_ratio_samplers_fraction(
    percent: float, numerator: int
) -> None:
    groups = _groups(_policy(Tracing("127.0.0.1", 4317, percent)))
    assert _ratio(_otel(_hcm(groups, "edge"))).numerator == numerator


def test_without_tracing_nothing_about_tracing_is_emitted() -> None:
    groups = _groups(_policy(None))
    for group in GROUPS:
        assert COLLECTOR_CLUSTER not in _by_name(groups[group][rs.CLUSTER])
        assert not _hcm(groups, group).HasField("tracing")


def test_clusters_come_before_the_listeners_that_reference_them() -> None:
    """The collector cluster is a CDS resource, and CDS is pushed before LDS."""
    assert rs.PUSH_ORDER.index(rs.CLUSTER) < rs.PUSH_ORDER.index(rs.LISTENER)
    policy = _policy()
    for group, resources in _groups(policy).items():
        snapshot = Snapshot.build(snapshot_version(policy, AUTHZ), resources)
        if group != AUTHZ_GROUP:
            assert COLLECTOR_CLUSTER in snapshot.names(rs.CLUSTER)


def test_tracing_is_part_of_the_version() -> None:
    versions = {
        _policy().version,
        _policy(None).version,
        _policy(replace(TRACING, sampling_percent=50.0)).version,
        _policy(replace(TRACING, collector_port=4318)).version,
        _policy(replace(TRACING, collector_address="127.0.0.2")).version,
    }
    assert len(versions) == 5


def test_a_service_named_like_the_collector_cluster_is_an_error_only_with_tracing() -> None:
    def named(tracing: Tracing | None) -> Policy:
        policy = _policy(tracing)
        services = (replace(policy.services[0], name=COLLECTOR_CLUSTER), *policy.services[1:])
        gateway = policy.gateways[0]
        routes = (replace(gateway.routes[0], service=COLLECTOR_CLUSTER), *gateway.routes[1:])
        return Policy.build(
            services=services,
            gateways=(replace(gateway, routes=routes),),
            tracing=tracing,
        )

    with pytest.raises(ValueError, match="reserved for the trace collector cluster"):
        _groups(named(Tracing("127.0.0.1", 4317)))
    groups = _groups(named(None))
    assert COLLECTOR_CLUSTER in _by_name(groups["edge"][rs.CLUSTER])
