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

With a :class:`~xds_server.credentials.CredentialSource` the service also serves the
mesh's certificates over SDS. The snapshot version is then
``<policy version>[-<inputs>]+<credential generation>``
(:func:`~xds_server.translator.snapshot_version`), and a rotation task re-issues
credentials at half their lifetime and sets new snapshots with the *same policy*: only
the secrets differ, so streams push only SDS. :meth:`XdsService.status` keeps the two
apart: ``policy_version`` (what the operator wrote) and ``version`` (what proxies get).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from meshward.http_status import parse_listen
from meshward.policy.model import Policy
from xds_server.cache import Snapshot, SnapshotCache
from xds_server.server import AdsServer
from xds_server.tracking import VersionClock, XdsMetrics
from xds_server.translator import DEFAULT_AUTHZ_FAILURE_STATUS, snapshot_version, translate

if TYPE_CHECKING:  # the PKI (cryptography) loads only when credentials are used
    from xds_server.credentials import CredentialSource

log = logging.getLogger("meshward.xds")

#: The rotation task looks at the credentials at least this often (seconds), so a
#: suspended host or a clock jump is noticed; it sleeps less when a renewal is closer.
ROTATION_POLL_SECONDS = 60.0
#: ... and never wakes more often than this (a credential that is due again right after
#: it was issued must not spin the loop).
MIN_ROTATION_INTERVAL = 0.5
#: After a failed rotation (the CA expired, say) the task retries this much later.
ROTATION_RETRY_SECONDS = 30.0


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
        credentials: CredentialSource | None = None,
        rotation_poll_seconds: float = ROTATION_POLL_SECONDS,
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
            "Snapshot sets: policies applied and certificate rotations (translated and set "
            "as snapshots).",
            registry=self.registry,
        )
        self._policy_info = Gauge(
            "meshward_xds_policy_info",
            "The snapshot version being served and the policy version it was built from "
            "(value is always 1).",
            ["version", "policy_version"],
            registry=self.registry,
        )
        self._rotations = Counter(
            "meshward_xds_credential_rotations",
            "Certificate rotations applied (new snapshots with re-issued credentials).",
            registry=self.registry,
        )
        self._rotation_errors = Counter(
            "meshward_xds_credential_rotation_errors",
            "Rotations that failed (the previous credentials keep serving).",
            registry=self.registry,
        )
        self.credentials = credentials
        self._rotation_poll = rotation_poll_seconds
        self._rotation_task: asyncio.Task[None] | None = None
        #: Set on every apply: the rotation task recomputes when to wake up.
        self._credentials_changed: asyncio.Event | None = None
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
        if self.credentials is not None:
            self._credentials_changed = asyncio.Event()
            self._rotation_task = asyncio.create_task(self._rotate_forever())
        return self._port

    async def set_policy(self, policy: Policy) -> None:
        """Translate ``policy`` and set every group's snapshot; open streams are pushed.

        Raises ``ValueError`` (nothing changes) if the policy cannot be translated, e.g.
        it needs certificates and the service has no CA.
        """
        self._apply(policy)

    async def rotate_credentials(self) -> bool:
        """Re-issue the credentials that reached half-life and set new snapshots (same
        policy, new version). Returns whether anything was rotated. The rotation task
        calls this on schedule; tests may call it directly."""
        if self.credentials is None or not self.credentials.rotation_due():
            return False
        self._apply(self._policy, rotation=True)
        return True

    async def _rotate_forever(self) -> None:
        assert self.credentials is not None and self._credentials_changed is not None
        changed = self._credentials_changed
        while True:
            changed.clear()
            delay = self.credentials.seconds_to_renewal()
            wait = self._rotation_poll if delay is None else min(delay, self._rotation_poll)
            await asyncio.sleep(MIN_ROTATION_INTERVAL)
            if wait > MIN_ROTATION_INTERVAL and not changed.is_set():
                # A policy change may issue certificates that renew sooner: wake up then.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), wait - MIN_ROTATION_INTERVAL)
            try:
                await self.rotate_credentials()
            except Exception as exc:  # the CA expired, say: keep serving, retry later
                self._rotation_errors.inc()
                log.error(
                    "certificate rotation failed; the current certificates keep serving",
                    extra={"error": str(exc), "retry_in_seconds": ROTATION_RETRY_SECONDS},
                )
                await asyncio.sleep(ROTATION_RETRY_SECONDS)

    async def stop(self, grace: float = 1.0) -> None:
        """End every stream cleanly, then stop the gRPC server (waits ``grace`` s at most)."""
        if self._rotation_task is not None:
            self._rotation_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rotation_task
            self._rotation_task = None
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
            "credentials": self.credentials.status() if self.credentials else None,
            "snapshots": {
                group: snapshot.version
                for group in self.cache.groups()
                if (snapshot := self.cache.get_snapshot(group)) is not None
            },
            "nodes": [stream.as_dict() for stream in self._ads.streams()],
        }

    def _apply(self, policy: Policy, *, rotation: bool = False) -> None:
        status = self.authz_failure_status
        try:
            issued = self.credentials.issue(policy) if self.credentials else None
            groups = translate(
                policy, self.authz_endpoints, authz_failure_status=status, credentials=issued
            )
        except ValueError:
            if self.credentials is not None:
                self.credentials.abandon()
            raise
        # Translated: the policy is accepted. Only now drop credentials it does not use.
        credentials = self.credentials.commit(policy, issued) if self.credentials else None
        version = snapshot_version(
            policy, self.authz_endpoints, authz_failure_status=status, credentials=credentials
        )
        snapshots = {group: Snapshot.build(version, res) for group, res in groups.items()}
        for group in self.cache.groups():
            if group not in snapshots:
                snapshots[group] = Snapshot.empty(version)
        previous = self._version
        if version != previous and not rotation:
            # Convergence is measured for policy changes; a rotation is not one.
            self._clock.mark(version)
        for group, snapshot in snapshots.items():
            self.cache.set_snapshot(group, snapshot)
        self._policy = policy
        self._version = version
        self._applied_at = time.time()
        if self._credentials_changed is not None:
            self._credentials_changed.set()
        self._snapshot_sets.inc()
        self._policy_info.clear()
        self._policy_info.labels(version, policy.version).set(1)
        if rotation and version != previous:
            self._rotations.inc()
            log.info(
                "certificates rotated",
                extra={
                    "version": version,
                    "previous": previous,
                    "serials": self.credentials.serials() if self.credentials else {},
                },
            )
        elif previous != version:
            log.info(
                "policy applied",
                extra={"version": version, "previous": previous or None, "groups": sorted(groups)},
            )
