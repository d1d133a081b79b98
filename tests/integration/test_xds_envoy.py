"""Policy YAML → xDS → a real Envoy 1.40: the configuration arrives, is ACKed, serves.

Every test runs a real XdsService (grpc.aio), a real Envoy process bootstrapped from
``envoy/bootstrap.yaml``, a plain HTTP upstream and, where needed, a stand-in ext_authz
gRPC server that allows everything and records what Envoy sent it. Blocking work
(HTTP requests, waiting for Envoy) runs in threads so the event loop keeps serving xDS
and authz meanwhile.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from meshward import route_context
from meshward.policy.model import Endpoint, Gateway, Policy, Route, RouteMatch, Service
from tests.envoy_harness import AllowAllAuthz, EnvoyProcess, authz_server, free_port, http_request
from xds_server.bootstrap import render_bootstrap
from xds_server.service import XdsService
from xds_server.translator import EXT_AUTHZ_FILTER

pytestmark = pytest.mark.integration

TYPES = ("cds", "eds", "lds", "rds")


class Upstream:
    """A plain HTTP/1.1 upstream on 127.0.0.1 that records the paths it served."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.paths.append(self.path)
                body = f"upstream {self.path}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Upstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def make_policy(
    upstream_port: int, listener_port: int, *, extra: bool = False, orders: str = "orders"
) -> Policy:
    routes = [
        Route("orders-api", RouteMatch(prefix="/orders", methods=("GET",)), orders),
        # A DNS-named endpoint: STRICT_DNS cluster with an inline assignment.
        Route("catalog-api", RouteMatch(prefix="/catalog"), "catalog"),
    ]
    services = [
        Service(orders, (Endpoint("127.0.0.1", upstream_port),)),
        Service("catalog", (Endpoint("localhost", upstream_port),)),
    ]
    if extra:
        # A new EDS cluster: it must warm (get its endpoints) before the route works.
        routes.append(Route("reports-api", RouteMatch(path="/reports"), "reports"))
        services.append(Service("reports", (Endpoint("127.0.0.1", upstream_port),)))
    return Policy.build(
        services=tuple(services),
        gateways=(Gateway("edge", listener_port, tuple(routes)),),
    )


@dataclass
class Mesh:
    service: XdsService
    envoy: EnvoyProcess
    upstream: Upstream
    listener_port: int
    authz_port: int
    tmp: Path

    async def get(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        return await asyncio.to_thread(http_request, self.listener_port, path, method=method)

    async def config_dump(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.envoy.config_dump)

    async def wait_acked(self, version: str, types: tuple[str, ...] = TYPES) -> dict[str, Any]:
        """Wait until the (single) connected Envoy has ACKed ``version`` for ``types``."""
        last: Any = None
        for _ in range(200):
            nodes = self.service.status()["nodes"]
            last = nodes
            if nodes and all(nodes[0]["types"].get(t, {}).get("acked") == version for t in types):
                return dict(nodes[0])
            await asyncio.sleep(0.05)
        raise AssertionError(f"version {version} not ACKed for {types}: {last}")


def run_mesh(test: Callable[[Mesh], Awaitable[None]], tmp_path: Path) -> None:
    """Start xDS + Envoy + upstream around ``test``; always stop all of them."""

    async def main() -> None:
        with Upstream() as upstream:
            listener_port, authz_port = free_port(), free_port()
            service = XdsService(
                make_policy(upstream.port, listener_port), [("127.0.0.1", authz_port)]
            )
            xds_port = await service.start()
            bootstrap = tmp_path / "bootstrap.yaml"
            bootstrap.write_text(render_bootstrap("edge-1", "edge", 0, "127.0.0.1", xds_port))
            envoy = EnvoyProcess(bootstrap, 0)
            try:
                envoy.start()
                await asyncio.to_thread(envoy.wait_live, 20.0)
                mesh = Mesh(service, envoy, upstream, listener_port, authz_port, tmp_path)
                await mesh.wait_acked(service.version)
                await asyncio.wait_for(test(mesh), 60)
            except BaseException:
                print(envoy.log_text(), file=sys.stderr)
                raise
            finally:
                envoy.stop()
                await service.stop(grace=0.5)

    asyncio.run(main())


def _configs(dump: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["@type"].rsplit(".", 1)[-1]: c for c in dump["configs"]}


def _routes(dump: dict[str, Any]) -> tuple[str, dict[str, dict[str, Any]]]:
    """(version_info, route name → route) of the one dynamic route configuration."""
    [config] = _configs(dump)["RoutesConfigDump"]["dynamic_route_configs"]
    routes = {
        route["name"]: route
        for vhost in config["route_config"]["virtual_hosts"]
        for route in vhost.get("routes", [])
    }
    return config["version_info"], routes


def test_envoy_gets_acks_and_fails_closed_without_authz(tmp_path: Path) -> None:
    async def test(mesh: Mesh) -> None:
        version = mesh.service.version
        node = mesh.service.status()["nodes"][0]
        assert node["id"] == "edge-1"
        assert node["group"] == "edge"
        assert all(node["types"][t]["nack_error"] is None for t in TYPES)

        # The listener serves, but authz is down: ext_authz fails closed with 403.
        status, _, _ = await mesh.get("/orders/1")
        assert status == 403
        status, _, _ = await mesh.get("/catalog")
        assert status == 403
        # A request that matches no route is answered 404 by the router, and
        # ext_authz does not even try authz (else this would be a 403 too).
        status, _headers, _ = await mesh.get("/nowhere")
        assert status == 404
        status, _, _ = await mesh.get("/orders/1", method="POST")  # method not routed
        assert status == 404
        assert mesh.upstream.paths == []

        dump = await mesh.config_dump()
        configs = _configs(dump)
        [listener] = configs["ListenersConfigDump"]["dynamic_listeners"]
        assert listener["name"] == "edge"
        assert listener["active_state"]["version_info"] == version
        clusters = {
            c["cluster"]["name"]: c
            for c in configs["ClustersConfigDump"]["dynamic_active_clusters"]
        }
        assert set(clusters) == {"orders", "catalog", "meshward_authz"}
        assert {c["version_info"] for c in clusters.values()} == {version}
        assert clusters["catalog"]["cluster"]["type"] == "STRICT_DNS"
        eds = {
            e["endpoint_config"]["cluster_name"]
            for e in configs["EndpointsConfigDump"]["dynamic_endpoint_configs"]
        }
        assert {"orders", "meshward_authz"} <= eds
        route_version, routes = _routes(dump)
        assert route_version == version
        context = routes["orders-api"]["typed_per_filter_config"][EXT_AUTHZ_FILTER][
            "check_settings"
        ]["context_extensions"]
        # Envoy marks context_extensions sensitive: config_dump shows the keys with
        # redacted values. The values themselves are checked where authz receives them.
        assert context == dict.fromkeys(
            (
                route_context.ROUTE,
                route_context.SERVICE,
                route_context.GATEWAY,
                route_context.POLICY_VERSION,
            ),
            "[redacted]",
        )
        assert routes["orders-api"]["route"]["cluster"] == "orders"
        assert "rejected" not in mesh.envoy.log_text(100_000)

    run_mesh(test, tmp_path)


def test_authz_sees_route_context_and_policy_updates_are_applied(tmp_path: Path) -> None:
    async def test(mesh: Mesh) -> None:
        async with authz_server(AllowAllAuthz(), mesh.authz_port) as authz:
            # Envoy reconnects to the authz cluster on the next request.
            status = 0
            for _ in range(50):
                status, _, body = await mesh.get("/orders/7")
                if status == 200:
                    break
                await asyncio.sleep(0.1)
            assert status == 200
            assert body == b"upstream /orders/7"
            assert authz.contexts[-1] == {
                route_context.ROUTE: "orders-api",
                route_context.SERVICE: "orders",
                route_context.GATEWAY: "edge",
                route_context.POLICY_VERSION: mesh.service.policy.version,
            }
            status, _, body = await mesh.get("/catalog/x")  # through the STRICT_DNS cluster
            assert (status, body) == (200, b"upstream /catalog/x")
            assert authz.contexts[-1][route_context.ROUTE] == "catalog-api"

            # Paths are normalized before routing: authz and upstream see the same path.
            status, _, body = await mesh.get("/orders/..//catalog/%2e%2e/catalog/y")
            assert (status, body) == (200, b"upstream /catalog/y")
            assert authz.contexts[-1][route_context.ROUTE] == "catalog-api"

            # Unmatched: 404 from the router, no Check at all, upstream untouched.
            checks, served = len(authz.contexts), len(mesh.upstream.paths)
            assert (await mesh.get("/reports"))[0] == 404
            assert (await mesh.get("/orders/7", method="POST"))[0] == 404
            assert len(authz.contexts) == checks
            assert len(mesh.upstream.paths) == served

            # A new policy version with a new route: pushed, ACKed, served.
            old = mesh.service.version
            new_policy = make_policy(mesh.upstream.port, mesh.listener_port, extra=True)
            await mesh.service.set_policy(new_policy)
            assert mesh.service.version != old
            await mesh.wait_acked(mesh.service.version)
            route_version, routes = _routes(await mesh.config_dump())
            assert route_version == mesh.service.version
            assert "reports-api" in routes
            status, _, body = await mesh.get("/reports")
            assert (status, body) == (200, b"upstream /reports")
            assert authz.contexts[-1][route_context.ROUTE] == "reports-api"
            assert authz.contexts[-1][route_context.POLICY_VERSION] == new_policy.version

            # The service renamed: the old cluster goes (removed after the new routes).
            renamed = make_policy(
                mesh.upstream.port, mesh.listener_port, extra=True, orders="orders-v2"
            )
            await mesh.service.set_policy(renamed)
            await mesh.wait_acked(mesh.service.version)
            clusters = _configs(await mesh.config_dump())["ClustersConfigDump"]
            names = {c["cluster"]["name"] for c in clusters["dynamic_active_clusters"]}
            assert names == {"orders-v2", "catalog", "reports", "meshward_authz"}
            status, _, body = await mesh.get("/orders/8")
            assert (status, body) == (200, b"upstream /orders/8")
            assert authz.contexts[-1][route_context.SERVICE] == "orders-v2"

    run_mesh(test, tmp_path)


def test_envoy_nack_is_recorded_and_last_good_config_keeps_serving(tmp_path: Path) -> None:
    async def test(mesh: Mesh) -> None:
        good = mesh.service.version
        base = make_policy(mesh.upstream.port, mesh.listener_port, extra=True)
        [gateway] = base.gateways
        bad_policy = Policy.build(
            services=base.services,
            gateways=(Gateway(gateway.name, gateway.port, gateway.routes, address="not-an-ip"),),
        )
        await mesh.service.set_policy(bad_policy)
        bad = mesh.service.version
        lds: dict[str, Any] = {}
        for _ in range(200):
            lds = mesh.service.status()["nodes"][0]["types"]["lds"]
            if lds["nack_error"]:
                break
            await asyncio.sleep(0.05)
        assert lds["nack_error"], lds
        assert "not-an-ip" in lds["nack_error"]
        assert lds["nack_version"] == bad
        assert lds["acked"] == good
        # Rolled back: the last good listener is sent again, the rejected one never is.
        for _ in range(200):
            lds = mesh.service.status()["nodes"][0]["types"]["lds"]
            if lds["sent"] == lds["acked"] == good:
                break
            await asyncio.sleep(0.05)
        assert lds["sent"] == lds["acked"] == good, lds
        assert (
            mesh.service.registry.get_sample_value("meshward_xds_nacks_total", {"type": "lds"}) == 1
        )
        # The last good listener still serves (authz down: fail closed).
        assert (await mesh.get("/orders/1"))[0] == 403
        dump = await mesh.config_dump()
        # Envoy keeps the active listener; the rollback (the good listener again) is
        # accepted, so Envoy's own error_state is gone and the error lives in status.
        listeners = _configs(dump)["ListenersConfigDump"]["dynamic_listeners"]
        [listener] = [entry for entry in listeners if entry.get("name") == "edge"]
        assert listener["active_state"]["version_info"] == good
        node = mesh.service.status()["nodes"][0]
        assert node["applied_version"] == good
        assert node["error_version"] == bad
        assert "malformed IP address: not-an-ip" in node["error"]

        # The next version fixes it: every type ACKed at the new version.
        await mesh.service.set_policy(base)
        node = await mesh.wait_acked(mesh.service.version)
        assert (
            mesh.service.registry.get_sample_value("meshward_xds_nacks_total", {"type": "lds"}) == 1
        )
        assert node["error"] is None

    run_mesh(test, tmp_path)


def test_envoy_reconnects_after_xds_server_restart(tmp_path: Path) -> None:
    async def restart(mesh: Mesh, policy: Policy) -> XdsService:
        port = mesh.service.port
        await mesh.service.stop(grace=0.2)
        service = XdsService(policy, [("127.0.0.1", mesh.authz_port)], listen=f"127.0.0.1:{port}")
        await service.start()
        mesh.service = service
        return service

    async def test(mesh: Mesh) -> None:
        services = [mesh.service]
        try:
            # Same policy: Envoy returns with the current version_info and no nonce,
            # and still gets (and ACKs) the full state from the new server.
            same = await restart(mesh, mesh.service.policy)
            services.append(same)
            await mesh.wait_acked(same.version)
            # Changed while the server was away: the new version reaches Envoy.
            changed = make_policy(mesh.upstream.port, mesh.listener_port, extra=True)
            services.append(await restart(mesh, changed))
            await mesh.wait_acked(mesh.service.version)
            assert mesh.service.version != same.version
            _, routes = _routes(await mesh.config_dump())
            assert "reports-api" in routes
            assert (await mesh.get("/reports"))[0] == 403  # routed, authz down
        finally:
            for service in services:
                await service.stop(grace=0.2)

    run_mesh(test, tmp_path)
