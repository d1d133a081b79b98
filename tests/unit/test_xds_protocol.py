"""The ADS (SotW) stream protocol, over real gRPC: a grpc.aio client against XdsService."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2

from meshward.policy.model import Endpoint, Gateway, Policy, Route, RouteMatch, Service
from tests.xds_harness import AdsClient, run_xds
from xds_server import resources as rs
from xds_server.cache import Snapshot
from xds_server.server import with_nonce
from xds_server.service import XdsService

AUTHZ = [("127.0.0.1", 9191)]


def _policy(*extra_routes: Route, gateways: tuple[str, ...] = ("edge",)) -> Policy:
    routes = (
        Route("orders-api", RouteMatch(prefix="/orders", methods=("GET",)), "orders"),
        *extra_routes,
    )
    return Policy.build(
        services=(
            Service("orders", (Endpoint("127.0.0.1", 10101),)),
            Service("catalog", (Endpoint("127.0.0.1", 10102),)),
        ),
        gateways=tuple(Gateway(name, 10000 + i, routes) for i, name in enumerate(gateways)),
    )


CATALOG = Route("catalog-api", RouteMatch(prefix="/catalog"), "catalog")


def run(test: Callable[[XdsService], Awaitable[None]], policy: Policy | None = None) -> None:
    """Start an XdsService on a free port, run ``test`` against it, always stop it."""

    run_xds(test, policy or _policy(), AUTHZ)


def _names(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    out = []
    for packed in response.resources:
        if packed.type_url == rs.ENDPOINT:
            message = endpoint_pb2.ClusterLoadAssignment()
            packed.Unpack(message)
            out.append(message.cluster_name)
        else:
            message = {
                rs.CLUSTER: cluster_pb2.Cluster,
                rs.LISTENER: listener_pb2.Listener,
                rs.ROUTE: route_pb2.RouteConfiguration,
            }[packed.type_url]()
            packed.Unpack(message)
            out.append(message.name)
    return out


def _sample(service: XdsService, name: str, **labels: str) -> float:
    return service.registry.get_sample_value(name, labels) or 0.0


def test_first_request_is_answered_and_plain_ack_is_not() -> None:
    async def test(service: XdsService) -> None:
        async with AdsClient(service.port) as client:
            await client.send(rs.CLUSTER)
            response = await client.recv()
            assert response.type_url == rs.CLUSTER
            assert response.version_info == service.version == service.policy.version
            assert response.nonce
            assert _names(response) == ["orders", "meshward_authz"]
            await client.ack(response)
            await client.assert_silent()
            # ...and a second identical ACK does not loop either.
            await client.ack(response)
            await client.assert_silent()
            node = service.status()["nodes"][0]
            assert node["id"] == "node-1"
            assert node["group"] == "edge"
            assert node["types"]["cds"]["sent"] == service.version
            assert node["types"]["cds"]["acked"] == service.version
            assert _sample(service, "meshward_xds_responses_total", type="cds") == 1

    run(test)


def test_lds_and_cds_carry_everything_rds_and_eds_only_requested_names() -> None:
    async def test(service: XdsService) -> None:
        async with AdsClient(service.port) as client:
            await client.send(rs.CLUSTER)
            assert _names(await client.recv()) == ["orders", "catalog", "meshward_authz"]
            await client.send(rs.LISTENER, names=["something-else"])
            assert _names(await client.recv()) == ["edge"]
            await client.send(rs.ENDPOINT, names=["orders"])
            assert _names(await client.recv()) == ["orders"]
            await client.send(rs.ROUTE, names=["no-such-route"])
            response = await client.recv()
            assert response.version_info == service.version
            assert _names(response) == []

    run(test, _policy(CATALOG))


def test_change_of_names_is_answered_and_stale_nonce_ignored() -> None:
    async def test(service: XdsService) -> None:
        async with AdsClient(service.port) as client:
            await client.send(rs.ENDPOINT, names=["orders"])
            first = await client.recv()
            assert _names(first) == ["orders"]
            both = ["orders", "meshward_authz"]
            # A nonce we never sent (or an old one) is stale: ignored entirely.
            await client.send(rs.ENDPOINT, names=both, version=first.version_info, nonce="x-9")
            await client.assert_silent()
            assert _sample(service, "meshward_xds_stale_requests_total", type="eds") == 1
            # The same change with the latest nonce is answered, same version, new names.
            await client.send(
                rs.ENDPOINT, names=both, version=first.version_info, nonce=first.nonce
            )
            second = await client.recv()
            assert sorted(_names(second)) == sorted(both)
            assert second.version_info == first.version_info
            assert second.nonce != first.nonce
            # Now the first nonce is stale: an "ACK" carrying it is ignored...
            await client.send(rs.ENDPOINT, names=["orders"], version="", nonce=first.nonce)
            await client.assert_silent()
            # ...while the real ACK is recorded and not answered.
            await client.ack(second, names=both)
            await client.assert_silent()
            eds = service.status()["nodes"][0]["types"]["eds"]
            assert eds["acked"] == service.version
            assert eds["names"] == sorted(both)

    run(test)


def test_nack_is_recorded_and_the_rejected_version_is_not_resent() -> None:
    async def test(service: XdsService) -> None:
        async with AdsClient(service.port) as client:
            await client.send(rs.LISTENER)
            bad = await client.recv()
            await client.send(rs.LISTENER, version="", nonce=bad.nonce, error="bad listener")
            await client.assert_silent()
            lds = service.status()["nodes"][0]["types"]["lds"]
            assert lds["nack_error"] == "bad listener"
            assert lds["nack_version"] == bad.version_info
            assert lds["acked"] is None
            assert _sample(service, "meshward_xds_nacks_total", type="lds") == 1
            # Setting the same policy again is the same version: still nothing sent.
            await service.set_policy(service.policy)
            await client.assert_silent()
            # A new version is pushed, and its ACK is recorded.
            await service.set_policy(_policy(CATALOG))
            fixed = await client.recv()
            assert fixed.version_info == service.version != bad.version_info
            await client.ack(fixed)
            await client.assert_silent()
            lds = service.status()["nodes"][0]["types"]["lds"]
            assert lds["acked"] == service.version

    run(test)


def _everything_changed() -> Policy:
    """A policy changing all four types for a client of ``_policy()``: a new cluster
    (CDS), a moved ``orders`` endpoint (EDS), a new gateway port (LDS), a new route (RDS).
    """
    return Policy.build(
        services=(
            Service("orders", (Endpoint("127.0.0.1", 10201),)),
            Service("catalog", (Endpoint("127.0.0.1", 10102),)),
        ),
        gateways=(
            Gateway(
                "edge",
                10050,
                (
                    Route("orders-api", RouteMatch(prefix="/orders", methods=("GET",)), "orders"),
                    CATALOG,
                ),
            ),
        ),
    )


def test_new_policy_is_pushed_cds_eds_lds_rds_in_order() -> None:
    async def test(service: XdsService) -> None:
        async with AdsClient(service.port) as client:
            # Envoy's own subscription order on ADS.
            await client.send(rs.CLUSTER)
            await client.ack(await client.recv())
            await client.send(rs.ENDPOINT, names=["orders", "meshward_authz"])
            await client.ack(await client.recv(), names=["orders", "meshward_authz"])
            await client.send(rs.LISTENER)
            await client.ack(await client.recv())
            await client.send(rs.ROUTE, names=["edge"])
            await client.ack(await client.recv(), names=["edge"])
            await client.assert_silent()
            old = service.version

            await service.set_policy(_everything_changed())
            assert service.version != old
            pushed = [await client.recv() for _ in range(4)]
            assert [r.type_url for r in pushed] == [rs.CLUSTER, rs.ENDPOINT, rs.LISTENER, rs.ROUTE]
            assert {r.version_info for r in pushed} == {service.version}
            assert _names(pushed[0]) == ["orders", "catalog", "meshward_authz"]
            await client.assert_silent()
            for r in pushed:
                names = {rs.ENDPOINT: ["orders", "meshward_authz"], rs.ROUTE: ["edge"]}
                await client.ack(r, names=names.get(r.type_url, []))
            await client.assert_silent()
            types = service.status()["nodes"][0]["types"]
            assert {t: s["acked"] for t, s in types.items()} == dict.fromkeys(
                ("cds", "eds", "lds", "rds"), service.version
            )

    run(test)


def test_reconnect_after_server_restart_gets_full_state() -> None:
    async def main() -> None:
        first = XdsService(_policy(), AUTHZ)
        port = await first.start()
        async with AdsClient(port) as client:
            await client.send(rs.CLUSTER)
            response = await client.recv()
            await client.ack(response)
        await first.stop(grace=0.2)

        # A new server process on the same port; Envoy comes back with its last
        # version_info and an empty nonce, and must get everything even though the
        # version is the current one.
        second = XdsService(_policy(), AUTHZ, listen=f"127.0.0.1:{port}")
        await second.start()
        try:
            async with AdsClient(port) as client:
                await client.send(rs.CLUSTER, version=response.version_info, nonce="")
                again = await client.recv()
                assert again.version_info == response.version_info
                assert _names(again) == _names(response)
                await client.send(rs.ROUTE, names=["edge"], version=response.version_info)
                assert _names(await client.recv()) == ["edge"]
        finally:
            await second.stop(grace=0.2)

    asyncio.run(asyncio.wait_for(main(), 20))


def test_stream_waits_for_unknown_group_and_removed_group_gets_empty_state() -> None:
    async def test(service: XdsService) -> None:
        async with AdsClient(service.port, cluster="internal") as client:
            await client.send(rs.LISTENER)
            await client.assert_silent()
            await service.set_policy(_policy(gateways=("edge", "internal")))
            added = await client.recv()
            assert _names(added) == ["internal"]
            await client.ack(added)
            await service.set_policy(_policy(gateways=("edge",)))
            removed = await client.recv()
            assert removed.version_info == service.version
            assert _names(removed) == []  # LDS is state of the world: a deletion

    run(test)


def test_node_without_cluster_is_rejected_with_a_reason() -> None:
    async def test(service: XdsService) -> None:
        async with AdsClient(service.port, cluster="") as client:
            await client.send(rs.CLUSTER)
            with pytest.raises(ConnectionError):
                await client.recv()
            assert client.error is not None
            assert client.error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "node.cluster" in (client.error.details() or "")

    run(test)


def test_closed_streams_are_cleaned_up() -> None:
    async def test(service: XdsService) -> None:
        clients = [AdsClient(service.port, node_id=f"n{i}") for i in range(5)]
        for client in clients:
            await client.__aenter__()
            await client.send(rs.CLUSTER)
            await client.recv()
        assert _sample(service, "meshward_xds_connected_streams") == 5
        assert len(service.status()["nodes"]) == 5
        for client in clients:
            await client.close()
        for _ in range(100):
            if _sample(service, "meshward_xds_connected_streams") == 0:
                break
            await asyncio.sleep(0.02)
        assert _sample(service, "meshward_xds_connected_streams") == 0
        assert service.status()["nodes"] == []
        assert service.cache.watcher_count("edge") == 0

    run(test)


def test_response_bytes_are_shared_and_nonce_is_appended_correctly() -> None:
    snapshot = Snapshot.build("v1", {rs.CLUSTER: [cluster_pb2.Cluster(name="a")]})
    body = snapshot.response_body(rs.CLUSTER)
    assert snapshot.response_body(rs.CLUSTER) is body
    for nonce in ("1-1", "n" * 300):  # 300 needs a two-byte length varint
        parsed = discovery_pb2.DiscoveryResponse.FromString(with_nonce(body, nonce))
        assert parsed.nonce == nonce
        assert parsed.version_info == "v1"
        assert parsed.type_url == rs.CLUSTER
        assert len(parsed.resources) == 1


def test_dropped_clusters_are_removed_after_the_routes_that_used_them() -> None:
    renamed = Policy.build(
        services=(Service("orders-v2", (Endpoint("127.0.0.1", 10111),)),),
        gateways=(
            Gateway(
                "edge",
                10000,
                (Route("orders-api", RouteMatch(prefix="/orders"), "orders-v2"),),
            ),
        ),
    )

    async def test(service: XdsService) -> None:
        async with AdsClient(service.port) as client:
            subscriptions = {
                rs.CLUSTER: [],
                rs.ENDPOINT: ["orders", "meshward_authz"],
                rs.LISTENER: [],
                rs.ROUTE: ["edge"],
            }
            for type_url, names in subscriptions.items():
                await client.send(type_url, names=names)
                await client.ack(await client.recv(), names=names)
            await client.assert_silent()

            await service.set_policy(renamed)
            # The listener is unchanged, so it is not pushed.
            pushed = [await client.recv() for _ in range(4)]
            assert [r.type_url for r in pushed] == [rs.CLUSTER, rs.ENDPOINT, rs.ROUTE, rs.CLUSTER]
            assert {r.version_info for r in pushed} == {service.version}
            # First CDS keeps the old cluster beside the new one; the last drops it.
            assert _names(pushed[0]) == ["orders-v2", "meshward_authz", "orders"]
            assert _names(pushed[1]) == ["meshward_authz"]  # "orders" is gone
            assert _names(pushed[3]) == ["orders-v2", "meshward_authz"]
            await client.assert_silent()
            # The first CDS response's ACK is stale now; the last one's is recorded.
            await client.ack(pushed[0])
            await client.ack(pushed[3])
            await client.assert_silent()
            cds = service.status()["nodes"][0]["types"]["cds"]
            assert cds["acked"] == service.version
            assert cds["nonce"] == pushed[3].nonce

    run(test)


def test_connect_storm_with_abrupt_cancels_leaves_no_streams_and_no_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test(service: XdsService) -> None:
        async def one(i: int) -> None:
            client = AdsClient(service.port, node_id=f"storm-{i}")
            await client.__aenter__()
            await client.send(rs.CLUSTER)
            if i % 2:  # half of them hang up before the answer can be written
                await client.close()
                return
            await client.recv()
            await client.send(rs.LISTENER)
            await client.close()

        await asyncio.gather(*(one(i) for i in range(60)))
        for _ in range(200):
            if _sample(service, "meshward_xds_connected_streams") == 0:
                break
            await asyncio.sleep(0.02)
        assert _sample(service, "meshward_xds_connected_streams") == 0
        assert service.status()["nodes"] == []
        assert service.cache.watcher_count("edge") == 0

    with caplog.at_level("DEBUG"):
        run(test)
    problems = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL") or r.exc_info]
    assert problems == []
    assert sum(r.getMessage() == "xds stream closed" for r in caplog.records) >= 30
