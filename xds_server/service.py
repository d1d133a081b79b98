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

**The authz cluster's endpoints** are the static ones given to the service (``meshward
xds --authz``, for an authz that does not use ``--xds``) plus every live authz replica
registered by its own ADS stream (:mod:`xds_server.replicas`), deduplicated. When that
set changes the service derives new snapshots from the current ones with only the
``meshward_authz`` ClusterLoadAssignment replaced (:meth:`Snapshot.with_resources
<xds_server.cache.Snapshot.with_resources>`) and a new version (the endpoints are part
of it, :func:`~xds_server.translator.snapshot_version`): every stream pushes EDS alone,
nothing is re-translated, no convergence is measured (it is not a policy change).
Changes within :data:`ENDPOINTS_COALESCE_SECONDS` go out as one push. With no endpoint
at all the assignment is empty and Envoy fails every Check closed (the configured
``authz_failure_status``), never open. A static endpoint that is a DNS name keeps the
cluster ``STRICT_DNS`` (EDS carries IPs only): replicas are then listed in ``status()``
but not used, with one warning.

**Start-up hold.** With no static endpoint, a freshly started service has no authz
endpoint until the first replica registers, yet proxies reconnecting after a restart of
the xDS server already hold the replicas' addresses. So the Envoy groups' snapshots are
held back (only the authz group, which replicas need to register, is served) until the
first replica is ready or :data:`AUTHZ_HOLD_SECONDS` pass: a reconnected proxy keeps
its last configuration meanwhile, instead of being told "no authz" and denying every
request; a proxy that starts then waits for its first configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
from envoy.config.core.v3 import base_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge

from meshward.http_status import parse_listen
from meshward.policy.model import Policy
from xds_server import resources as rs
from xds_server.cache import Snapshot, SnapshotCache
from xds_server.replicas import Address, AuthzReplicas
from xds_server.server import AdsServer
from xds_server.stream import Stream
from xds_server.tracking import VersionClock, XdsMetrics
from xds_server.translator import (
    AUTHZ_CLUSTER,
    AUTHZ_GROUP,
    DEFAULT_AUTHZ_FAILURE_STATUS,
    Credentials,
    authz_load_assignment,
    authz_uses_eds,
    is_ip,
    snapshot_version,
    translate,
)

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
#: Changes of the authz replica set within this window are pushed as one EDS update
#: (a burst of replicas starting or reconnecting is one push to every proxy, not N).
ENDPOINTS_COALESCE_SECONDS = 0.1
#: The start-up hold (see the module doc) ends at the latest after this long: authz
#: replicas retry their ADS stream at least every 5 s (authz.policy_source.MAX_BACKOFF).
AUTHZ_HOLD_SECONDS = 6.0
#: gRPC server options: no SO_REUSEPORT (a second server on a busy port must fail, not
#: share it); keepalive pings on idle ADS streams, so the stream of a replica whose host
#: vanished (no FIN, no RST) ends within ~30 s and the replica leaves the authz cluster.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)


class XdsService:
    """Serves ADS for ``policy`` on ``listen`` (``HOST:PORT``; port 0 picks a free one).

    ``authz_endpoints`` are the static endpoints of the authz cluster; replicas add
    theirs by connecting (see the module doc). ``authz_hold_seconds`` bounds the
    start-up hold (0: none).

    Not thread-safe: call :meth:`set_policy` and :meth:`status` from the event loop
    that ran :meth:`start` (``status()`` only reads, so a status thread reading a
    slightly stale view is harmless). The service is its ADS server's
    :class:`~xds_server.stream.StreamCallbacks`.
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
        authz_hold_seconds: float = AUTHZ_HOLD_SECONDS,
        endpoints_coalesce_seconds: float = ENDPOINTS_COALESCE_SECONDS,
    ) -> None:
        parse_listen(listen)  # fail early, naming the bad input
        self.listen = listen
        #: The static endpoints of the authz cluster (IPs normalized, as EDS carries them).
        self.static_authz_endpoints: tuple[Address, ...] = tuple(
            (_normalize_host(str(h)), int(p)) for h, p in authz_endpoints
        )
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
        self._authz_endpoints_gauge = Gauge(
            "meshward_xds_authz_endpoints",
            "Endpoints of the authz cluster served to proxies (static --authz ones plus "
            "registered replicas); 0 means every Check fails closed.",
            registry=self.registry,
        )
        self.replicas = AuthzReplicas(self._replicas_changed, self.registry)
        self._coalesce_seconds = endpoints_coalesce_seconds
        self._refresh_handle: asyncio.TimerHandle | None = None
        self._dns_warned = False
        self._clock = VersionClock()
        self._ads = AdsServer(self.cache, self._metrics, self._clock, callbacks=self)
        self._server: grpc.aio.Server | None = None
        self._port: int | None = None
        self._policy = policy
        self._version = ""
        self._applied_at = 0.0
        #: Every group's current snapshot (the cache holds the published ones).
        self._snapshots: dict[str, Snapshot] = {}
        #: The authz endpoints and credentials the current snapshots were built with.
        self._served_endpoints: tuple[Address, ...] = ()
        self._served_credentials: Credentials | None = None
        #: While set: the start-up hold is on, until this time.monotonic() deadline.
        self._hold_until: float | None = None
        self._hold_seconds = authz_hold_seconds
        self._hold_task: asyncio.Task[None] | None = None
        if authz_hold_seconds > 0 and not self.static_authz_endpoints:
            self._hold_until = time.monotonic() + authz_hold_seconds
        self._apply(policy)

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def version(self) -> str:
        """The ``version_info`` of the current snapshots."""
        return self._version

    @property
    def authz_endpoints(self) -> tuple[Address, ...]:
        """The authz cluster's endpoints in the current snapshots (static + replicas)."""
        return self._served_endpoints

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("xds service is not started")
        return self._port

    async def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        server = grpc.aio.server(options=list(SERVER_OPTIONS))
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
        if self._hold_until is not None:
            # The hold lasts from start, not from construction.
            self._hold_until = time.monotonic() + self._hold_seconds
            self._hold_task = asyncio.create_task(self._end_hold_later(self._hold_seconds))
            log.info(
                "no static authz endpoint: proxies get their configuration once an authz "
                "replica registers (meshward authz --xds), or in %.0f s",
                self._hold_seconds,
                extra={"hold_seconds": self._hold_seconds},
            )
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
        for task in (self._rotation_task, self._hold_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._rotation_task = self._hold_task = None
        if self._server is not None:
            self._ads.close_streams()
            await self._server.stop(grace)
            self._server = None
        if self._refresh_handle is not None:  # replicas' streams ended: nobody to push to
            self._refresh_handle.cancel()
            self._refresh_handle = None

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

        The authz cluster: ``authz_endpoints`` (served to proxies now),
        ``authz_static_endpoints`` (``--authz``), ``authz_replicas`` (each registered
        replica: ``node``, ``stream``, ``address``, ``announced``, ``source``
        ``announced``/``peer``, ``peer``, ``ready``, ``connected_at``, ``ready_at``) and
        ``authz_hold_seconds_left`` (the start-up hold; ``None`` when off).
        """
        hold_left = None
        if self._hold_until is not None:
            hold_left = round(max(0.0, self._hold_until - time.monotonic()), 3)
        return {
            "listen": self.listen,
            "port": self._port,
            "policy_version": self._policy.version,
            "version": self._version,
            "applied_at": self._applied_at,
            "authz_endpoints": [_host_port(a) for a in self._served_endpoints],
            "authz_static_endpoints": [_host_port(a) for a in self.static_authz_endpoints],
            "authz_replicas": self.replicas.status(),
            "authz_hold_seconds_left": hold_left,
            "credentials": self.credentials.status() if self.credentials else None,
            "snapshots": {group: snapshot.version for group, snapshot in self._snapshots.items()},
            "nodes": [stream.as_dict() for stream in self._ads.streams()],
        }

    # -- StreamCallbacks (of the ADS server) -------------------------------------------

    def on_stream_open(self, stream: Stream, node: base_pb2.Node) -> None:
        self.replicas.opened(stream.stream_id, node, stream.status.peer)

    def on_stream_applied(self, stream: Stream) -> None:
        self.replicas.applied(stream.stream_id)

    def on_stream_closed(self, stream: Stream) -> None:
        self.replicas.closed(stream.stream_id)

    def holds_group(self, group: str) -> bool:
        return self._hold_until is not None and group != AUTHZ_GROUP

    # -- the authz cluster's endpoints ---------------------------------------------------

    def _effective_endpoints(self) -> tuple[Address, ...]:
        """Static endpoints then registered replicas, deduplicated (see module doc)."""
        static = self.static_authz_endpoints
        replicas = self.replicas.endpoints()
        if not authz_uses_eds(static):
            if replicas and not self._dns_warned:
                self._dns_warned = True
                log.warning(
                    "authz replicas registered but not used: a static --authz endpoint is "
                    "a DNS name, so the authz cluster is STRICT_DNS (EDS carries IPs only); "
                    "give --authz as IP:PORT, or drop it and let replicas register",
                    extra={"static": [_host_port(a) for a in static]},
                )
            return static
        return tuple(dict.fromkeys((*static, *replicas)))

    def _replicas_changed(self) -> None:
        """The replica set changed: refresh the endpoints soon (changes coalesce)."""
        if self._refresh_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (not serving): nothing to coalesce with
            self._refresh_endpoints()
            return
        self._refresh_handle = loop.call_later(self._coalesce_seconds, self._refresh_endpoints)

    def _refresh_endpoints(self) -> None:
        """New snapshots with only the authz cluster's EDS changed, if the endpoints did."""
        self._refresh_handle = None
        endpoints = self._effective_endpoints()
        if endpoints == self._served_endpoints:
            return
        previous_endpoints, previous = self._served_endpoints, self._version
        version = snapshot_version(
            self._policy,
            endpoints,
            authz_failure_status=self.authz_failure_status,
            credentials=self._served_credentials,
        )
        assignment = authz_load_assignment(endpoints)
        self._snapshots = {
            group: snapshot.with_resources(
                version,
                rs.ENDPOINT,
                [assignment] if AUTHZ_CLUSTER in snapshot.resources(rs.ENDPOINT) else [],
            )
            for group, snapshot in self._snapshots.items()
        }
        self._version = version
        self._served_endpoints = endpoints
        self._authz_endpoints_gauge.set(len(endpoints))
        self._policy_info.clear()
        self._policy_info.labels(version, self._policy.version).set(1)
        log.info(
            "authz endpoints changed",
            extra={
                "version": version,
                "previous": previous,
                "endpoints": [_host_port(a) for a in endpoints],
                "added": [_host_port(a) for a in endpoints if a not in previous_endpoints],
                "removed": [_host_port(a) for a in previous_endpoints if a not in endpoints],
            },
        )
        if endpoints and self._hold_until is not None:
            self._end_hold("an authz replica registered")
        else:
            self._publish()

    async def _end_hold_later(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._end_hold("no authz replica registered in time: Checks fail closed until one does")

    def _end_hold(self, reason: str) -> None:
        if self._hold_until is None:
            return
        self._hold_until = None
        if self._hold_task is not None and self._hold_task is not asyncio.current_task():
            self._hold_task.cancel()
        self._hold_task = None
        level = logging.INFO if self._served_endpoints else logging.WARNING
        log.log(
            level,
            "proxies get their configuration: %s",
            reason,
            extra={"authz_endpoints": [_host_port(a) for a in self._served_endpoints]},
        )
        self._publish()

    def _publish(self) -> None:
        """Set every group's current snapshot in the cache (open streams are pushed),
        except the groups the start-up hold keeps back."""
        for group, snapshot in self._snapshots.items():
            if not self.holds_group(group):
                self.cache.set_snapshot(group, snapshot)

    def _apply(self, policy: Policy, *, rotation: bool = False) -> None:
        status = self.authz_failure_status
        endpoints = self._effective_endpoints()
        try:
            issued = self.credentials.issue(policy) if self.credentials else None
            groups = translate(policy, endpoints, authz_failure_status=status, credentials=issued)
        except ValueError:
            if self.credentials is not None:
                self.credentials.abandon()
            raise
        # Translated: the policy is accepted. Only now drop credentials it does not use.
        credentials = self.credentials.commit(policy, issued) if self.credentials else None
        version = snapshot_version(
            policy, endpoints, authz_failure_status=status, credentials=credentials
        )
        snapshots = {group: Snapshot.build(version, res) for group, res in groups.items()}
        for group in self._snapshots:
            if group not in snapshots:
                snapshots[group] = Snapshot.empty(version)
        previous = self._version
        if version != previous and not rotation:
            # Convergence is measured for policy changes; a rotation is not one.
            self._clock.mark(version)
        self._snapshots = snapshots
        self._served_endpoints = endpoints
        self._served_credentials = credentials
        self._authz_endpoints_gauge.set(len(endpoints))
        self._publish()
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


def _normalize_host(host: str) -> str:
    """An IP in its canonical text form (what replicas' addresses use); a name as is."""
    return ipaddress.ip_address(host).compressed if is_ip(host) else host


def _host_port(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
