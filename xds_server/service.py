"""The xDS service: translator + snapshot cache + ADS server on one ``grpc.aio`` server.

Build one from a :class:`~meshward.policy.model.Policy`, ``await start()``, and call
:meth:`XdsService.set_policy` on every reload: the new policy is translated, each node
group gets its new snapshot, and every connected stream is pushed the change. A group
whose gateway disappeared from the policy gets an empty snapshot, so its proxies drop
the listener and clusters rather than keep serving a deleted gateway.

Proxies connect with SotW (``StreamAggregatedResources``) or Delta
(``DeltaAggregatedResources``) ADS. :meth:`XdsService.status` shows, per connected node,
the versions sent/ACKed/NACKed per type, the applied version, the live NACK error and
the convergence time of the latest policy change; :attr:`XdsService.registry` holds the
Prometheus metrics (:class:`~xds_server.tracking.XdsMetrics`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from meshward.http_status import parse_listen
from meshward.policy.model import Policy
from xds_server.cache import Snapshot, SnapshotCache
from xds_server.server import AdsServer
from xds_server.tracking import VersionClock, XdsMetrics
from xds_server.translator import DEFAULT_AUTHZ_FAILURE_STATUS, snapshot_version, translate

log = logging.getLogger("meshward.xds")


class XdsService:
    """Serves ADS for ``policy`` on ``listen`` (``HOST:PORT``; port 0 picks a free one).

    Not thread-safe: call :meth:`set_policy` and :meth:`status` from the event loop
    that ran :meth:`start` (``status()`` only reads, so a status thread reading a
    slightly stale view is harmless).
    """

    def __init__(
        self,
        policy: Policy,
        authz_endpoints: Sequence[tuple[str, int]],
        listen: str = "127.0.0.1:0",
        *,
        authz_failure_status: int = DEFAULT_AUTHZ_FAILURE_STATUS,
    ) -> None:
        parse_listen(listen)  # fail early, naming the bad input
        self.listen = listen
        self.authz_endpoints = tuple((str(h), int(p)) for h, p in authz_endpoints)
        self.authz_failure_status = authz_failure_status
        self.registry = CollectorRegistry()
        self.cache = SnapshotCache()
        self._metrics = XdsMetrics(self.registry)
        self._snapshot_sets = Counter(
            "meshward_xds_snapshot_updates",
            "Policies applied (translated and set as snapshots).",
            registry=self.registry,
        )
        self._policy_info = Gauge(
            "meshward_xds_policy_info",
            "The policy version being served (value is always 1).",
            ["version"],
            registry=self.registry,
        )
        self._clock = VersionClock()
        self._ads = AdsServer(self.cache, self._metrics, self._clock)
        self._server: grpc.aio.Server | None = None
        self._port: int | None = None
        self._policy = policy
        self._version = ""
        self._applied_at = 0.0
        self._apply(policy)

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def version(self) -> str:
        """The ``version_info`` of the current snapshots."""
        return self._version

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("xds service is not started")
        return self._port

    async def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        # SO_REUSEPORT off: a second server on a busy port must fail, not share it.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._ads.add_to(server)
        port = server.add_insecure_port(self.listen)
        if port == 0:
            raise OSError(f"cannot listen on {self.listen} (address in use or not local?)")
        await server.start()
        self._server = server
        self._port = int(port)
        return self._port

    async def set_policy(self, policy: Policy) -> None:
        """Translate ``policy`` and set every group's snapshot; open streams are pushed."""
        self._apply(policy)

    async def stop(self, grace: float = 1.0) -> None:
        """End every stream cleanly, then stop the gRPC server (waits ``grace`` s at most)."""
        if self._server is None:
            return
        self._ads.close_streams()
        await self._server.stop(grace)
        self._server = None

    def healthy(self) -> bool:
        return self._server is not None

    def status(self) -> dict[str, Any]:
        """A JSON-able view: served version, snapshots, and every connected node.

        Each node: ``stream``, ``id``, ``group``, ``protocol`` (``sotw``/``delta``),
        ``peer``, ``connected_at``, ``applied_version``, ``last_ack_at``,
        ``converged_version`` and ``convergence_seconds`` (latest policy change it
        applied), ``error``/``error_type``/``error_version``/``error_at`` (the live
        NACK, cleared once a newer version is applied) and ``types``: per short type
        name ``sent``, ``acked``, ``nack_version``, ``nack_error``, ``nack_at`` (last
        NACK of the type), plus protocol details (``nonce``, ``names``, ``responses``).
        """
        return {
            "listen": self.listen,
            "port": self._port,
            "policy_version": self._policy.version,
            "version": self._version,
            "applied_at": self._applied_at,
            "authz_endpoints": [f"{h}:{p}" for h, p in self.authz_endpoints],
            "snapshots": {
                group: snapshot.version
                for group in self.cache.groups()
                if (snapshot := self.cache.get_snapshot(group)) is not None
            },
            "nodes": [stream.as_dict() for stream in self._ads.streams()],
        }

    def _apply(self, policy: Policy) -> None:
        options = {"authz_failure_status": self.authz_failure_status}
        version = snapshot_version(policy, self.authz_endpoints, **options)
        groups = translate(policy, self.authz_endpoints, **options)
        snapshots = {group: Snapshot.build(version, res) for group, res in groups.items()}
        for group in self.cache.groups():
            if group not in snapshots:
                snapshots[group] = Snapshot.empty(version)
        previous = self._version
        if version != previous:
            self._clock.mark(version)
        for group, snapshot in snapshots.items():
            self.cache.set_snapshot(group, snapshot)
        self._policy = policy
        self._version = version
        self._applied_at = time.time()
        self._snapshot_sets.inc()
        self._policy_info.clear()
        self._policy_info.labels(version).set(1)
        if previous != version:
            log.info(
                "policy applied",
                extra={"version": version, "previous": previous or None, "groups": sorted(groups)},
            )
