"""authz replicas register themselves as endpoints of the authz cluster by their ADS
streams: real gRPC clients (a proxy and replicas) against a real XdsService.

What is checked: a replica counts once it has applied its configuration, until its
stream ends; each change is one EDS push to the proxies and nothing else; a wildcard
host becomes the stream's peer IP; unusable announcements are ignored (logged once);
static endpoints and replicas are deduplicated; no endpoint at all is an empty
assignment (Envoy fails closed); the start-up hold; /status and metrics.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from authz.policy_source import LISTEN_METADATA_KEY as AUTHZ_SIDE_KEY
from meshward.policy import wire
from meshward.policy.model import Endpoint, Gateway, Policy, Route, RouteMatch, Service
from tests.xds_harness import AdsClient, DeltaClient, run_xds, unpack
from xds_server import resources as rs
from xds_server.cache import Snapshot
from xds_server.replicas import (
    LISTEN_METADATA_KEY,
    UnusableAnnouncementError,
    peer_ip,
    replica_address,
)
from xds_server.service import XdsService
from xds_server.translator import (
    AUTHZ_CLUSTER,
    AUTHZ_GROUP,
    authz_load_assignment,
    snapshot_version,
    translate,
)


def _policy() -> Policy:
    route = Route("orders-api", RouteMatch(prefix="/orders"), "orders")
    return Policy.build(
        services=(Service("orders", (Endpoint("127.0.0.1", 10101),)),),
        gateways=(Gateway("edge", 10000, (route,)),),
    )


def run(
    test: Callable[[XdsService], Awaitable[None]],
    static: list[tuple[str, int]] | None = None,
    **options: Any,
) -> None:
    """Start an XdsService (no static authz endpoint by default, no start-up hold unless
    asked), run ``test`` against it, always stop it."""

    options.setdefault("authz_hold_seconds", 0)
    options.setdefault("endpoints_coalesce_seconds", 0.01)
    run_xds(test, _policy(), static or [], **options)


def replica(port: int, announced: str, node_id: str) -> AdsClient:
    """A replica's ADS client: node group meshward-authz, announcing ``announced``."""
    client = AdsClient(port, node_id=node_id, cluster=AUTHZ_GROUP)
    client.node.metadata.update({LISTEN_METADATA_KEY: announced})
    return client


async def register(client: AdsClient) -> None:
    """Subscribe to the policy and ACK it, as authz does: the replica is now ready."""
    await client.send(rs.POLICY)
    await client.ack(await client.recv())


def endpoints(response: Any) -> list[str]:
    """HOST:PORT of each endpoint of the authz assignment in an EDS response (SotW)."""
    [packed] = [r for r in response.resources if unpack(r).cluster_name == AUTHZ_CLUSTER]
    return _hosts(unpack(packed))


def _hosts(assignment: endpoint_pb2.ClusterLoadAssignment) -> list[str]:
    return [
        f"{e.endpoint.address.socket_address.address}:{e.endpoint.address.socket_address.port_value}"
        for locality in assignment.endpoints
        for e in locality.lb_endpoints
    ]


async def proxy(port: int) -> tuple[AdsClient, Any]:
    """A proxy of group edge subscribed to CDS and to the authz EDS, both ACKed."""
    client = AdsClient(port, node_id="edge-1", cluster="edge")
    await client.__aenter__()
    await client.send(rs.CLUSTER)
    await client.ack(await client.recv())
    await client.send(rs.ENDPOINT, names=[AUTHZ_CLUSTER])
    eds = await client.recv()
    await client.ack(eds, names=[AUTHZ_CLUSTER])
    return client, eds


async def next_eds(client: AdsClient) -> Any:
    """The next response, which must be EDS; ACKed; then nothing else follows."""
    response = await client.recv()
    assert response.type_url == rs.ENDPOINT, response.type_url
    await client.ack(response, names=[AUTHZ_CLUSTER])
    await client.assert_silent(0.2)
    return response


def _sample(service: XdsService, name: str) -> float:
    return service.registry.get_sample_value(name) or 0.0


# -- the address a replica is reached at -----------------------------------------------


def test_the_metadata_key_is_the_one_authz_announces() -> None:
    assert LISTEN_METADATA_KEY == AUTHZ_SIDE_KEY


@pytest.mark.parametrize(
    ("announced", "peer", "expected"),
    [
        ("127.0.0.1:9191", "ipv4:10.1.2.3:40000", (("127.0.0.1", 9191), "announced")),
        ("10.0.0.5:9191", "ipv4:10.1.2.3:40000", (("10.0.0.5", 9191), "announced")),
        ("0.0.0.0:9191", "ipv4:172.18.0.4:40000", (("172.18.0.4", 9191), "peer")),
        (":9191", "ipv4:172.18.0.4:40000", (("172.18.0.4", 9191), "peer")),
        ("[::]:9191", "ipv6:[fd00::7]:40000", (("fd00::7", 9191), "peer")),
        ("[::]:9191", "ipv6:%5Bfd00::7%5D:40000", (("fd00::7", 9191), "peer")),
        ("0.0.0.0:9191", "ipv6:[::ffff:172.18.0.4]:40000", (("172.18.0.4", 9191), "peer")),
        ("[::1]:9191", "ipv4:127.0.0.1:40000", (("::1", 9191), "announced")),
        ("[0:0::1]:9191", "ipv4:127.0.0.1:40000", (("::1", 9191), "announced")),
    ],
)
def test_replica_address(announced: str, peer: str, expected: tuple[Any, str]) -> None:
    assert replica_address(announced, peer) == expected


@pytest.mark.parametrize(
    ("announced", "peer", "message"),
    [
        ("127.0.0.1", "ipv4:127.0.0.1:1", "no usable port"),
        ("127.0.0.1:", "ipv4:127.0.0.1:1", "no usable port"),
        ("127.0.0.1:0", "ipv4:127.0.0.1:1", "no usable port"),
        ("127.0.0.1:70000", "ipv4:127.0.0.1:1", "no usable port"),
        ("authz.internal:9191", "ipv4:127.0.0.1:1", "is not an IP address"),
        ("localhost:9191", "ipv4:127.0.0.1:1", "is not an IP address"),
        ("0.0.0.0:9191", "unix:/run/xds.sock", "has no IP to use instead"),
    ],
)
def test_unusable_announcements_say_why(announced: str, peer: str, message: str) -> None:
    with pytest.raises(UnusableAnnouncementError, match=message):
        replica_address(announced, peer)


def test_peer_ip() -> None:
    assert peer_ip("ipv4:127.0.0.1:5000") == "127.0.0.1"
    assert peer_ip("ipv6:[::1]:5000") == "::1"
    assert peer_ip("unix:/tmp/x") is None
    assert peer_ip("") is None


# -- the EDS of the authz cluster --------------------------------------------------------


def test_with_resources_replaces_only_the_authz_assignment() -> None:
    """The snapshots the service derives on a replica change are what a full translation
    with the same endpoints gives; only EDS content differs from before."""
    policy = _policy()
    before = translate(policy, [])["edge"]
    after = translate(policy, [("127.0.0.1", 9301), ("127.0.0.1", 9302)])["edge"]
    old = Snapshot.build("v1", before)
    new = old.with_resources(
        "v2", rs.ENDPOINT, [authz_load_assignment([("127.0.0.1", 9301), ("127.0.0.1", 9302)])]
    )
    full = Snapshot.build("v2", after)
    for type_url in rs.PUSH_ORDER:
        assert new.digest(type_url) == full.digest(type_url), rs.short_name(type_url)
        if type_url != rs.ENDPOINT:
            assert new.digest(type_url) == old.digest(type_url), rs.short_name(type_url)
    assert new.digest(rs.ENDPOINT) != old.digest(rs.ENDPOINT)
    assert new.names(rs.ENDPOINT) == old.names(rs.ENDPOINT) == ("orders", AUTHZ_CLUSTER)
    assert new.version == "v2"
    with pytest.raises(ValueError, match="listed under"):
        old.with_resources("v3", rs.CLUSTER, [authz_load_assignment([])])


def test_authz_cluster_is_eds_least_request_and_empty_without_endpoints() -> None:
    edge = translate(_policy(), [])["edge"]
    [cluster] = [c for c in edge[rs.CLUSTER] if rs.resource_name(c) == AUTHZ_CLUSTER]
    assert isinstance(cluster, cluster_pb2.Cluster)
    assert cluster.type == cluster_pb2.Cluster.EDS
    assert cluster.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    [assignment] = [a for a in edge[rs.ENDPOINT] if rs.resource_name(a) == AUTHZ_CLUSTER]
    assert isinstance(assignment, endpoint_pb2.ClusterLoadAssignment)
    assert _hosts(assignment) == []


def test_replicas_register_and_leave_and_each_change_is_one_eds_push() -> None:
    async def test(service: XdsService) -> None:
        edge, eds = await proxy(service.port)
        try:
            # No static endpoint, no replica: an empty assignment (Envoy fails closed).
            assert endpoints(eds) == []
            first_version = eds.version_info
            async with replica(service.port, "127.0.0.1:9301", "authz-a") as a:
                await a.send(rs.POLICY)
                policy_response = await a.recv()
                # Not ACKed yet: it may not hold the policy, so it does not count.
                await edge.assert_silent(0.3)
                assert service.status()["authz_replicas"][0]["ready"] is False
                await a.ack(policy_response)
                added = await next_eds(edge)
                assert endpoints(added) == ["127.0.0.1:9301"]
                assert added.version_info == service.version != first_version
                assert service.authz_endpoints == (("127.0.0.1", 9301),)

                # A wildcard host: reached at the IP its stream comes from.
                async with replica(service.port, "0.0.0.0:9302", "authz-b") as b:
                    await register(b)
                    both = await next_eds(edge)
                    assert endpoints(both) == ["127.0.0.1:9301", "127.0.0.1:9302"]
                    status = service.status()
                    assert status["authz_endpoints"] == ["127.0.0.1:9301", "127.0.0.1:9302"]
                    by_node = {r["node"]: r for r in status["authz_replicas"]}
                    assert by_node["authz-a"]["source"] == "announced"
                    assert by_node["authz-b"]["source"] == "peer"
                    assert by_node["authz-b"]["address"] == "127.0.0.1:9302"
                    assert by_node["authz-b"]["announced"] == "0.0.0.0:9302"
                    assert by_node["authz-b"]["ready"] is True
                    assert _sample(service, "meshward_xds_authz_replicas") == 2
                    assert _sample(service, "meshward_xds_authz_endpoints") == 2
                # b's stream ended: its endpoint goes.
                only_a = await next_eds(edge)
                assert endpoints(only_a) == ["127.0.0.1:9301"]
                assert only_a.version_info == added.version_info  # same set, same version
            # Both gone: empty again, fail closed.
            empty = await next_eds(edge)
            assert endpoints(empty) == []
            assert empty.version_info == first_version
            assert service.status()["authz_replicas"] == []
            assert _sample(service, "meshward_xds_authz_replicas") == 0
            assert _sample(service, "meshward_xds_authz_endpoints") == 0
            # The proxy applied each of them: no NACK, no convergence (not a policy change).
            [node] = [n for n in service.status()["nodes"] if n["group"] == "edge"]
            assert node["applied_version"] == service.version
            assert node["error"] is None
        finally:
            await edge.close()

    run(test)


def test_unusable_announcements_are_ignored_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test(service: XdsService) -> None:
        edge, _ = await proxy(service.port)
        try:
            for _ in range(2):
                async with replica(service.port, "authz.internal:9303", "authz-dns") as bad:
                    await register(bad)
                    await edge.assert_silent(0.3)
            no_key = AdsClient(service.port, node_id="authz-anonymous", cluster=AUTHZ_GROUP)
            async with no_key:
                await register(no_key)
                await edge.assert_silent(0.3)
            assert service.status()["authz_replicas"] == []
            assert _sample(service, "meshward_xds_authz_announcements_rejected_total") == 3
        finally:
            await edge.close()

    with caplog.at_level(logging.DEBUG, logger="meshward.xds"):
        run(test)
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("authz replica ignored")
    ]
    assert [getattr(r, "node", None) for r in warnings] == ["authz-dns", "authz-anonymous"]
    assert "is not an IP address" in getattr(warnings[0], "error", "")
    assert LISTEN_METADATA_KEY in getattr(warnings[1], "error", "")


def test_a_replica_at_a_static_endpoint_is_one_endpoint() -> None:
    async def test(service: XdsService) -> None:
        edge, eds = await proxy(service.port)
        try:
            assert endpoints(eds) == ["127.0.0.1:9301"]
            version = service.version
            async with replica(service.port, "127.0.0.1:9301", "authz-a") as a:
                await register(a)
                await edge.assert_silent(0.3)
                assert service.version == version
                async with replica(service.port, "127.0.0.1:9302", "authz-b") as b:
                    await register(b)
                    assert endpoints(await next_eds(edge)) == [
                        "127.0.0.1:9301",
                        "127.0.0.1:9302",
                    ]
            # Replicas gone; the static endpoint stays.
            assert endpoints(await next_eds(edge)) == ["127.0.0.1:9301"]
            assert service.version == version
        finally:
            await edge.close()

    run(test, static=[("127.0.0.1", 9301)])


def test_a_dns_static_endpoint_keeps_strict_dns_and_replicas_unused() -> None:
    async def test(service: XdsService) -> None:
        edge, eds = await proxy(service.port)
        try:
            assert not [r for r in eds.resources if unpack(r).cluster_name == AUTHZ_CLUSTER]
            async with replica(service.port, "127.0.0.1:9301", "authz-a") as a:
                await register(a)
                await edge.assert_silent(0.3)
                assert service.status()["authz_replicas"][0]["ready"] is True
                assert service.authz_endpoints == (("authz.internal", 9191),)
        finally:
            await edge.close()

    run(test, static=[("authz.internal", 9191)])


def test_delta_proxies_get_the_eds_change_alone() -> None:
    async def test(service: XdsService) -> None:
        async with DeltaClient(service.port, node_id="edge-d", cluster="edge") as edge:
            for type_url, names in ((rs.CLUSTER, []), (rs.ENDPOINT, [AUTHZ_CLUSTER])):
                await edge.delta(type_url, subscribe=names)
                await edge.ack(await edge.recv())
            async with replica(service.port, "127.0.0.1:9301", "authz-a") as a:
                await register(a)
                response = await edge.recv()
                assert response.type_url == rs.ENDPOINT
                assert [r.name for r in response.resources] == [AUTHZ_CLUSTER]
                assert _hosts(unpack(response.resources[0].resource)) == ["127.0.0.1:9301"]
                await edge.ack(response)
                await edge.assert_silent(0.3)
            response = await edge.recv()
            assert _hosts(unpack(response.resources[0].resource)) == []

    run(test)


def test_the_replica_set_is_part_of_the_version_and_survives_a_policy_change() -> None:
    async def test(service: XdsService) -> None:
        async with replica(service.port, "127.0.0.1:9301", "authz-a") as a:
            await register(a)
            for _ in range(100):
                if service.authz_endpoints:
                    break
                await asyncio.sleep(0.02)
            assert service.version == snapshot_version(service.policy, [("127.0.0.1", 9301)])
            changed = Policy.build(
                services=service.policy.services,
                gateways=(
                    Gateway(
                        "edge",
                        10001,
                        (Route("orders-api", RouteMatch(prefix="/o"), "orders"),),
                    ),
                ),
            )
            await service.set_policy(changed)
            edge = service.cache.get_snapshot("edge")
            assert edge is not None
            assert _hosts(unpack(edge.resources(rs.ENDPOINT)[AUTHZ_CLUSTER])) == ["127.0.0.1:9301"]
            assert service.version == snapshot_version(changed, [("127.0.0.1", 9301)])

    run(test)


def test_start_up_hold_until_a_replica_registers() -> None:
    """Without static endpoints, proxies get nothing until a replica is ready (a proxy
    reconnecting after a restart keeps its endpoints); the authz group is served."""

    async def test(service: XdsService) -> None:
        assert service.status()["authz_hold_seconds_left"] > 0
        async with AdsClient(service.port, node_id="edge-1", cluster="edge") as edge:
            await edge.send(rs.CLUSTER)
            await edge.assert_silent(0.4)
            assert "edge" in service.status()["snapshots"]
            async with replica(service.port, "127.0.0.1:9301", "authz-a") as a:
                await register(a)
                cds = await edge.recv()
                assert cds.type_url == rs.CLUSTER
                await edge.send(rs.ENDPOINT, names=[AUTHZ_CLUSTER])
                assert endpoints(await edge.recv()) == ["127.0.0.1:9301"]
                assert service.status()["authz_hold_seconds_left"] is None

    run(test, authz_hold_seconds=10)


def test_start_up_hold_ends_after_its_time_and_then_fails_closed() -> None:
    async def test(service: XdsService) -> None:
        async with AdsClient(service.port, node_id="edge-1", cluster="edge") as edge:
            await edge.send(rs.ENDPOINT, names=[AUTHZ_CLUSTER])
            eds = await edge.recv(timeout=3)
            assert endpoints(eds) == []

    run(test, authz_hold_seconds=0.3)


def test_no_hold_with_a_static_endpoint() -> None:
    async def test(service: XdsService) -> None:
        assert service.status()["authz_hold_seconds_left"] is None
        async with AdsClient(service.port, node_id="edge-1", cluster="edge") as edge:
            await edge.send(rs.ENDPOINT, names=[AUTHZ_CLUSTER])
            assert endpoints(await edge.recv()) == ["127.0.0.1:9191"]

    run(test, static=[("127.0.0.1", 9191)], authz_hold_seconds=10)


def test_policy_group_of_replicas_is_unaffected_by_replica_changes() -> None:
    """A replica joining is not a new policy for the replicas: nothing is pushed to them."""

    async def test(service: XdsService) -> None:
        async with replica(service.port, "127.0.0.1:9301", "authz-a") as a:
            await register(a)
            async with replica(service.port, "127.0.0.1:9302", "authz-b") as b:
                await register(b)
                await a.assert_silent(0.3)
            await a.assert_silent(0.3)
            assert wire.TYPE_URL == rs.POLICY

    run(test)
