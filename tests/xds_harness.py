"""Real grpc.aio ADS clients for protocol tests: SotW (:class:`AdsClient`) and Delta
(:class:`DeltaClient`). Send requests, read responses.

Responses are read by a background task into a queue, so a test can wait for one with
a timeout, or assert that none arrives, without cancelling the gRPC read itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import Message
from google.rpc import status_pb2

_TYPES: dict[str, type[Message]] = {
    "type.googleapis.com/envoy.config.cluster.v3.Cluster": cluster_pb2.Cluster,
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": (
        endpoint_pb2.ClusterLoadAssignment
    ),
    "type.googleapis.com/envoy.config.listener.v3.Listener": listener_pb2.Listener,
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": route_pb2.RouteConfiguration,
}


def unpack(packed: AnyMessage) -> Any:
    """The Envoy message inside ``packed`` (cluster, assignment, listener, routes)."""
    message = _TYPES[packed.type_url]()
    packed.Unpack(message)
    return message


def resource_name(packed: AnyMessage) -> str:
    message = unpack(packed)
    return str(getattr(message, "cluster_name", "") or message.name)


DiscoveryRequest = discovery_pb2.DiscoveryRequest
DiscoveryResponse = discovery_pb2.DiscoveryResponse
DeltaDiscoveryRequest = discovery_pb2.DeltaDiscoveryRequest
DeltaDiscoveryResponse = discovery_pb2.DeltaDiscoveryResponse


class AdsClient:
    """One SotW ADS stream to 127.0.0.1:port as node ``node_id`` in group ``cluster``."""

    method = "StreamAggregatedResources"

    def __init__(self, port: int, node_id: str = "node-1", cluster: str = "edge") -> None:
        self.port = port
        self.node = base_pb2.Node(id=node_id, cluster=cluster)
        self.responses: asyncio.Queue[Any] = asyncio.Queue()
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self.error: grpc.aio.AioRpcError | None = None

    async def __aenter__(self) -> AdsClient:
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        self._call = getattr(stub, self.method)()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read(self) -> None:
        try:
            async for response in self._call:
                self.responses.put_nowait(response)
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        finally:
            self.responses.put_nowait(None)

    async def send(
        self,
        type_url: str,
        *,
        names: Iterable[str] = (),
        version: str = "",
        nonce: str = "",
        error: str | None = None,
    ) -> None:
        request = DiscoveryRequest(
            node=self.node,
            type_url=type_url,
            resource_names=list(names),
            version_info=version,
            response_nonce=nonce,
        )
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self._call.write(request)

    async def ack(self, response: DiscoveryResponse, names: Iterable[str] = ()) -> None:
        """ACK ``response`` (its version and nonce) keeping ``names``."""
        await self.send(
            response.type_url, names=names, version=response.version_info, nonce=response.nonce
        )

    async def recv(self, timeout: float = 5.0) -> Any:
        response = await asyncio.wait_for(self.responses.get(), timeout)
        if response is None:
            raise ConnectionError(f"stream ended: {self.error!r}")
        return response

    async def assert_silent(self, wait: float = 0.3) -> None:
        """Fail if any response arrives within ``wait`` seconds."""
        try:
            response = await asyncio.wait_for(self.responses.get(), wait)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected response: {response}")

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class DeltaClient(AdsClient):
    """One Delta ADS stream (``DeltaAggregatedResources``); responses are
    ``DeltaDiscoveryResponse``. Sends only what a request says: subscription changes,
    the nonce it answers, an optional error (NACK)."""

    method = "DeltaAggregatedResources"

    async def delta(
        self,
        type_url: str,
        *,
        subscribe: Iterable[str] = (),
        unsubscribe: Iterable[str] = (),
        initial: dict[str, str] | None = None,
        nonce: str = "",
        error: str | None = None,
    ) -> None:
        request = DeltaDiscoveryRequest(
            node=self.node,
            type_url=type_url,
            resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe),
            initial_resource_versions=initial or {},
            response_nonce=nonce,
        )
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self._call.write(request)

    async def ack(self, response: Any, names: Iterable[str] = ()) -> None:
        """ACK ``response`` (a DeltaDiscoveryResponse): its nonce, no error."""
        await self.delta(response.type_url, nonce=response.nonce)

    async def nack(self, response: Any, error: str) -> None:
        await self.delta(response.type_url, nonce=response.nonce, error=error)


def run_xds(
    test: Callable[[Any], Awaitable[None]],
    policy: Any,
    authz: Any,
    *,
    timeout: float = 20.0,
    **options: Any,
) -> None:
    """Start ``XdsService(policy, authz, **options)`` on a free port, run ``test``
    against it (within ``timeout`` seconds), always stop it."""
    from xds_server.service import XdsService

    async def main() -> None:
        service = XdsService(policy, authz, **options)
        await service.start()
        try:
            await asyncio.wait_for(test(service), timeout)
        finally:
            await service.stop(grace=0.5)

    asyncio.run(main())
