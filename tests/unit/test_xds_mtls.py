"""Zero-trust transport in the translator and the service: TLS contexts, SAN matchers,
SDS secret names and config sources, sidecar node groups, credential versions and
rotation (checked on the protos and over a real gRPC ADS stream)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf.message import Message

from meshward import route_context
from meshward.pki import CertificateAuthority, CredentialStore
from meshward.policy.model import (
    Endpoint,
    Gateway,
    GatewayTls,
    Mesh,
    Policy,
    Route,
    RouteMatch,
    Service,
    Sidecar,
)
from tests.xds_harness import AdsClient
from xds_server import resources as rs
from xds_server.cache import Snapshot
from xds_server.credentials import CredentialSource
from xds_server.service import XdsService
from xds_server.translator import (
    AUTHZ_CLUSTER,
    AUTHZ_GROUP,
    EXT_AUTHZ_FILTER,
    GATEWAY_ALPN,
    ROUTER_FILTER,
    SERVER_CERT_SECRET,
    SVID_SECRET,
    TLS12_CIPHER_SUITES,
    TRUST_BUNDLE_SECRET,
    Credentials,
    credential_needs,
    inbound_route_name,
    snapshot_version,
    translate,
)

AUTHZ = [("127.0.0.1", 9191)]
TD = "example.org"
TLS = common_pb2.TlsParameters
HCM = hcm_pb2.HttpConnectionManager


@dataclass(frozen=True)
class FakeCert:
    chain_pem: bytes
    key_pem: bytes


def spiffe(workload: str) -> str:
    return f"spiffe://{TD}/ns/shop/sa/{workload}"


def _policy(*, orders_sidecar: bool = True, route_name: str = "orders-api") -> Policy:
    return Policy.build(
        mesh=Mesh(trust_domain=TD, namespace="shop"),
        services=(
            Service(
                "orders",
                (Endpoint("127.0.0.1", 10101), Endpoint("127.0.0.2", 10111)),
                Sidecar(10201, "127.0.0.3") if orders_sidecar else None,
            ),
            Service("plain", (Endpoint("127.0.0.1", 10102),)),
        ),
        gateways=(
            Gateway(
                "edge",
                10443,
                (
                    Route(route_name, RouteMatch(prefix="/orders"), "orders"),
                    Route("plain-api", RouteMatch(prefix="/plain"), "plain"),
                ),
                tls=GatewayTls(dns_names=("localhost", "shop.example")),
            ),
            Gateway(
                "edge13",
                10444,
                (Route("orders13", RouteMatch(prefix="/"), "orders"),),
                tls=GatewayTls(min_version="1.3"),
            ),
            Gateway("inner", 10080, (Route("inner-orders", RouteMatch(prefix="/"), "orders"),)),
            Gateway("lobby", 10081, (Route("lobby-plain", RouteMatch(prefix="/"), "plain"),)),
        ),
    )


def _credentials(policy: Policy, generation: str = "gen1") -> Credentials:
    needs = credential_needs(policy)
    return Credentials(
        bundle_pem=b"BUNDLE",
        svids={w: FakeCert(f"CHAIN {w}".encode(), f"KEY {w}".encode()) for w in needs.svids},
        server_certs={
            g: FakeCert(f"SERVER {g}".encode(), f"SERVERKEY {g}".encode())
            for g in needs.server_certs
        },
        generation=generation,
    )


def _groups(policy: Policy | None = None) -> dict[str, dict[str, list[Message]]]:
    policy = policy or _policy()
    return translate(policy, AUTHZ, credentials=_credentials(policy))


def _by_name(messages: Sequence[Message]) -> dict[str, Message]:
    return {rs.resource_name(m): m for m in messages}


def _unpack(packed: object, message: Message) -> Message:
    assert packed.Unpack(message)  # type: ignore[attr-defined]
    return message


def _listener(
    group: str, groups: dict[str, dict[str, list[Message]]] | None = None
) -> listener_pb2.Listener:
    [listener] = (groups or _groups())[group][rs.LISTENER]
    assert isinstance(listener, listener_pb2.Listener)
    return listener


def _hcm(listener: listener_pb2.Listener) -> hcm_pb2.HttpConnectionManager:
    [chain] = listener.filter_chains
    [network_filter] = chain.filters
    manager = hcm_pb2.HttpConnectionManager()
    assert network_filter.typed_config.Unpack(manager)
    return manager


def _downstream_tls(listener: listener_pb2.Listener) -> tls_pb2.DownstreamTlsContext:
    [chain] = listener.filter_chains
    assert chain.transport_socket.name == "envoy.transport_sockets.tls"
    context = tls_pb2.DownstreamTlsContext()
    assert chain.transport_socket.typed_config.Unpack(context)
    return context


def _assert_sds(config: secret_pb2.SdsSecretConfig, name: str) -> None:
    assert config.name == name
    source = config.sds_config
    assert source.HasField("ads")
    assert source.resource_api_version == config_source_pb2.ApiVersion.V3
    assert source.initial_fetch_timeout.seconds == 5  # not Envoy's 15 s default


def _cluster(group: str, name: str) -> cluster_pb2.Cluster:
    cluster = _by_name(_groups()[group][rs.CLUSTER])[name]
    assert isinstance(cluster, cluster_pb2.Cluster)
    return cluster


def _endpoints(group: str, name: str) -> list[tuple[str, int]]:
    cla = _by_name(_groups()[group][rs.ENDPOINT])[name]
    assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
    return [
        (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
        for locality in cla.endpoints
        for e in locality.lb_endpoints
    ]


# -- what a policy needs ------------------------------------------------------------


def test_credential_needs_svids_for_sidecars_and_gateways_routing_to_them() -> None:
    needs = credential_needs(_policy())
    # lobby routes only to a plaintext service: no SVID; every other gateway reaches
    # the orders sidecar; orders itself has a sidecar.
    assert needs.svids == ("edge", "edge13", "inner", "orders")
    assert dict(needs.server_certs) == {
        "edge": ("localhost", "shop.example"),
        "edge13": ("localhost",),
    }
    plaintext = Policy.build(
        services=(Service("a", (Endpoint("127.0.0.1", 1),)),),
        gateways=(Gateway("g", 2, (Route("r", RouteMatch(prefix="/"), "a"),)),),
    )
    assert not credential_needs(plaintext)


def test_a_policy_that_needs_certificates_requires_credentials() -> None:
    with pytest.raises(ValueError, match="no CA is configured") as info:
        translate(_policy(), AUTHZ)
    assert "gateway 'edge' has tls" in str(info.value)
    assert "service 'orders' has a sidecar" in str(info.value)
    partial = _credentials(_policy())
    partial = Credentials(partial.bundle_pem, {}, partial.server_certs, "g")
    with pytest.raises(ValueError, match="SVID of 'edge'"):
        translate(_policy(), AUTHZ, credentials=partial)


def test_node_groups_include_one_per_sidecar() -> None:
    groups = _groups()
    assert sorted(groups) == sorted(
        ["edge", "edge13", "inner", "lobby", "orders-sidecar", AUTHZ_GROUP]
    )
    assert set(groups["orders-sidecar"]) == {
        rs.CLUSTER,
        rs.ENDPOINT,
        rs.SECRET,
        rs.LISTENER,
        rs.ROUTE,
    }
    for resources in groups.values():
        for type_url, messages in resources.items():
            assert all(rs.type_url_of(m) == type_url for m in messages)


# -- gateways -------------------------------------------------------------------------


def test_tls_gateway_listener_terminates_tls_with_the_server_cert_over_sds() -> None:
    listener = _listener("edge")
    context = _downstream_tls(listener)
    assert not context.HasField("require_client_certificate")
    common = context.common_tls_context
    params = common.tls_params
    assert params.tls_minimum_protocol_version == TLS.TLSv1_2
    assert params.tls_maximum_protocol_version == TLS.TLSv1_3
    assert tuple(params.cipher_suites) == TLS12_CIPHER_SUITES
    for suite in params.cipher_suites:  # forward secrecy and AEAD only
        assert suite.startswith("ECDHE-") and ("-GCM-" in suite or "CHACHA20" in suite)
    assert tuple(common.alpn_protocols) == GATEWAY_ALPN == ("h2", "http/1.1")
    [sds] = common.tls_certificate_sds_secret_configs
    _assert_sds(sds, SERVER_CERT_SECRET)
    assert not common.tls_certificates  # never inline: always SDS
    manager = _hcm(listener)
    assert manager.codec_type == HCM.AUTO
    assert manager.forward_client_cert_details == HCM.SANITIZE
    assert [f.name for f in manager.http_filters] == [EXT_AUTHZ_FILTER, ROUTER_FILTER]


def test_min_version_13_gateway_is_tls13_only() -> None:
    params = _downstream_tls(_listener("edge13")).common_tls_context.tls_params
    assert params.tls_minimum_protocol_version == TLS.TLSv1_3
    assert params.tls_maximum_protocol_version == TLS.TLSv1_3
    assert not params.cipher_suites


def test_plaintext_gateway_listener_has_no_tls() -> None:
    for group in ("inner", "lobby"):
        [chain] = _listener(group).filter_chains
        assert not chain.HasField("transport_socket")
        assert _hcm(_listener(group)).forward_client_cert_details == HCM.SANITIZE


def test_cluster_to_a_sidecar_is_mtls_checking_the_services_spiffe_id() -> None:
    for group in ("edge", "edge13", "inner"):
        cluster = _cluster(group, "orders")
        assert cluster.type == cluster_pb2.Cluster.EDS
        # The gateway reaches the sidecar, never the app's endpoints directly.
        assert _endpoints(group, "orders") == [("127.0.0.3", 10201)]
        assert cluster.transport_socket.name == "envoy.transport_sockets.tls"
        context = tls_pb2.UpstreamTlsContext()
        assert cluster.transport_socket.typed_config.Unpack(context)
        common = context.common_tls_context
        [svid] = common.tls_certificate_sds_secret_configs
        _assert_sds(svid, SVID_SECRET)
        assert common.tls_params.tls_minimum_protocol_version == TLS.TLSv1_3
        combined = common.combined_validation_context
        _assert_sds(combined.validation_context_sds_secret_config, TRUST_BUNDLE_SECRET)
        [san] = combined.default_validation_context.match_typed_subject_alt_names
        assert san.san_type == common_pb2.SubjectAltNameMatcher.URI
        assert san.matcher.WhichOneof("match_pattern") == "exact"
        assert san.matcher.exact == spiffe("orders")
        assert not common.HasField("validation_context")  # the CA alone is not enough


def test_cluster_to_a_service_without_sidecar_stays_plaintext() -> None:
    for group in ("edge", "lobby"):
        cluster = _cluster(group, "plain")
        assert not cluster.HasField("transport_socket")
        assert _endpoints(group, "plain") == [("127.0.0.1", 10102)]
    # Without an authz SVID in the credentials (no PKI for authz), authz stays plaintext.
    assert not _cluster("edge", AUTHZ_CLUSTER).HasField("transport_socket")


def test_gateway_groups_hold_exactly_the_secrets_they_reference() -> None:
    groups = _groups()
    secrets = {g: _by_name(groups[g].get(rs.SECRET, [])) for g in groups}
    assert set(secrets["edge"]) == {SERVER_CERT_SECRET, SVID_SECRET, TRUST_BUNDLE_SECRET}
    assert set(secrets["inner"]) == {SVID_SECRET, TRUST_BUNDLE_SECRET}
    assert secrets["lobby"] == {}
    assert rs.SECRET not in groups["lobby"]
    assert rs.SECRET not in groups[AUTHZ_GROUP]

    svid = secrets["edge"][SVID_SECRET]
    assert isinstance(svid, secret_pb2.Secret)
    assert svid.tls_certificate.certificate_chain.inline_bytes == b"CHAIN edge"
    assert svid.tls_certificate.private_key.inline_bytes == b"KEY edge"
    server = secrets["edge"][SERVER_CERT_SECRET]
    assert isinstance(server, secret_pb2.Secret)
    assert server.tls_certificate.certificate_chain.inline_bytes == b"SERVER edge"
    bundle = secrets["edge"][TRUST_BUNDLE_SECRET]
    assert isinstance(bundle, secret_pb2.Secret)
    assert bundle.validation_context.trusted_ca.inline_bytes == b"BUNDLE"
    assert not bundle.HasField("tls_certificate")


def test_plaintext_policy_translates_as_before_even_with_credentials() -> None:
    policy = _policy(orders_sidecar=False)
    policy = Policy.build(
        services=policy.services,
        gateways=tuple(g for g in policy.gateways if g.tls is None),
    )
    without = translate(policy, AUTHZ)
    with_creds = translate(policy, AUTHZ, credentials=Credentials(b"B", generation="x"))
    assert sorted(without) == ["inner", "lobby", AUTHZ_GROUP]
    for group in without:
        assert rs.SECRET not in without[group]
        assert {t: [m.SerializeToString() for m in ms] for t, ms in without[group].items()} == {
            t: [m.SerializeToString() for m in ms] for t, ms in with_creds[group].items()
        }


# -- sidecars -------------------------------------------------------------------------


def test_sidecar_listener_requires_a_client_certificate_of_the_trust_domain() -> None:
    listener = _listener("orders-sidecar")
    assert listener.name == "orders-sidecar"
    assert listener.address.socket_address.address == "127.0.0.3"
    assert listener.address.socket_address.port_value == 10201
    context = _downstream_tls(listener)
    assert context.require_client_certificate.value is True
    common = context.common_tls_context
    [svid] = common.tls_certificate_sds_secret_configs
    _assert_sds(svid, SVID_SECRET)
    assert common.tls_params.tls_minimum_protocol_version == TLS.TLSv1_3
    combined = common.combined_validation_context
    _assert_sds(combined.validation_context_sds_secret_config, TRUST_BUNDLE_SECRET)
    [san] = combined.default_validation_context.match_typed_subject_alt_names
    assert san.san_type == common_pb2.SubjectAltNameMatcher.URI
    assert san.matcher.prefix == f"spiffe://{TD}/"


def test_sidecar_runs_ext_authz_like_a_gateway_and_sets_xfcc_from_the_peer() -> None:
    groups = translate(
        _policy(), AUTHZ, authz_failure_status=503, credentials=_credentials(_policy())
    )
    manager = _hcm(_listener("orders-sidecar", groups))
    gateway_manager = _hcm(_listener("edge", groups))
    assert [f.name for f in manager.http_filters] == [EXT_AUTHZ_FILTER, ROUTER_FILTER]
    assert manager.http_filters[0] == gateway_manager.http_filters[0]
    ext_authz = ext_authz_pb2.ExtAuthz()
    assert manager.http_filters[0].typed_config.Unpack(ext_authz)
    assert ext_authz.failure_mode_allow is False
    assert ext_authz.status_on_error.code == 503
    assert manager.rds.route_config_name == "orders-sidecar"
    assert manager.codec_type == HCM.AUTO
    assert manager.normalize_path.value and manager.merge_slashes
    # XFCC: a client's value is dropped and replaced by the verified peer's URI.
    assert manager.forward_client_cert_details == HCM.SANITIZE_SET
    assert manager.set_current_client_cert_details.uri is True
    assert not manager.set_current_client_cert_details.cert  # no PEM in headers


def test_sidecar_routes_everything_to_the_local_app_with_inbound_context() -> None:
    policy = _policy()
    [config] = _groups(policy)["orders-sidecar"][rs.ROUTE]
    assert isinstance(config, route_pb2.RouteConfiguration)
    assert config.name == "orders-sidecar"
    [vhost] = config.virtual_hosts
    assert list(vhost.domains) == ["*"]
    [route] = vhost.routes
    assert route.name == inbound_route_name("orders") == "orders.inbound"
    assert route.match.prefix == "/"
    assert route.route.cluster == "orders"
    per_route = ext_authz_pb2.ExtAuthzPerRoute()
    assert route.typed_per_filter_config[EXT_AUTHZ_FILTER].Unpack(per_route)
    assert dict(per_route.check_settings.context_extensions) == {
        route_context.ROUTE: "orders.inbound",
        route_context.SERVICE: "orders",
        route_context.GATEWAY: "orders-sidecar",
        route_context.POLICY_VERSION: policy.version,
    }


def test_sidecar_clusters_reach_the_app_in_plaintext_and_authz_over_http2() -> None:
    groups = _groups()
    assert [rs.resource_name(c) for c in groups["orders-sidecar"][rs.CLUSTER]] == [
        "orders",
        AUTHZ_CLUSTER,
    ]
    app = _cluster("orders-sidecar", "orders")
    assert not app.HasField("transport_socket")
    assert _endpoints("orders-sidecar", "orders") == [("127.0.0.1", 10101), ("127.0.0.2", 10111)]
    authz = _cluster("orders-sidecar", AUTHZ_CLUSTER)
    options = http_protocol_options_pb2.HttpProtocolOptions()
    assert authz.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")
    secrets = _by_name(groups["orders-sidecar"][rs.SECRET])
    assert set(secrets) == {SVID_SECRET, TRUST_BUNDLE_SECRET}
    svid = secrets[SVID_SECRET]
    assert isinstance(svid, secret_pb2.Secret)
    assert svid.tls_certificate.certificate_chain.inline_bytes == b"CHAIN orders"


def test_a_route_named_like_an_inbound_route_is_refused() -> None:
    policy = _policy(route_name="orders.inbound")
    with pytest.raises(ValueError, match="reserved for the inbound route"):
        translate(policy, AUTHZ, credentials=_credentials(policy))


def test_a_gateway_named_like_a_sidecar_group_is_refused() -> None:
    base = _policy()
    clash = Gateway("orders-sidecar", 10999, (Route("x", RouteMatch(prefix="/"), "plain"),))
    policy = Policy.build(mesh=base.mesh, services=base.services, gateways=(*base.gateways, clash))
    with pytest.raises(ValueError, match="node group name of the sidecar"):
        translate(policy, AUTHZ, credentials=_credentials(policy))


# -- versions, push order --------------------------------------------------------------


def test_snapshot_version_carries_the_credential_generation() -> None:
    policy = _policy()
    assert snapshot_version(policy) == policy.version
    one = snapshot_version(policy, credentials=_credentials(policy, "aaaa"))
    two = snapshot_version(policy, credentials=_credentials(policy, "bbbb"))
    assert one == f"{policy.version}+aaaa"
    assert two == f"{policy.version}+bbbb"
    other_authz = snapshot_version(
        policy, [("127.0.0.1", 1)], credentials=_credentials(policy, "aaaa")
    )
    assert other_authz.startswith(policy.version + "-") and other_authz.endswith("+aaaa")


def test_sds_is_pushed_after_clusters_and_before_listeners_and_requested_by_name() -> None:
    assert rs.PUSH_ORDER == (rs.CLUSTER, rs.ENDPOINT, rs.SECRET, rs.LISTENER, rs.ROUTE, rs.POLICY)
    assert rs.SECRET not in rs.WILDCARD_TYPES
    assert rs.short_name(rs.SECRET) == "sds"
    assert rs.SECRET == "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    snapshot = Snapshot.build("v", _groups()["edge"])
    assert snapshot.names(rs.SECRET) == (SERVER_CERT_SECRET, SVID_SECRET, TRUST_BUNDLE_SECRET)


# -- the service with a real (in-memory) CA ---------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def _source(clock: Clock, trust_domain: str = TD) -> CredentialSource:
    ca = CertificateAuthority.generate(trust_domain)
    store = CredentialStore(ca, svid_lifetime=timedelta(hours=1), clock=clock)
    return CredentialSource(store, clock)


def test_service_versions_status_and_rotation_of_secrets_only() -> None:
    clock = Clock()
    source = _source(clock)
    service = XdsService(_policy(), AUTHZ, credentials=source)
    policy = service.policy
    status = service.status()
    generation = status["credentials"]["generation"]
    assert service.version == f"{policy.version}+{generation}"
    assert status["policy_version"] == policy.version
    # Every gateway (client of authz) and authz itself have an SVID: Envoy → authz is mTLS.
    assert set(status["credentials"]["svids"]) == {
        "edge",
        "edge13",
        "inner",
        "lobby",
        "orders",
        AUTHZ_GROUP,
    }
    assert status["credentials"]["svids"]["orders"]["spiffe_id"] == spiffe("orders")
    assert status["credentials"]["svids"][AUTHZ_GROUP]["spiffe_id"] == spiffe(AUTHZ_GROUP)
    assert "KEY" not in repr(status)  # serials and dates, never key material
    groups = ("edge", "orders-sidecar", "lobby", AUTHZ_GROUP)
    before = {g: service.cache.get_snapshot(g) for g in groups}
    sidecar_secret = before["orders-sidecar"].resources(rs.SECRET)[SVID_SECRET]  # type: ignore[union-attr]

    # Not due yet: nothing happens.
    assert asyncio.run(service.rotate_credentials()) is False
    assert service.version == before["edge"].version  # type: ignore[union-attr]
    # Past half-life: every credential is re-issued; same policy, new snapshot version,
    # and only the secrets differ.
    clock.now += timedelta(minutes=31)
    assert source.seconds_to_renewal() is not None and source.seconds_to_renewal() <= 0  # type: ignore[operator]
    assert asyncio.run(service.rotate_credentials()) is True
    assert service.policy.version == policy.version
    assert service.version != before["edge"].version  # type: ignore[union-attr]
    assert service.version.startswith(policy.version + "+")
    for group, old in before.items():
        new = service.cache.get_snapshot(group)
        assert new is not None and old is not None and new.version == service.version
        for type_url in (rs.CLUSTER, rs.ENDPOINT, rs.LISTENER, rs.ROUTE, rs.POLICY):
            assert new.digest(type_url) == old.digest(type_url), (group, type_url)
        assert new.digest(rs.SECRET) != old.digest(rs.SECRET), group
    new_secret = service.cache.get_snapshot("orders-sidecar").resources(rs.SECRET)[SVID_SECRET]  # type: ignore[union-attr]
    assert new_secret != sidecar_secret
    assert service.registry.get_sample_value("meshward_xds_credential_rotations_total") == 1
    assert (
        service.registry.get_sample_value(
            "meshward_xds_policy_info",
            {"version": service.version, "policy_version": policy.version},
        )
        == 1
    )


def test_service_refuses_tls_policies_without_a_ca_and_foreign_trust_domains() -> None:
    with pytest.raises(ValueError, match="no CA is configured"):
        XdsService(_policy(), AUTHZ)
    clock = Clock()
    service = XdsService(_policy(), AUTHZ, credentials=_source(clock))
    version = service.version
    other = Policy.build(
        mesh=Mesh(trust_domain="other.org", namespace="shop"),
        services=service.policy.services,
        gateways=service.policy.gateways,
    )
    with pytest.raises(ValueError, match=r"trust_domain is 'other\.org'"):
        asyncio.run(service.set_policy(other))
    assert service.version == version


def test_credentials_a_policy_drops_are_forgotten() -> None:
    clock = Clock()
    source = _source(clock)
    service = XdsService(_policy(), AUTHZ, credentials=source)
    first = service.status()["credentials"]
    assert "orders" in first["svids"]
    # No more sidecar: orders' SVID goes; the gateways' and authz's stay (Envoy → authz
    # is mTLS), and so do the server certs.
    asyncio.run(service.set_policy(_policy(orders_sidecar=False)))
    second = service.status()["credentials"]
    assert set(second["svids"]) == {"edge", "edge13", "inner", "lobby", AUTHZ_GROUP}
    assert second["svids"]["edge"]["serial"] == first["svids"]["edge"]["serial"]
    assert set(second["server_certs"]) == {"edge", "edge13"}
    assert second["server_certs"]["edge"]["serial"] == first["server_certs"]["edge"]["serial"]
    assert second["generation"] != first["generation"]
    gone = service.cache.get_snapshot("orders-sidecar")
    assert gone is not None and gone.names(rs.LISTENER) == () and gone.names(rs.SECRET) == ()
    # A refused policy changes nothing (its credentials are not committed).
    broken = Policy.build(
        mesh=Mesh(trust_domain=TD, namespace="shop"),
        services=(Service("orders", (Endpoint("127.0.0.1", 1),), Sidecar(2)),),
        gateways=(Gateway("g", 3, (Route("r", RouteMatch(prefix="/"), "missing"),)),),
    )
    with pytest.raises(ValueError, match="unknown service"):
        asyncio.run(service.set_policy(broken))
    assert service.status()["credentials"] == second


def test_rotation_pushes_only_sds_on_an_ads_stream() -> None:
    clock = Clock()

    async def main() -> None:
        service = XdsService(
            _policy(), AUTHZ, credentials=_source(clock), rotation_poll_seconds=0.05
        )
        port = await service.start()
        try:
            async with AdsClient(port, "sc-1", "orders-sidecar") as client:
                subscriptions = {
                    rs.CLUSTER: [],
                    rs.ENDPOINT: ["orders", AUTHZ_CLUSTER],
                    rs.SECRET: [SVID_SECRET, TRUST_BUNDLE_SECRET],
                    rs.LISTENER: [],
                    rs.ROUTE: ["orders-sidecar"],
                }
                for type_url, names in subscriptions.items():
                    await client.send(type_url, names=names)
                    response = await client.recv()
                    assert response.type_url == type_url
                    if type_url == rs.SECRET:
                        got = {}
                        for packed in response.resources:
                            secret = secret_pb2.Secret()
                            assert packed.Unpack(secret)
                            got[secret.name] = secret
                        assert set(got) == {SVID_SECRET, TRUST_BUNDLE_SECRET}
                        first_chain = got[
                            SVID_SECRET
                        ].tls_certificate.certificate_chain.inline_bytes
                    await client.ack(response, names=names)
                await client.assert_silent()
                # The rotation task notices the (injected) clock passing half-life.
                clock.now += timedelta(minutes=31)
                response = await client.recv(timeout=5)
                assert response.type_url == rs.SECRET
                assert response.version_info == service.version
                secret = secret_pb2.Secret()
                svid = [
                    p for p in response.resources if p.Unpack(secret) and secret.name == SVID_SECRET
                ]
                assert svid
                svid[0].Unpack(secret)
                assert secret.tls_certificate.certificate_chain.inline_bytes != first_chain
                await client.ack(response, names=subscriptions[rs.SECRET])
                await client.assert_silent(0.5)  # nothing but SDS
                node = service.status()["nodes"][0]
                assert node["applied_version"] == service.version
        finally:
            await service.stop(0.2)

    asyncio.run(main())


def test_a_refused_policy_that_renewed_a_served_credential_triggers_a_rebuild() -> None:
    clock = Clock()
    source = _source(clock)
    service = XdsService(_policy(), AUTHZ, credentials=source)
    served = service.status()["credentials"]["svids"]["orders"]["serial"]
    version = service.version
    clock.now += timedelta(minutes=31)  # everything is due; the rotation task has not run
    broken = Policy.build(
        mesh=Mesh(trust_domain=TD, namespace="shop"),
        services=_policy().services,
        gateways=(Gateway("g", 3, (Route("r", RouteMatch(prefix="/"), "missing"),)),),
    )
    with pytest.raises(ValueError, match="unknown service"):
        asyncio.run(service.set_policy(broken))
    # Refused: still serving the old credentials, but the next check rebuilds at once.
    assert service.version == version
    assert service.status()["credentials"]["svids"]["orders"]["serial"] == served
    assert source.seconds_to_renewal() == 0.0
    assert asyncio.run(service.rotate_credentials()) is True
    assert service.version != version
    assert service.status()["credentials"]["svids"]["orders"]["serial"] != served
    assert asyncio.run(service.rotate_credentials()) is False


# ---- Envoy → authz over mTLS ----------------------------------------------------------


def _authz_credentials(policy: Policy) -> Credentials:
    needs = credential_needs(policy, authz_mtls=True)
    return Credentials(
        bundle_pem=b"BUNDLE",
        svids={w: FakeCert(f"CHAIN {w}".encode(), f"KEY {w}".encode()) for w in needs.svids},
        server_certs={g: FakeCert(b"S", b"SK") for g in needs.server_certs},
        generation="g",
    )


def test_credential_needs_with_authz_mtls_cover_every_gateway_and_authz() -> None:
    needs = credential_needs(_policy(orders_sidecar=False), authz_mtls=True)
    assert set(needs.svids) == {"edge", "edge13", "inner", "lobby", AUTHZ_GROUP}
    assert AUTHZ_GROUP not in credential_needs(_policy()).svids


def test_authz_cluster_is_mtls_to_the_authz_spiffe_id_in_every_group() -> None:
    policy = _policy()
    groups = translate(policy, AUTHZ, credentials=_authz_credentials(policy))
    for group in ("edge", "edge13", "inner", "lobby", "orders-sidecar"):
        cluster = _by_name(groups[group][rs.CLUSTER])[AUTHZ_CLUSTER]
        assert isinstance(cluster, cluster_pb2.Cluster)
        assert cluster.transport_socket.name == "envoy.transport_sockets.tls"
        context = _unpack(cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext())
        common = context.common_tls_context  # type: ignore[attr-defined]
        _assert_sds(common.tls_certificate_sds_secret_configs[0], SVID_SECRET)
        combined = common.combined_validation_context
        _assert_sds(combined.validation_context_sds_secret_config, TRUST_BUNDLE_SECRET)
        [san] = combined.default_validation_context.match_typed_subject_alt_names
        assert san.san_type == common_pb2.SubjectAltNameMatcher.URI
        assert san.matcher.exact == spiffe(AUTHZ_GROUP)
        assert list(common.alpn_protocols) == ["h2"]
        assert common.tls_params.tls_minimum_protocol_version == TLS.TLSv1_3
        # Every group then holds its own SVID and the bundle (lobby routes to no sidecar).
        secrets = _by_name(groups[group][rs.SECRET])
        assert {SVID_SECRET, TRUST_BUNDLE_SECRET} <= set(secrets)
    lobby_svid = _by_name(groups["lobby"][rs.SECRET])[SVID_SECRET]
    assert lobby_svid.tls_certificate.certificate_chain.inline_bytes == b"CHAIN lobby"  # type: ignore[attr-defined]
    # authz's group: the policy plus authz's own SVID and the bundle.
    authz = groups[AUTHZ_GROUP]
    assert len(authz[rs.POLICY]) == 1
    secrets = _by_name(authz[rs.SECRET])
    assert set(secrets) == {SVID_SECRET, TRUST_BUNDLE_SECRET}
    chain = secrets[SVID_SECRET].tls_certificate.certificate_chain.inline_bytes  # type: ignore[attr-defined]
    assert chain == f"CHAIN {AUTHZ_GROUP}".encode()
    assert secrets[TRUST_BUNDLE_SECRET].validation_context.trusted_ca.inline_bytes == b"BUNDLE"  # type: ignore[attr-defined]


def test_without_an_authz_svid_the_authz_cluster_stays_plaintext() -> None:
    groups = _groups()
    for group in ("edge", "orders-sidecar"):
        cluster = _by_name(groups[group][rs.CLUSTER])[AUTHZ_CLUSTER]
        assert not cluster.HasField("transport_socket")  # type: ignore[attr-defined]
    assert rs.SECRET not in groups[AUTHZ_GROUP]


def test_a_service_named_like_authz_is_refused_when_authz_has_an_svid() -> None:
    policy = Policy.build(
        mesh=Mesh(trust_domain=TD, namespace="shop"),
        services=(Service(AUTHZ_GROUP, (Endpoint("127.0.0.1", 1),)),),
        gateways=(Gateway("g", 3, (Route("r", RouteMatch(prefix="/"), AUTHZ_GROUP),)),),
    )
    with pytest.raises(ValueError, match="reserved for authz"):
        translate(policy, AUTHZ, credentials=_authz_credentials(policy))
