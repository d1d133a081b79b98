"""Delta xDS with a real Envoy 1.40 (``api_type: DELTA_GRPC``), beside SotW Envoys.

Authz is absent in these tests, so a request that matches a route is a fail-closed 403
and one that matches none is a 404: which of the two tells which configuration Envoy is
serving, without an upstream.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from meshward.policy.model import Endpoint, Gateway, Policy, Route, RouteMatch, Service
from tests.envoy_harness import (
    EnvoyProcess,
    active_clusters,
    free_port,
    http_request,
    route_configs,
    start_envoy,
)
from xds_server import resources as rs
from xds_server.service import XdsService

pytestmark = pytest.mark.integration


def make_policy(ports: dict[str, int], *, reports: bool = False, catalog: bool = True) -> Policy:
    """One gateway per entry of ``ports`` (name → listener port), all with the same routes."""
    routes = [Route("orders-api", RouteMatch(prefix="/orders"), "orders")]
    services = [Service("orders", (Endpoint("127.0.0.1", 9),))]
    if catalog:
        routes.append(Route("catalog-api", RouteMatch(prefix="/catalog"), "catalog"))
        services.append(Service("catalog", (Endpoint("127.0.0.1", 9),)))
    if reports:
        # A new EDS cluster: it must warm (get its endpoints) before the route is used.
        routes.append(Route("reports-api", RouteMatch(path="/reports"), "reports"))
        services.append(Service("reports", (Endpoint("127.0.0.1", 9),)))
    return Policy.build(
        services=tuple(services),
        gateways=tuple(Gateway(name, port, tuple(routes)) for name, port in ports.items()),
    )


async def wait_nodes(
    service: XdsService, count: int, check: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, dict[str, Any]]:
    """Wait until ``count`` nodes are connected and ``check`` holds for each; by id."""
    last: Any = None
    for _ in range(300):
        nodes = service.status()["nodes"]
        last = nodes
        if len(nodes) == count and all(check(n) for n in nodes):
            return {n["id"]: n for n in nodes}
        await asyncio.sleep(0.05)
    raise AssertionError(f"nodes never {what}: {last}")


async def get(port: int, path: str) -> int:
    return (await asyncio.to_thread(http_request, port, path))[0]


async def dump(envoy: EnvoyProcess) -> dict[str, Any]:
    return await asyncio.to_thread(envoy.config_dump)


def rds_version(service: XdsService, group: str) -> str:
    """What a Delta Envoy's config_dump shows as the route config's version."""
    snapshot = service.cache.get_snapshot(group)
    assert snapshot is not None
    return snapshot.resource_versions(rs.ROUTE)[group]


@asynccontextmanager
async def envoys(
    tmp_path: Path, xds_port: int, *nodes: tuple[str, str, str]
) -> AsyncIterator[list[EnvoyProcess]]:
    """Start one Envoy per (node id, group, api type), LIVE; always stopped."""
    started: list[EnvoyProcess] = []
    try:
        for node_id, group, api_type in nodes:
            started.append(start_envoy(tmp_path, node_id, group, xds_port, api_type=api_type))
        for envoy in started:
            await asyncio.to_thread(envoy.wait_live, 20.0)
        yield started
    except BaseException:
        for envoy in started:
            print(envoy.log_text(), file=sys.stderr)
        raise
    finally:
        for envoy in started:
            envoy.stop()


def test_delta_envoy_gets_config_and_follows_policy_changes(tmp_path: Path) -> None:
    async def main() -> None:
        port = free_port()
        service = XdsService(make_policy({"edge": port}), [("127.0.0.1", free_port())])
        xds_port = await service.start()
        try:
            async with envoys(tmp_path, xds_port, ("edge-1", "edge", "DELTA_GRPC")) as [envoy]:
                v1 = service.version
                nodes = await wait_nodes(
                    service, 1, lambda n: n["applied_version"] == v1, "applied v1"
                )
                node = nodes["edge-1"]
                assert node["protocol"] == "delta"
                assert set(node["types"]) == {"cds", "eds", "lds", "rds"}
                assert node["error"] is None
                # The listener serves; authz is absent: fail closed.
                assert await get(port, "/orders/1") == 403
                assert await get(port, "/reports") == 404

                # A new route (and cluster): ACKed, visible in config_dump, served.
                await service.set_policy(make_policy({"edge": port}, reports=True))
                v2 = service.version
                nodes = await wait_nodes(
                    service, 1, lambda n: n["applied_version"] == v2, "applied v2"
                )
                assert nodes["edge-1"]["converged_version"] == v2
                config = await dump(envoy)
                assert route_configs(config)["edge"] == (
                    rds_version(service, "edge"),
                    {"orders-api", "catalog-api", "reports-api"},
                )
                assert active_clusters(config) == {"orders", "catalog", "reports", "meshward_authz"}
                assert await get(port, "/reports") == 403

                # A service and its route removed: Envoy drops the cluster (removed
                # over Delta) and the route.
                await service.set_policy(make_policy({"edge": port}, reports=True, catalog=False))
                v3 = service.version
                await wait_nodes(service, 1, lambda n: n["applied_version"] == v3, "applied v3")
                config = await dump(envoy)
                assert active_clusters(config) == {"orders", "reports", "meshward_authz"}
                assert route_configs(config)["edge"][1] == {"orders-api", "reports-api"}
                assert await get(port, "/catalog/x") == 404
                assert "rejected" not in envoy.log_text(100_000)
        finally:
            await service.stop(grace=0.5)

    asyncio.run(asyncio.wait_for(main(), 90))


def test_sotw_and_delta_envoys_converge_to_the_same_version(tmp_path: Path) -> None:
    async def main() -> None:
        ports = {"edge": free_port(), "side": free_port()}
        service = XdsService(make_policy(ports), [("127.0.0.1", free_port())])
        xds_port = await service.start()
        try:
            async with envoys(
                tmp_path,
                xds_port,
                ("edge-sotw", "edge", "GRPC"),
                ("side-delta", "side", "DELTA_GRPC"),
            ) as [sotw, delta]:
                v1 = service.version
                await wait_nodes(service, 2, lambda n: n["applied_version"] == v1, "applied v1")

                await service.set_policy(make_policy(ports, reports=True))
                v2 = service.version
                nodes = await wait_nodes(
                    service, 2, lambda n: n["applied_version"] == v2, "applied v2"
                )
                assert {n["protocol"] for n in nodes.values()} == {"sotw", "delta"}
                for node in nodes.values():
                    assert node["converged_version"] == v2
                    assert node["convergence_seconds"] > 0
                    assert {s["acked"] for s in node["types"].values()} == {v2}
                sample = service.registry.get_sample_value
                assert sample("meshward_xds_convergence_seconds_count") == 2
                assert sample("meshward_xds_connected_proxies", {"group": "edge"}) == 1
                assert sample("meshward_xds_connected_proxies", {"group": "side"}) == 1
                assert (sample("meshward_xds_push_duration_seconds_count") or 0) >= 2

                # Both serve the new route.
                assert route_configs(await dump(sotw))["edge"][0] == v2
                assert route_configs(await dump(delta))["side"][0] == rds_version(service, "side")
                assert await get(ports["edge"], "/reports") == 403
                assert await get(ports["side"], "/reports") == 403
        finally:
            await service.stop(grace=0.5)

    asyncio.run(asyncio.wait_for(main(), 90))


def test_delta_envoy_gets_full_state_after_xds_server_restart(tmp_path: Path) -> None:
    async def main() -> None:
        port = free_port()
        authz = [("127.0.0.1", free_port())]
        services = [XdsService(make_policy({"edge": port}), authz)]
        xds_port = await services[0].start()

        async def restart(policy: Policy) -> XdsService:
            await services[-1].stop(grace=0.2)
            service = XdsService(policy, authz, listen=f"127.0.0.1:{xds_port}")
            await service.start()
            services.append(service)
            return service

        try:
            async with envoys(tmp_path, xds_port, ("edge-1", "edge", "DELTA_GRPC")) as [envoy]:
                v1 = services[0].version
                await wait_nodes(services[0], 1, lambda n: n["applied_version"] == v1, "applied")

                # Same policy: Envoy returns with its initial_resource_versions, is
                # answered (only what differs) and applies the version.
                same = await restart(make_policy({"edge": port}))
                await wait_nodes(same, 1, lambda n: n["applied_version"] == v1, "re-applied")
                assert await get(port, "/orders/1") == 403

                # Changed while the server was away: the new state reaches Envoy.
                changed = await restart(make_policy({"edge": port}, reports=True, catalog=False))
                v2 = changed.version
                await wait_nodes(changed, 1, lambda n: n["applied_version"] == v2, "applied v2")
                config = await dump(envoy)
                assert active_clusters(config) == {"orders", "reports", "meshward_authz"}
                assert route_configs(config)["edge"][1] == {"orders-api", "reports-api"}
                assert await get(port, "/reports") == 403
                assert await get(port, "/catalog/x") == 404
        finally:
            for service in services:
                await service.stop(grace=0.2)

    asyncio.run(asyncio.wait_for(main(), 90))
