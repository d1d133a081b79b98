"""Tracing configured over xDS: a real Envoy 1.40 exports its spans to a real OTLP receiver.

Every test runs a real XdsService serving a policy with ``tracing`` (the collector is a
:class:`~meshward.otlp_receiver.OtlpReceiver` on a free loopback port), a real Envoy, a
recording HTTP upstream and a stand-in ext_authz gRPC server that allows everything and
records the gRPC metadata of each Check. The Envoy bootstrap's tracing runtime layer
is set to ``tracing.opentelemetry.min_flush_spans: 1``, ``flush_interval_ms: 100``, so every
span is exported at once instead of in batches of 5 or every 5 s; the receiver is still polled
with a timeout.

The end-to-end test (real ``meshward xds`` + ``meshward authz`` + a gateway Envoy and a
sidecar Envoy, :mod:`tests.process_mesh`) checks one trace from the edge to the service:
the sidecar continues the gateway's trace, and each authz decision span is the child of
the ext_authz CLIENT span of the Envoy that asked.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshward.otlp_receiver import OtlpReceiver, ReceivedSpan
from meshward.policy.model import Endpoint, Gateway, Policy, Route, RouteMatch, Service, Tracing
from tests import tokens
from tests.envoy_harness import (
    AllowAllAuthz,
    EnvoyProcess,
    active_clusters,
    active_listeners,
    authz_server,
    free_port,
    http_request,
)
from tests.mesh_harness import RecordingUpstream
from tests.mtls_harness import client_context, https_request
from tests.policy_files import VALID_POLICY, new_keys, write_policy
from tests.process_mesh import ProcessMesh, wait_until
from xds_server.bootstrap import DEFAULT_TEMPLATE, render_bootstrap
from xds_server.service import XdsService
from xds_server.translator import COLLECTOR_CLUSTER, PARENT_BASED_SAMPLER

pytestmark = pytest.mark.integration

#: What Envoy 1.40's OpenTelemetry tracer names its spans (SERVER, then two CLIENT spans).
INGRESS = "ingress"
AUTHZ_EGRESS = "async envoy.service.auth.v3.Authorization.Check egress"
SPAN_KIND_SERVER, SPAN_KIND_CLIENT = 2, 3
#: Export every finished span at once (Envoy's defaults: 5 spans or every 5 s).
DEFAULT_FLUSH = (
    "        tracing.opentelemetry.min_flush_spans: 256\n"
    "        tracing.opentelemetry.flush_interval_ms: 1000\n"
)
FAST_FLUSH = (
    "        tracing.opentelemetry.min_flush_spans: 1\n"
    "        tracing.opentelemetry.flush_interval_ms: 100\n"
)


def fast_flush_template(directory: Path) -> Path:
    """``envoy/bootstrap.yaml`` with its tracing runtime layer set to flush spans at once."""
    path = directory / "bootstrap-fast-flush.yaml"
    template = DEFAULT_TEMPLATE.read_text(encoding="utf-8")
    assert DEFAULT_FLUSH in template, "envoy/bootstrap.yaml lost its tracing runtime layer"
    path.write_text(template.replace(DEFAULT_FLUSH, FAST_FLUSH))
    return path


def router_egress(cluster: str) -> str:
    """The name of the span of the upstream request (``spawn_upstream_span``)."""
    return f"router {cluster} egress"


def parse_traceparent(value: str) -> tuple[str, str, str]:
    """``00-<trace id>-<span id>-<flags>`` → (trace id, span id, flags)."""
    version, trace_id, span_id, flags = value.split("-")
    assert version == "00", value
    return trace_id, span_id, flags


def traced_policy(upstream_port: int, listener_port: int, tracing: Tracing | None) -> Policy:
    return Policy.build(
        services=(Service("orders", (Endpoint("127.0.0.1", upstream_port),)),),
        gateways=(
            Gateway(
                "edge", listener_port, (Route("orders-api", RouteMatch(prefix="/"), "orders"),)
            ),
        ),
        tracing=tracing,
    )


@dataclass
class Stack:
    service: XdsService
    envoy: EnvoyProcess
    upstream: RecordingUpstream
    authz: AllowAllAuthz
    receiver: OtlpReceiver
    listener_port: int

    async def get(
        self, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        return await asyncio.to_thread(
            http_request, self.listener_port, path, headers=headers or {}
        )

    async def spans_of(
        self, trace_id: str, count: int, timeout: float = 15.0
    ) -> list[ReceivedSpan]:
        """Wait (polling) until the receiver holds ``count`` spans of ``trace_id``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            spans = [s for s in self.receiver.spans() if s.trace_id == trace_id]
            if len(spans) >= count or asyncio.get_running_loop().time() > deadline:
                return spans
            await asyncio.sleep(0.05)

    async def wait_acked(self) -> None:
        version = self.service.version
        for _ in range(200):
            nodes = self.service.status()["nodes"]
            if nodes and all(
                nodes[0]["types"].get(t, {}).get("acked") == version
                for t in ("cds", "eds", "lds", "rds")
            ):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"version {version} not ACKed: {self.service.status()['nodes']}")


def run_stack(
    test: Callable[[Stack], Awaitable[None]],
    tmp_path: Path,
    *,
    sampling_percent: float | None = 100.0,
) -> None:
    """Start receiver, upstream, authz stand-in, xDS and Envoy around ``test``; stop all.
    ``sampling_percent`` None: the policy has no ``tracing``."""

    async def main() -> None:
        receiver = OtlpReceiver("127.0.0.1:0")
        collector_port = receiver.start()
        upstream = RecordingUpstream("orders", free_port()).start()
        listener_port, authz_port = free_port(), free_port()
        tracing = (
            None
            if sampling_percent is None
            else Tracing("127.0.0.1", collector_port, sampling_percent)
        )
        service = XdsService(
            traced_policy(upstream.port, listener_port, tracing), [("127.0.0.1", authz_port)]
        )
        try:
            async with authz_server(AllowAllAuthz(), authz_port) as authz:
                xds_port = await service.start()
                bootstrap = tmp_path / "bootstrap.yaml"
                bootstrap.write_text(
                    render_bootstrap(
                        "edge-1",
                        "edge",
                        0,
                        "127.0.0.1",
                        xds_port,
                        template=fast_flush_template(tmp_path),
                    )
                )
                envoy = EnvoyProcess(bootstrap, 0)
                try:
                    envoy.start()
                    await asyncio.to_thread(envoy.wait_live, 20.0)
                    stack = Stack(service, envoy, upstream, authz, receiver, listener_port)
                    await stack.wait_acked()
                    await asyncio.wait_for(test(stack), 60)
                except BaseException:
                    print(envoy.log_text(), file=sys.stderr)
                    raise
                finally:
                    envoy.stop()
                    await service.stop(grace=0.5)
        finally:
            upstream.stop()
            receiver.stop()

    asyncio.run(main())


def test_envoy_exports_one_trace_per_request_to_the_policy_collector(tmp_path: Path) -> None:
    async def test(stack: Stack) -> None:
        dump = await asyncio.to_thread(stack.envoy.config_dump)
        assert COLLECTOR_CLUSTER in active_clusters(dump)
        [chain] = active_listeners(dump)["edge"]["listener"]["filter_chains"]
        tracing = chain["filters"][0]["typed_config"]["tracing"]
        assert tracing["provider"]["name"] == "envoy.tracers.opentelemetry"
        otel = tracing["provider"]["typed_config"]
        assert otel["service_name"] == "edge"
        assert otel["grpc_service"]["envoy_grpc"]["cluster_name"] == COLLECTOR_CLUSTER
        assert otel["sampler"]["name"] == PARENT_BASED_SAMPLER

        status, _, _ = await stack.get("/orders/1")
        assert status == 200
        # The Check carried the traceparent of Envoy's ext_authz span in its gRPC metadata,
        # the upstream request that of Envoy's upstream span: both in one trace.
        [check] = stack.authz.metadata
        trace_id, authz_span_id, flags = parse_traceparent(check["traceparent"])
        assert flags == "01"
        upstream_trace, upstream_span_id, _ = parse_traceparent(
            stack.upstream.requests[-1].headers["traceparent"]
        )
        assert upstream_trace == trace_id

        spans = await stack.spans_of(trace_id, 3)
        by_name = {s.name: s for s in spans}
        assert set(by_name) == {INGRESS, AUTHZ_EGRESS, router_egress("orders")}, spans
        assert {s.service for s in spans} == {"edge"}  # service.name = the node group
        ingress = by_name[INGRESS]
        assert ingress.kind == SPAN_KIND_SERVER and ingress.parent_span_id == ""
        assert by_name[AUTHZ_EGRESS].span_id == authz_span_id
        assert by_name[AUTHZ_EGRESS].kind == SPAN_KIND_CLIENT
        assert by_name[AUTHZ_EGRESS].parent_span_id == ingress.span_id
        assert by_name[router_egress("orders")].span_id == upstream_span_id
        assert by_name[router_egress("orders")].parent_span_id == ingress.span_id
        # Envoy records the request id it generated on the ingress span.
        assert ingress.attributes.get("guid:x-request-id")

    run_stack(test, tmp_path)


def test_sampling_is_parent_based_around_the_policy_percent(tmp_path: Path) -> None:
    """At 0 %: a request without a ``traceparent`` is not traced (``x-client-trace-id``
    forces nothing), an unsampled parent stays unsampled, a sampled one is continued."""

    async def test(stack: Stack) -> None:
        client_span = "00f067aa0ba902b7"
        unsampled_trace, sampled_trace = (
            "0af7651916cd43dd8448eb211c80319c",
            "4bf92f3577b34da6a3ce929d0e0e4736",
        )
        for headers in (
            {},
            {"x-client-trace-id": "force-me"},
            {"traceparent": f"00-{unsampled_trace}-{client_span}-00"},
        ):
            status, _, _ = await stack.get("/orders/untraced", headers)
            assert status == 200
            assert parse_traceparent(stack.authz.metadata[-1]["traceparent"])[2] == "00", headers
        assert parse_traceparent(stack.authz.metadata[-1]["traceparent"])[0] == unsampled_trace

        traceparent = f"00-{sampled_trace}-{client_span}-01"
        status, _, _ = await stack.get("/orders/traced", {"traceparent": traceparent})
        assert status == 200
        assert parse_traceparent(stack.authz.metadata[-1]["traceparent"])[2] == "01"
        spans = await stack.spans_of(sampled_trace, 3)
        assert [s.parent_span_id for s in spans if s.name == INGRESS] == [client_span], spans
        # Nothing else was exported (spans leave one at a time, in order of ending).
        assert {s.trace_id for s in stack.receiver.spans()} == {sampled_trace}

    run_stack(test, tmp_path, sampling_percent=0.0)


def test_requests_are_served_while_the_collector_is_down(tmp_path: Path) -> None:
    async def test(stack: Stack) -> None:
        stack.receiver.stop()
        for i in range(3):
            status, _, _ = await stack.get(f"/orders/{i}")
            assert status == 200
        assert len(stack.upstream.requests) == 3
        assert stack.envoy.running

    run_stack(test, tmp_path)


def test_without_tracing_envoy_has_no_collector_and_exports_nothing(tmp_path: Path) -> None:
    async def test(stack: Stack) -> None:
        dump = await asyncio.to_thread(stack.envoy.config_dump)
        assert COLLECTOR_CLUSTER not in active_clusters(dump)
        [chain] = active_listeners(dump)["edge"]["listener"]["filter_chains"]
        assert "tracing" not in chain["filters"][0]["typed_config"]
        traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        status, _, _ = await stack.get("/orders/1", {"traceparent": traceparent})
        assert status == 200
        await asyncio.sleep(0.5)  # a flush would have happened (100 ms interval)
        assert stack.receiver.spans() == []

    run_stack(test, tmp_path, sampling_percent=None)


# ---- end to end: gateway → sidecar → service, with the real authz ---------------------------

E2E_POLICY = VALID_POLICY.replace(
    "services:\n  - name: orders\n    endpoints:\n      - address: 127.0.0.1\n"
    "        port: {orders_port}\n",
    "tracing:\n  collector: {{address: 127.0.0.1, port: {collector_port}}}\n"
    "  sampling_percent: 100\n"
    "services:\n  - name: orders\n    endpoints:\n      - address: 127.0.0.1\n"
    "        port: {orders_port}\n    sidecar:\n      port: {sidecar_port}\n",
).replace("    port: {gateway_port}\n", "    port: {gateway_port}\n    tls: {{}}\n")


@dataclass
class FastFlushMesh(ProcessMesh):
    """:class:`ProcessMesh` whose Envoys export every span at once."""

    def start_envoy(self, gateway: str) -> EnvoyProcess:
        path = self.work / f"envoy-{gateway}.yaml"
        path.write_text(
            render_bootstrap(
                node_id=f"{gateway}-test",
                node_cluster=gateway,
                admin_port=0,
                xds_host="127.0.0.1",
                xds_port=self.xds_port,
                template=fast_flush_template(self.work),
                api_type=self.api_type,
            )
        )
        envoy = EnvoyProcess(path, 0)
        envoy.start()
        envoy.wait_live(20)
        self.envoys[gateway] = envoy
        return envoy


@dataclass
class World:
    mesh: FastFlushMesh
    receiver: OtlpReceiver
    orders: RecordingUpstream
    keys: Any
    gateway_port: int


@pytest.fixture
def world(tmp_path: Path, authz_engine: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    # ProcessMesh starts `meshward authz` with this environment.
    receiver = OtlpReceiver("127.0.0.1:0")
    collector_port = receiver.start()
    monkeypatch.setenv("MESHWARD_AUTHZ_ENGINE", authz_engine)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    keys = new_keys()
    ports = {
        "orders_port": free_port(),
        "catalog_port": free_port(),
        "gateway_port": free_port(),
        "sidecar_port": free_port(),
        "collector_port": collector_port,
    }
    policy_dir = write_policy(tmp_path / "policies", E2E_POLICY, keys=keys, **ports)
    orders = RecordingUpstream("orders", ports["orders_port"]).start()
    work = tmp_path / "work"
    work.mkdir()
    mesh = FastFlushMesh(policy_dir, work, ["edge"], sidecars=["orders-sidecar"])
    try:
        mesh.start()
        yield World(mesh, receiver, orders, keys, ports["gateway_port"])
    except BaseException:
        print(mesh.logs(), file=sys.stderr)
        raise
    finally:
        mesh.stop()
        orders.stop()
        receiver.stop()


def test_one_trace_from_the_gateway_through_authz_and_the_sidecar(world: World) -> None:
    token = tokens.sign(world.keys[0], tokens.claims("alice", ()))
    context = client_context(world.mesh.bundle)

    def get() -> int:
        status, _, _ = https_request(
            world.gateway_port, "/orders/1", context, headers={"authorization": f"Bearer {token}"}
        )
        return status

    assert wait_until(lambda: get() == 200, 15)
    trace_id, app_span, flags = parse_traceparent(world.orders.requests[-1].headers["traceparent"])
    assert flags == "01"

    def complete() -> bool:
        spans = [s for s in world.receiver.spans() if s.trace_id == trace_id]
        return len([s for s in spans if s.name == "meshward.authz.check"]) == 2 and (
            len([s for s in spans if s.service in ("edge", "orders-sidecar")]) == 6
        )

    spans_seen = wait_until(complete, 15)
    spans = [s for s in world.receiver.spans() if s.trace_id == trace_id]
    assert spans_seen, spans
    envoy = {(s.service, s.name): s for s in spans if s.service in ("edge", "orders-sidecar")}
    assert set(envoy) == {
        (group, name)
        for group in ("edge", "orders-sidecar")
        for name in (INGRESS, AUTHZ_EGRESS, router_egress("orders"))
    }, sorted(envoy)
    edge_in, side_in = envoy["edge", INGRESS], envoy["orders-sidecar", INGRESS]
    assert edge_in.parent_span_id == ""
    # The sidecar continues the gateway's trace under the gateway's upstream span, and
    # the app gets the sidecar's upstream span as its parent.
    assert side_in.parent_span_id == envoy["edge", router_egress("orders")].span_id
    assert envoy["orders-sidecar", router_egress("orders")].span_id == app_span
    # Each decision span is the child of the ext_authz CLIENT span of the Envoy that asked.
    decisions = {
        s.attributes["meshward.gateway"]: s for s in spans if s.name == "meshward.authz.check"
    }
    assert set(decisions) == {"edge", "orders-sidecar"}
    for group, decision in decisions.items():
        assert decision.parent_span_id == envoy[group, AUTHZ_EGRESS].span_id, group
        assert decision.attributes["meshward.decision"] == "allow"
        # The parent came from the gRPC metadata (authz says so by saying nothing), and the
        # request id is the one on that Envoy's ingress span.
        assert "meshward.trace_parent" not in decision.attributes
        request_id = envoy[group, INGRESS].attributes["guid:x-request-id"]
        assert decision.attributes["meshward.request_id"] == request_id
