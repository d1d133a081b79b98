"""A real Envoy 1.40 NACKs a listener it cannot bind; meshward rolls it back.

The test holds a socket on a port, then sets a policy moving the gateway's listener to
that port. Envoy cannot bind it and NACKs LDS. meshward must record Envoy's error in
status, roll the node back to its last fully ACKed snapshot (the old listener *and* the
route config it had accepted at the bad version), keep it serving, never resend the bad
version, and clear the error once a following good policy is applied. Run for SotW and
Delta Envoys alike. Authz is absent, so a routed request is a fail-closed 403 (an
unrouted one a 404): that tells which configuration Envoy is serving.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshward.policy.model import Endpoint, Gateway, Policy, Route, RouteMatch, Service
from tests.envoy_harness import (
    EnvoyProcess,
    active_listeners,
    free_port,
    http_request,
    route_configs,
    start_envoy,
)
from xds_server import resources as rs
from xds_server.service import XdsService

pytestmark = pytest.mark.integration


def make_policy(listener_port: int, *, reports: bool = False) -> Policy:
    routes = [Route("orders-api", RouteMatch(prefix="/orders"), "orders")]
    if reports:
        routes.append(Route("reports-api", RouteMatch(path="/reports"), "orders"))
    return Policy.build(
        services=(Service("orders", (Endpoint("127.0.0.1", 9),)),),
        gateways=(Gateway("edge", listener_port, tuple(routes)),),
    )


async def wait_node(
    service: XdsService, check: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    last: Any = None
    for _ in range(300):
        nodes = service.status()["nodes"]
        last = nodes
        if nodes and check(nodes[0]):
            return dict(nodes[0])
        await asyncio.sleep(0.05)
    raise AssertionError(f"node never {what}: {last}")


async def get(port: int, path: str) -> int:
    return (await asyncio.to_thread(http_request, port, path))[0]


def dumped_versions(service: XdsService, api_type: str) -> tuple[str, str]:
    """The ``version_info`` Envoy's /config_dump shows for the current listener and
    route config: the snapshot version (SotW) or each resource's version (Delta)."""
    if api_type == "GRPC":
        return service.version, service.version
    snapshot = service.cache.get_snapshot("edge")
    assert snapshot is not None
    return (
        snapshot.resource_versions(rs.LISTENER)["edge"],
        snapshot.resource_versions(rs.ROUTE)["edge"],
    )


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
def test_unbindable_listener_is_nacked_rolled_back_and_fixed_by_the_next_policy(
    tmp_path: Path, api_type: str
) -> None:
    async def main() -> None:
        port = free_port()
        service = XdsService(make_policy(port), [("127.0.0.1", free_port())])
        xds_port = await service.start()
        envoy: EnvoyProcess | None = None
        try:
            envoy = start_envoy(tmp_path, "edge-1", "edge", xds_port, api_type=api_type)
            await asyncio.to_thread(envoy.wait_live, 20.0)
            good = service.version
            good_listener, good_routes = dumped_versions(service, api_type)
            await wait_node(service, lambda n: n["applied_version"] == good, "applied")
            assert await get(port, "/orders/1") == 403

            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
                busy.bind(("127.0.0.1", 0))
                busy.listen()
                busy_port = busy.getsockname()[1]
                await service.set_policy(make_policy(busy_port, reports=True))
                bad = service.version
                node = await wait_node(
                    service,
                    lambda n: (
                        n["error"] is not None
                        and all(s["sent"] == s["acked"] == good for s in n["types"].values())
                    ),
                    "rolled back",
                )
                assert node["protocol"] == ("delta" if api_type == "DELTA_GRPC" else "sotw")
                assert node["applied_version"] == good
                assert (node["error_type"], node["error_version"]) == ("lds", bad)
                assert f"127.0.0.1:{busy_port}" in node["error"]  # Envoy's own text
                assert node["types"]["lds"]["nack_version"] == bad
                assert node["types"]["lds"]["nack_error"] == node["error"]
                sample = service.registry.get_sample_value
                assert sample("meshward_xds_nacks_total", {"type": "lds"}) == 1
                assert sample("meshward_xds_rollbacks_total") == 1

                # Envoy serves the old listener, and the route config it had accepted
                # at the bad version is back to the good one (no /reports route).
                dump = await asyncio.to_thread(envoy.config_dump)
                listener = active_listeners(dump)["edge"]
                assert listener["version_info"] == good_listener
                address = listener["listener"]["address"]["socket_address"]
                assert address["port_value"] == port
                assert route_configs(dump)["edge"] == (good_routes, {"orders-api"})
                assert await get(port, "/orders/1") == 403
                assert await get(port, "/reports") == 404

                # The bad version is not resent: still one NACK, nothing new.
                await service.set_policy(make_policy(busy_port, reports=True))
                await asyncio.sleep(0.5)
                assert sample("meshward_xds_nacks_total", {"type": "lds"}) == 1
                assert service.status()["nodes"][0]["types"]["lds"]["sent"] == good

            # The next good policy (a new route on the old port) is applied; the error
            # clears.
            await service.set_policy(make_policy(port, reports=True))
            fixed = service.version
            node = await wait_node(service, lambda n: n["applied_version"] == fixed, "fixed")
            assert node["error"] is None
            assert node["converged_version"] == fixed
            assert node["convergence_seconds"] > 0
            dump = await asyncio.to_thread(envoy.config_dump)
            fixed_routes = dumped_versions(service, api_type)[1]
            assert route_configs(dump)["edge"] == (fixed_routes, {"orders-api", "reports-api"})
            assert await get(port, "/reports") == 403
            assert sample("meshward_xds_nacks_total", {"type": "lds"}) == 1
        except BaseException:
            if envoy is not None:
                print(envoy.log_text(), file=sys.stderr)
            raise
        finally:
            if envoy is not None:
                envoy.stop()
            await service.stop(grace=0.5)

    asyncio.run(asyncio.wait_for(main(), 90))
