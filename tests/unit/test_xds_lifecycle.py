"""Policy lifecycle on SotW ADS, over real gRPC: NACK rollback, pushing only what
changed, and the status/metrics that show versions, errors and convergence."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from meshward.policy.model import Endpoint, Gateway, Policy, Route, RouteMatch, Service
from tests.xds_harness import AdsClient, resource_name, run_xds, unpack
from xds_server import resources as rs
from xds_server.service import XdsService

AUTHZ = [("127.0.0.1", 9191)]
EDS_NAMES = ["orders", "meshward_authz"]
SUBSCRIPTIONS: dict[str, list[str]] = {
    rs.CLUSTER: [],
    rs.ENDPOINT: EDS_NAMES,
    rs.LISTENER: [],
    rs.ROUTE: ["edge"],
}


def policy(
    *,
    orders_port: int = 10101,
    gateway_port: int = 10000,
    catalog: bool = False,
    prefix: str = "/orders",
    gateways: tuple[str, ...] = ("edge",),
) -> Policy:
    routes = [Route("orders-api", RouteMatch(prefix=prefix, methods=("GET",)), "orders")]
    if catalog:
        routes.append(Route("catalog-api", RouteMatch(prefix="/catalog"), "catalog"))
    return Policy.build(
        services=(
            Service("orders", (Endpoint("127.0.0.1", orders_port),)),
            Service("catalog", (Endpoint("127.0.0.1", 10102),)),
        ),
        gateways=tuple(
            Gateway(name, gateway_port + i, tuple(routes)) for i, name in enumerate(gateways)
        ),
    )


def run(test: Callable[[XdsService], Awaitable[None]], initial: Policy | None = None) -> None:
    run_xds(test, initial or policy(), AUTHZ, timeout=30)


def names(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    return [resource_name(packed) for packed in response.resources]


def sample(service: XdsService, name: str, **labels: str) -> float:
    return service.registry.get_sample_value(name, labels) or 0.0


def node(service: XdsService, index: int = 0) -> dict[str, Any]:
    return dict(service.status()["nodes"][index])


async def subscribe_all(client: AdsClient) -> None:
    """Envoy's subscription order on ADS, each response ACKed."""
    for type_url, subscribed in SUBSCRIPTIONS.items():
        await client.send(type_url, names=subscribed)
        await client.ack(await client.recv(), names=subscribed)
    await client.assert_silent()


async def ack_all(client: AdsClient, responses: list[discovery_pb2.DiscoveryResponse]) -> None:
    for response in responses:
        await client.ack(response, names=SUBSCRIPTIONS[response.type_url])


async def eventually(check: Callable[[], bool], what: str) -> None:
    for _ in range(100):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


def test_nack_rolls_every_moved_type_back_and_never_resends_the_rejected_version() -> None:
    moved = policy(orders_port=10201, gateway_port=10050, catalog=True)

    async def test(service: XdsService) -> None:
        v1 = service.version
        async with AdsClient(service.port) as client:
            await subscribe_all(client)
            assert node(service)["applied_version"] == v1
            assert node(service)["error"] is None

            await service.set_policy(moved)
            v2 = service.version
            pushed = [await client.recv() for _ in range(4)]
            assert [r.type_url for r in pushed] == [rs.CLUSTER, rs.ENDPOINT, rs.LISTENER, rs.ROUTE]
            assert {r.version_info for r in pushed} == {v2}
            # CDS and EDS are accepted at v2, the listener is rejected.
            await ack_all(client, pushed[:2])
            await client.send(rs.LISTENER, version=v1, nonce=pushed[2].nonce, error="bad port")

            # Rollback to v1 for every type that moved, in push order; the cluster
            # that v1 lacks is removed last.
            rollback = [await client.recv() for _ in range(5)]
            assert [r.type_url for r in rollback] == [
                rs.CLUSTER,
                rs.ENDPOINT,
                rs.LISTENER,
                rs.ROUTE,
                rs.CLUSTER,
            ]
            assert {r.version_info for r in rollback} == {v1}
            assert names(rollback[0]) == ["orders", "meshward_authz", "catalog"]
            assert names(rollback[4]) == ["orders", "meshward_authz"]
            orders = next(unpack(a) for a in rollback[1].resources if resource_name(a) == "orders")
            port = orders.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value
            assert port == 10101
            assert unpack(rollback[2].resources[0]).address.socket_address.port_value == 10000
            await client.assert_silent()

            status = node(service)
            assert status["applied_version"] == v1
            assert (status["error"], status["error_type"], status["error_version"]) == (
                "bad port",
                "lds",
                v2,
            )
            lds = status["types"]["lds"]
            assert (lds["nack_version"], lds["nack_error"]) == (v2, "bad port")
            assert lds["nack_at"] is not None
            assert sample(service, "meshward_xds_nacks_total", type="lds") == 1
            assert sample(service, "meshward_xds_rollbacks_total") == 1

            # The late ACK of the rejected push's RDS is stale now: ignored.
            await client.ack(pushed[3], names=["edge"])
            await client.assert_silent()
            assert sample(service, "meshward_xds_stale_requests_total", type="rds") == 1
            await ack_all(client, rollback)
            await client.assert_silent()
            status = node(service)
            assert {
                t: (s["sent"], s["acked"]) for t, s in status["types"].items()
            } == dict.fromkeys(("cds", "eds", "lds", "rds"), (v1, v1))
            assert status["applied_version"] == v1
            assert status["error"] == "bad port"  # shown until a newer version is applied

            # The rejected version is never sent again, even when set again.
            await service.set_policy(policy())
            await service.set_policy(moved)
            assert service.version == v2
            await client.assert_silent()

            # A newer version is pushed normally: only what differs from v1.
            await service.set_policy(policy(catalog=True))
            v3 = service.version
            fixed = [await client.recv() for _ in range(2)]
            assert [r.type_url for r in fixed] == [rs.CLUSTER, rs.ROUTE]
            assert {r.version_info for r in fixed} == {v3}
            await client.assert_silent()
            assert node(service)["applied_version"] == v1
            await ack_all(client, fixed)
            await client.assert_silent()
            status = node(service)
            assert status["applied_version"] == v3
            assert status["error"] is None
            assert status["types"]["lds"]["acked"] == v3  # unchanged counts as ACKed
            assert status["converged_version"] == v3
            assert status["convergence_seconds"] > 0
            # Only v3 converged while connected (v1 was the initial sync, v2 rejected).
            assert sample(service, "meshward_xds_convergence_seconds_count") == 1

    run(test)


def test_first_config_rejected_is_recorded_and_waits_for_a_new_version() -> None:
    async def test(service: XdsService) -> None:
        v1 = service.version
        async with AdsClient(service.port) as client:
            await client.send(rs.CLUSTER)
            cds = await client.recv()
            await client.send(rs.CLUSTER, nonce=cds.nonce, error="no clusters for you")
            await client.assert_silent()  # nothing ACKed to roll back to: just wait
            status = node(service)
            assert status["applied_version"] is None
            assert (status["error"], status["error_version"]) == ("no clusters for you", v1)
            assert sample(service, "meshward_xds_rollbacks_total") == 0

            await service.set_policy(policy(catalog=True))
            again = await client.recv()
            assert again.version_info == service.version != v1
            await client.ack(again)
            await client.assert_silent()
            status = node(service)
            assert status["applied_version"] == service.version
            assert status["error"] is None
            assert status["types"]["cds"]["nack_version"] == v1  # the last NACK, kept

    run(test)


def test_only_the_types_that_changed_are_pushed() -> None:
    async def test(service: XdsService) -> None:
        v1 = service.version
        async with (
            AdsClient(service.port, node_id="a") as first,
            AdsClient(service.port, node_id="b") as second,
        ):
            await subscribe_all(first)
            await subscribe_all(second)
            rounds = sample(service, "meshward_xds_push_duration_seconds_count")

            # Only a route's match changes: RDS is pushed, nothing else.
            await service.set_policy(policy(prefix="/shop"))
            v2 = service.version
            [a] = [await first.recv()]
            [b] = [await second.recv()]
            await first.assert_silent()
            await second.assert_silent()
            assert (a.type_url, a.version_info) == (rs.ROUTE, v2)
            # A fan-out round frames the body once: both streams got the very same bytes,
            # nonce included (a nonce need only be unique per response on one stream).
            assert a.nonce == b.nonce and a.nonce.startswith("p")
            assert a.SerializeToString() == b.SerializeToString()
            await eventually(
                lambda: sample(service, "meshward_xds_push_duration_seconds_count") == rounds + 1,
                "one push round timed",
            )

            status = node(service)
            # Unchanged types count as sent and ACKed at v2; RDS waits for its ACK.
            assert {t: s["acked"] for t, s in status["types"].items()} == {
                "cds": v2,
                "eds": v2,
                "lds": v2,
                "rds": v1,
            }
            assert status["applied_version"] == v1
            assert status["convergence_seconds"] is None
            await first.ack(a, names=["edge"])
            await first.assert_silent()
            status = node(service)
            assert status["applied_version"] == v2
            assert status["converged_version"] == v2
            assert status["convergence_seconds"] > 0
            assert status["last_ack_at"] is not None
            assert node(service, 1)["applied_version"] == v1  # b has not ACKed yet
            assert sample(service, "meshward_xds_convergence_seconds_count") == 1

            # A policy that changes nothing this group sees but the version (the
            # other gateway moves): the route config carries the policy version,
            # so RDS is the only type pushed again.
            await service.set_policy(policy(prefix="/shop", gateways=("edge", "side")))
            assert (await first.recv()).type_url == rs.ROUTE
            await first.assert_silent()

    run(test)


def test_status_shows_every_node_and_connected_proxies_per_group() -> None:
    async def test(service: XdsService) -> None:
        clients = [
            AdsClient(service.port, node_id="e1", cluster="edge"),
            AdsClient(service.port, node_id="e2", cluster="edge"),
            AdsClient(service.port, node_id="s1", cluster="side"),
        ]
        for client in clients:
            await client.__aenter__()
            await client.send(rs.LISTENER)
            await client.ack(await client.recv())
        try:
            assert sample(service, "meshward_xds_connected_proxies", group="edge") == 2
            assert sample(service, "meshward_xds_connected_proxies", group="side") == 1
            status = json.loads(json.dumps(service.status()))  # JSON-able
            by_id = {n["id"]: n for n in status["nodes"]}
            assert set(by_id) == {"e1", "e2", "s1"}
            e1 = by_id["e1"]
            assert e1["group"] == "edge"
            assert e1["protocol"] == "sotw"
            assert e1["peer"]
            assert e1["connected_at"] > 0
            assert e1["applied_version"] == service.version
            assert e1["types"]["lds"] == {
                "sent": service.version,
                "acked": service.version,
                "nack_version": None,
                "nack_error": None,
                "nack_at": None,
                "nonce": e1["types"]["lds"]["nonce"],
                "names": [],
                "responses": 1,
            }
        finally:
            await clients[0].close()
        await eventually(
            lambda: sample(service, "meshward_xds_connected_proxies", group="edge") == 1,
            "edge proxy count drops",
        )
        for client in clients[1:]:
            await client.close()
        await eventually(lambda: service.status()["nodes"] == [], "all streams closed")
        assert sample(service, "meshward_xds_connected_proxies", group="side") == 0
        assert service.cache.watcher_count("edge") == service.cache.watcher_count("side") == 0

    run(test, policy(gateways=("edge", "side")))


def test_push_round_frames_each_body_once_with_distinct_nonces() -> None:
    from xds_server.stream import PushRound, with_nonce

    round_ = PushRound(3, None)
    body_a, body_b = b"\x0a\x01a", b"\x0a\x01b"
    nonce_a, framed_a = round_.frame(body_a)
    assert round_.frame(body_a) == (nonce_a, framed_a)
    assert round_.frame(body_a)[1] is framed_a  # shared, not copied per stream
    nonce_b, framed_b = round_.frame(body_b)
    assert nonce_b != nonce_a
    assert framed_a == with_nonce(body_a, nonce_a)
    parsed = discovery_pb2.DiscoveryResponse.FromString(framed_b)
    assert parsed.nonce == nonce_b
    # Another round never reuses a nonce, so a stream never sees one twice.
    assert PushRound(1, None).frame(body_a)[0] != nonce_a
