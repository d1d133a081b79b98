"""Delta ADS (``DeltaAggregatedResources``) over real gRPC: subscriptions, resource
versions, removals, reconnect with ``initial_resource_versions``, NACK rollback, nonces."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from tests.unit.test_xds_lifecycle import AUTHZ, EDS_NAMES, node, policy, run, sample
from tests.xds_harness import DeltaClient, resource_name, unpack
from xds_server import resources as rs
from xds_server.service import XdsService

Response = discovery_pb2.DeltaDiscoveryResponse


def sent(response: Response) -> dict[str, str]:
    """name → version of the resources a response carries (checked against the name
    inside each packed resource)."""
    out = {}
    for resource in response.resources:
        assert resource_name(resource.resource) == resource.name
        out[resource.name] = resource.version
    return out


def versions(service: XdsService, type_url: str, group: str = "edge") -> dict[str, str]:
    snapshot = service.cache.get_snapshot(group)
    assert snapshot is not None
    return dict(snapshot.resource_versions(type_url))


async def subscribe_all(client: DeltaClient) -> dict[str, Response]:
    """Envoy's order: CDS (wildcard), EDS (names), LDS (wildcard), RDS (names); ACKed."""
    out = {}
    for type_url, subscribe in (
        (rs.CLUSTER, []),
        (rs.ENDPOINT, EDS_NAMES),
        (rs.LISTENER, []),
        (rs.ROUTE, ["edge"]),
    ):
        await client.delta(type_url, subscribe=subscribe)
        out[type_url] = await client.recv()
        await client.ack(out[type_url])
    await client.assert_silent()
    return out


def test_wildcard_and_explicit_subscriptions_carry_resource_versions() -> None:
    async def test(service: XdsService) -> None:
        async with DeltaClient(service.port) as client:
            await client.delta(rs.CLUSTER)  # nothing named: wildcard
            cds = await client.recv()
            assert cds.type_url == rs.CLUSTER
            assert cds.system_version_info == service.version
            assert cds.nonce
            assert sent(cds) == versions(service, rs.CLUSTER)
            assert list(sent(cds)) == ["orders", "catalog", "meshward_authz"]
            assert list(cds.removed_resources) == []

            # Explicit names; one that does not exist is reported as removed.
            await client.delta(rs.ENDPOINT, subscribe=["orders", "nope"])
            eds = await client.recv()
            assert list(sent(eds)) == ["orders"]
            assert list(eds.removed_resources) == ["nope"]
            await client.delta(rs.LISTENER, subscribe=["*"])
            assert list(sent(await client.recv())) == ["edge"]
            await client.delta(rs.ROUTE, subscribe=["edge"])
            rds = await client.recv()
            assert sent(rds) == versions(service, rs.ROUTE)

            # Subscribing to one more name sends just that one.
            await client.delta(rs.ENDPOINT, subscribe=["catalog"], nonce=eds.nonce)
            more = await client.recv()
            assert list(sent(more)) == ["catalog"]
            assert list(more.removed_resources) == []
            await client.ack(more)
            await client.ack(cds)
            await client.assert_silent()

            status = node(service)
            assert status["protocol"] == "delta"
            assert status["types"]["cds"]["acked"] == service.version
            assert status["types"]["cds"]["names"] == ["*"]
            assert status["types"]["eds"]["names"] == ["catalog", "nope", "orders"]
            assert status["types"]["eds"]["acked"] == service.version
            # LDS and RDS were never ACKed: the node has not applied the version yet.
            assert status["applied_version"] is None

    run(test, policy(catalog=True))


def test_policy_change_sends_only_changed_resources_and_removals() -> None:
    async def test(service: XdsService) -> None:
        async with DeltaClient(service.port) as client:
            first = await subscribe_all(client)
            assert node(service)["applied_version"] == service.version

            # orders moves (EDS + RDS change), catalog appears (new cluster): only those.
            await service.set_policy(policy(orders_port=10201, catalog=True))
            v2 = service.version
            pushed = [await client.recv() for _ in range(3)]
            assert [r.type_url for r in pushed] == [rs.CLUSTER, rs.ENDPOINT, rs.ROUTE]
            assert {r.system_version_info for r in pushed} == {v2}
            assert list(sent(pushed[0])) == ["catalog"]  # orders/meshward_authz unchanged
            assert list(sent(pushed[1])) == ["orders"]
            assert sent(pushed[1])["orders"] != sent(first[rs.ENDPOINT])["orders"]
            await client.assert_silent()
            for response in pushed:
                await client.ack(response)
            await client.assert_silent()
            assert node(service)["applied_version"] == v2

            # The catalog service and its route go away: RDS updated, the cluster is
            # removed after it (clusters last).
            await service.set_policy(policy(orders_port=10201))
            removal = [await client.recv() for _ in range(2)]
            assert [r.type_url for r in removal] == [rs.ROUTE, rs.CLUSTER]
            assert list(removal[1].removed_resources) == ["catalog"]
            assert list(removal[1].resources) == []
            await client.assert_silent()

    run(test)


def test_removed_gateway_removes_listener_routes_and_clusters_last() -> None:
    async def test(service: XdsService) -> None:
        async with DeltaClient(service.port, cluster="side") as client:
            await client.delta(rs.CLUSTER)
            await client.ack(await client.recv())
            await client.delta(rs.ENDPOINT, subscribe=EDS_NAMES)
            await client.ack(await client.recv())
            await client.delta(rs.LISTENER)
            await client.ack(await client.recv())
            await client.delta(rs.ROUTE, subscribe=["side"])
            await client.ack(await client.recv())

            await service.set_policy(policy(gateways=("edge",)))
            removed = [await client.recv() for _ in range(4)]
            assert [(r.type_url, list(r.removed_resources)) for r in removed] == [
                (rs.ENDPOINT, EDS_NAMES),
                (rs.LISTENER, ["side"]),
                (rs.ROUTE, ["side"]),
                (rs.CLUSTER, EDS_NAMES),
            ]
            assert all(not r.resources for r in removed)
            await client.assert_silent()

    run(test, policy(gateways=("edge", "side")))


def test_unsubscribed_names_are_no_longer_sent() -> None:
    async def test(service: XdsService) -> None:
        async with DeltaClient(service.port) as client:
            await client.delta(rs.ENDPOINT, subscribe=EDS_NAMES)
            eds = await client.recv()
            assert set(sent(eds)) == set(EDS_NAMES)
            await client.ack(eds)
            await client.delta(rs.ENDPOINT, unsubscribe=["orders"], nonce=eds.nonce)
            await client.assert_silent()  # the client forgets it itself
            assert node(service)["types"]["eds"]["names"] == ["meshward_authz"]

            # orders moves: not sent any more.
            await service.set_policy(policy(orders_port=10201))
            await client.assert_silent()
            assert node(service)["applied_version"] == service.version
            # Subscribed again: it comes back, at the new version.
            await client.delta(rs.ENDPOINT, subscribe=["orders"], nonce=eds.nonce)
            again = await client.recv()
            assert sent(again) == {"orders": versions(service, rs.ENDPOINT)["orders"]}

    run(test)


def test_reconnect_with_initial_resource_versions_gets_only_the_diff() -> None:
    async def main() -> None:
        first = XdsService(policy(catalog=True), AUTHZ)
        port = await first.start()
        try:
            async with DeltaClient(port) as client:
                await client.delta(rs.CLUSTER)
                had = sent(await client.recv())
        finally:
            await first.stop(grace=0.2)
        had["gone"] = "0123456789abcdef"  # something the client still holds

        # A restarted server with a changed policy: orders moved (EDS only), catalog
        # dropped. The client comes back with what it has.
        second = XdsService(policy(orders_port=10201), AUTHZ, listen=f"127.0.0.1:{port}")
        await second.start()
        try:
            async with DeltaClient(port) as client:
                await client.delta(rs.CLUSTER, initial=had)
                cds = await client.recv()
                assert cds.system_version_info == second.version
                assert list(cds.resources) == []  # orders/meshward_authz: same versions
                assert sorted(cds.removed_resources) == ["catalog", "gone"]
                await client.ack(cds)
                await client.assert_silent()
                # Same state, new stream: an answer (the initial fetch completes), empty.
                async with DeltaClient(port, node_id="node-2") as other:
                    await other.delta(rs.CLUSTER, initial=versions(second, rs.CLUSTER))
                    empty = await other.recv()
                    assert (list(empty.resources), list(empty.removed_resources)) == ([], [])
                    assert empty.system_version_info == second.version
                # Without initial versions: the full state.
                async with DeltaClient(port, node_id="node-3") as fresh:
                    await fresh.delta(rs.CLUSTER)
                    assert sent(await fresh.recv()) == versions(second, rs.CLUSTER)
        finally:
            await second.stop(grace=0.2)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_nack_rolls_back_to_the_last_acked_resources_and_never_resends() -> None:
    moved = policy(orders_port=10201, gateway_port=10050, catalog=True)

    async def test(service: XdsService) -> None:
        v1 = service.version
        async with DeltaClient(service.port) as client:
            first = await subscribe_all(client)
            await service.set_policy(moved)
            v2 = service.version
            pushed = [await client.recv() for _ in range(4)]
            assert [r.type_url for r in pushed] == [rs.CLUSTER, rs.ENDPOINT, rs.LISTENER, rs.ROUTE]
            await client.ack(pushed[0])
            await client.ack(pushed[1])
            await client.nack(pushed[2], "cannot bind 127.0.0.1:10050")

            # Back to v1: the old endpoint, listener and routes, then catalog removed.
            rollback = [await client.recv() for _ in range(4)]
            assert [r.type_url for r in rollback] == [
                rs.ENDPOINT,
                rs.LISTENER,
                rs.ROUTE,
                rs.CLUSTER,
            ]
            assert {r.system_version_info for r in rollback} == {v1}
            assert sent(rollback[0]) == {"orders": sent(first[rs.ENDPOINT])["orders"]}
            assert sent(rollback[1]) == sent(first[rs.LISTENER])
            assert sent(rollback[2]) == sent(first[rs.ROUTE])
            listener: Any = unpack(rollback[1].resources[0].resource)
            assert listener.address.socket_address.port_value == 10000
            assert list(rollback[3].removed_resources) == ["catalog"]
            await client.assert_silent()
            status = node(service)
            assert status["applied_version"] == v1
            assert status["error"] == "cannot bind 127.0.0.1:10050"
            assert status["types"]["lds"]["nack_version"] == v2
            assert sample(service, "meshward_xds_rollbacks_total") == 1

            for response in rollback:
                await client.ack(response)
            await client.ack(pushed[3])  # the rejected push's RDS: stale
            await client.assert_silent()
            status = node(service)
            assert {s["acked"] for s in status["types"].values()} == {v1}
            assert status["error"] == "cannot bind 127.0.0.1:10050"

            await service.set_policy(moved)  # the rejected version again: not resent
            await client.assert_silent()

            await service.set_policy(policy(prefix="/shop"))  # newer: pushed
            v3 = service.version
            fixed = await client.recv()
            assert (fixed.type_url, fixed.system_version_info) == (rs.ROUTE, v3)
            await client.ack(fixed)
            await client.assert_silent()
            status = node(service)
            assert status["applied_version"] == v3
            assert status["error"] is None
            assert status["converged_version"] == v3

    run(test)


def test_stale_nonce_is_ignored_but_its_subscriptions_apply() -> None:
    async def test(service: XdsService) -> None:
        async with DeltaClient(service.port) as client:
            await client.delta(rs.ENDPOINT, subscribe=["orders"])
            old = await client.recv()
            await service.set_policy(policy(orders_port=10201))
            new = await client.recv()
            assert new.nonce != old.nonce

            # A NACK and an ACK echoing the old nonce mean nothing.
            await client.nack(old, "late complaint")
            await client.ack(old)
            await client.assert_silent()
            status = node(service)
            assert status["error"] is None
            assert status["types"]["eds"]["acked"] is None
            assert sample(service, "meshward_xds_stale_requests_total", type="eds") == 2
            assert sample(service, "meshward_xds_nacks_total", type="eds") == 0

            # A subscription sent with the old nonce still counts.
            await client.delta(rs.ENDPOINT, subscribe=["meshward_authz"], nonce=old.nonce)
            added = await client.recv()
            assert list(sent(added)) == ["meshward_authz"]
            await client.ack(added)
            await client.assert_silent()
            assert node(service)["types"]["eds"]["acked"] == service.version

    run(test)


def test_sotw_and_delta_streams_share_the_snapshot_and_converge_alike() -> None:
    from tests.xds_harness import AdsClient

    async def test(service: XdsService) -> None:
        async with (
            AdsClient(service.port, node_id="sotw") as sotw,
            DeltaClient(service.port, node_id="delta") as delta,
        ):
            await sotw.send(rs.LISTENER)
            await sotw.ack(await sotw.recv())
            await delta.delta(rs.LISTENER)
            await delta.ack(await delta.recv())
            await service.set_policy(policy(gateway_port=10050))
            s = await sotw.recv()
            d = await delta.recv()
            assert s.resources[0] == d.resources[0].resource  # the same packed Any
            await sotw.ack(s)
            await delta.ack(d)
            await sotw.assert_silent()
            await delta.assert_silent()
            nodes = {n["id"]: n for n in service.status()["nodes"]}
            assert {n["protocol"] for n in nodes.values()} == {"sotw", "delta"}
            assert {n["applied_version"] for n in nodes.values()} == {service.version}
            assert {n["converged_version"] for n in nodes.values()} == {service.version}
            assert sample(service, "meshward_xds_connected_proxies", group="edge") == 2
            assert sample(service, "meshward_xds_convergence_seconds_count") == 2

    run(test)


def test_delta_connect_storm_with_abrupt_cancels_leaves_no_streams_and_no_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test(service: XdsService) -> None:
        async def one(i: int) -> None:
            client = DeltaClient(service.port, node_id=f"storm-{i}")
            await client.__aenter__()
            await client.delta(rs.CLUSTER)
            if i % 2:  # half of them hang up before the answer can be written
                await client.close()
                return
            await client.ack(await client.recv())
            await service.set_policy(policy(orders_port=10300 + i))  # pushes mid-storm
            await client.close()

        await asyncio.gather(*(one(i) for i in range(40)))
        for _ in range(200):
            if service.status()["nodes"] == []:
                break
            await asyncio.sleep(0.02)
        assert service.status()["nodes"] == []
        assert sample(service, "meshward_xds_connected_streams") == 0
        assert sample(service, "meshward_xds_connected_proxies", group="edge") == 0
        assert service.cache.watcher_count("edge") == 0

    with caplog.at_level("DEBUG"):
        run(test)
    problems = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL") or r.exc_info]
    assert problems == []
    assert sum(r.getMessage() == "xds stream closed" for r in caplog.records) >= 20


def test_bootstrap_chooses_sotw_or_delta_ads() -> None:
    import yaml

    from xds_server.bootstrap import render_bootstrap

    def api_type(**kwargs: str) -> str:
        text = render_bootstrap("n-1", "edge", 0, "127.0.0.1", 18000, **kwargs)
        return str(yaml.safe_load(text)["dynamic_resources"]["ads_config"]["api_type"])

    assert api_type() == "GRPC"
    assert api_type(api_type="DELTA_GRPC") == "DELTA_GRPC"
    with pytest.raises(ValueError, match="api_type must be one of GRPC, DELTA_GRPC"):
        api_type(api_type="REST")
