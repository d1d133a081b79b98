"""The policy from the xDS server: an ADS client that keeps authz's policy in sync.

:class:`XdsPolicySource` runs one State-of-the-World ADS stream
(``envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources``)
on its own daemon thread, with grpcio's sync API (authz's server is grpcio sync too).
It announces ``node.cluster = "meshward-authz"`` (:data:`meshward.policy.wire.AUTHZ_GROUP`) and
the authz gRPC address in the node metadata key ``meshward.authz.listen``, and
subscribes to ``type.googleapis.com/meshward.v1.PolicyResource`` (a wildcard type: no
resource names, every response carries the one resource ``policy``).

Protocol, as the xDS server (:mod:`xds_server.server`) expects it from Envoy:

* Every response is answered exactly once, in order: decode
  (:func:`meshward.policy.wire.from_resource`, which checks the content hash), compile
  (:func:`authz.compiled.compile_policy`), swap into the service, *then* ACK with the
  response's ``version_info`` and ``nonce``. A response carrying the policy version
  already enforced (a new snapshot for other reasons, or the full state re-sent after
  a reconnect) is ACKed without recompiling.
* Any failure (no or several resources, wrong type, bad JSON, version mismatch,
  compile error) is a NACK: ``version_info`` = the last *applied* version, the
  response's ``nonce``, and ``error_detail`` (``google.rpc.Status``, INVALID_ARGUMENT)
  with the reason. The old policy keeps serving; the server does not resend the
  rejected version, the next snapshot replaces it.
* When the stream fails (server down, restarted, connection reset) the client opens a
  new one after an exponential back-off with jitter (0.25 s doubling, capped at
  5 s; reset once a stream gets a response). The first request of a new stream
  carries the last applied ``version_info`` and an empty nonce, and the server answers
  it with the full current state. Meanwhile authz keeps deciding with the last policy.

**Secrets.** Built with a ``tls_sink`` (``meshward authz --xds`` always is), the source
also subscribes on the same stream to the SDS type
``envoy.extensions.transport_sockets.tls.v3.Secret`` with the names ``svid`` and
``trust-bundle`` (:mod:`authz.transport`): authz's own SVID and the CA bundle, issued
and rotated by the xDS server. A response must carry both, as inline PEM, with a key
that matches the certificate; it is ACKed once handed to the sink (new connections use
it), NACKed otherwise (the previous certificate keeps serving). Each type keeps its own
``version_info`` (sent again on resume) and nonce.

Each attempt uses a new channel with a local subchannel pool, so grpcio's own
reconnect back-off (which can grow to minutes) never delays the next attempt.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from queue import SimpleQueue
from typing import Any, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import code_pb2, status_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge

from authz.compiled import CompiledPolicy
from authz.transport import (
    SECRET_NAMES,
    SECRET_TYPE_URL,
    SVID_SECRET,
    TRUST_BUNDLE_SECRET,
    TlsMaterial,
)
from meshward import __version__
from meshward.policy import wire
from meshward.policy.model import Policy

#: Node metadata key holding the authz gRPC address (HOST:PORT) this replica serves on.
LISTEN_METADATA_KEY = "meshward.authz.listen"
INITIAL_BACKOFF = 0.25
MAX_BACKOFF = 5.0

_CHANNEL_OPTIONS = (
    # A fresh subchannel per attempt: no inherited TRANSIENT_FAILURE back-off.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)

_log = logging.getLogger("meshward.authz")


class PolicySink(Protocol):
    """What the source drives: :class:`authz.server.AuthzService`."""

    @property
    def policy_version(self) -> str | None: ...

    def set_policy(self, policy: Policy, compiled: CompiledPolicy | None = None) -> None: ...


class TlsSink(Protocol):
    """What receives authz's SVID and trust bundle: :class:`authz.server.AuthzService`."""

    def set_tls(self, material: TlsMaterial) -> None: ...


def default_node_id() -> str:
    """``authz-<hostname>-<pid>``: unique per process on a host."""
    return f"authz-{socket.gethostname()}-{os.getpid()}"


class XdsPolicySource:
    """Keeps ``sink``'s policy equal to what the xDS server at ``xds_address`` serves.

    ``authz_listen`` is the authz gRPC address announced in the node metadata. Metrics
    go to ``registry``: ``meshward_authz_policy_updates_total{result="ack"|"nack"}`` and
    ``meshward_authz_xds_connected`` (1 while a stream is open and has been answered).
    :meth:`start` once, :meth:`stop` on exit; :meth:`status` from any thread.
    """

    def __init__(
        self,
        sink: PolicySink,
        xds_address: str,
        *,
        authz_listen: str,
        node_id: str | None = None,
        registry: CollectorRegistry | None = None,
        initial_backoff: float = INITIAL_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        tls_sink: TlsSink | None = None,
    ) -> None:
        self.xds_address = xds_address
        self.node = base_pb2.Node(
            id=node_id or default_node_id(),
            cluster=wire.AUTHZ_GROUP,
            user_agent_name="meshward-authz",
            user_agent_version=__version__,
        )
        self.node.metadata.update({LISTEN_METADATA_KEY: authz_listen})
        self._sink = sink
        self._tls_sink = tls_sink
        self._tls: TlsMaterial | None = None
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        registry = registry if registry is not None else CollectorRegistry()
        updates = Counter(
            "meshward_authz_policy_updates",
            "Policy responses from the xDS server, by outcome (ack: applied, nack: rejected).",
            ["result"],
            registry=registry,
        )
        self._acks = updates.labels("ack")
        self._nacks = updates.labels("nack")
        secret_updates = Counter(
            "meshward_authz_secret_updates",
            "SVID/trust bundle responses from the xDS server, by outcome.",
            ["result"],
            registry=registry,
        )
        self._secret_acks = secret_updates.labels("ack")
        self._secret_nacks = secret_updates.labels("nack")
        self._connected_gauge = Gauge(
            "meshward_authz_xds_connected",
            "1 while the ADS stream to the xDS server is open and answered, else 0.",
            registry=registry,
        )
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._call: Any = None
        # Guarded by _lock (read by status() from other threads).
        self._connected = False
        self._version_info = ""  # version_info of the last ACKed policy response
        self._secret_version_info = ""  # ... and of the last ACKed secret response
        self._updated_at: float | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._streams = 0

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the ADS thread (returns at once; the policy arrives asynchronously)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="authz-xds", daemon=True)
        self._thread.start()
        _log.info(
            "xds policy source started",
            extra={"xds": self.xds_address, "node": self.node.id, "group": wire.AUTHZ_GROUP},
        )

    def stop(self, timeout: float = 5.0) -> None:
        """End the stream (cancels it) and wait for the thread (≤ ``timeout`` s)."""
        self._stop.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- state ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A JSON-able view for ``/status``."""
        with self._lock:
            return {
                "xds": self.xds_address,
                "node_id": self.node.id,
                "group": wire.AUTHZ_GROUP,
                "connected": self._connected,
                "policy_version": self._sink.policy_version,
                "version_info": self._version_info or None,
                "updated_at": self._updated_at,
                "last_error": self._last_error,
                "last_error_at": self._last_error_at,
                "streams": self._streams,
                "secret_version_info": self._secret_version_info or None,
                "spiffe_id": self._tls.spiffe_id if self._tls is not None else None,
                "svid_serial": self._tls.serial if self._tls is not None else None,
            }

    # -- the stream ----------------------------------------------------------------

    def _run(self) -> None:
        delay = self._initial_backoff
        failures = 0
        while not self._stop.is_set():
            answered, error = self._stream_once()
            if self._stop.is_set():
                break
            if answered:
                delay, failures = self._initial_backoff, 0
            failures += 1
            wait = delay * random.uniform(0.8, 1.0)  # noqa: S311 - jitter, not crypto
            self._record_error(f"xDS stream to {self.xds_address} ended: {error}")
            # One warning per outage; the repeats of a long one go to debug.
            level = logging.WARNING if failures == 1 else logging.DEBUG
            _log.log(
                level,
                "xds stream ended; the last policy keeps serving, reconnecting",
                extra={
                    "xds": self.xds_address,
                    "error": error,
                    "retry_in": round(wait, 3),
                    "policy_version": self._sink.policy_version,
                },
            )
            self._stop.wait(wait)
            delay = min(delay * 2, self._max_backoff)

    def _stream_once(self) -> tuple[bool, str]:
        """Run one ADS stream until it ends. Returns (got a response, why it ended)."""
        requests: SimpleQueue[discovery_pb2.DiscoveryRequest | None] = SimpleQueue()
        with self._lock:
            resume = self._version_info
            resume_secrets = self._secret_version_info
        requests.put(
            discovery_pb2.DiscoveryRequest(
                node=self.node, type_url=wire.TYPE_URL, version_info=resume, response_nonce=""
            )
        )
        if self._tls_sink is not None:
            requests.put(
                discovery_pb2.DiscoveryRequest(
                    type_url=SECRET_TYPE_URL,
                    version_info=resume_secrets,
                    resource_names=list(SECRET_NAMES),
                    response_nonce="",
                )
            )
        channel = grpc.insecure_channel(self.xds_address, options=_CHANNEL_OPTIONS)
        answered = False
        reason = "closed by the server"
        try:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            with self._lock:
                if self._stop.is_set():
                    return False, "stopping"
                call = self._call = stub.StreamAggregatedResources(_drain(requests))
                self._streams += 1
            for response in call:
                if not answered:
                    answered = True
                    self._set_connected(True)
                requests.put(self._handle(response))
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            reason = f"{code.name if code else 'error'}: {details}"
        finally:
            requests.put(None)
            with self._lock:
                self._call = None
            self._set_connected(False)
            channel.close()
        return answered, reason

    def _handle(self, response: discovery_pb2.DiscoveryResponse) -> discovery_pb2.DiscoveryRequest:
        """Apply one response; the ACK or NACK to send for it."""
        if self._tls_sink is not None and response.type_url == SECRET_TYPE_URL:
            return self._handle_secrets(response)
        try:
            applied = self._apply(response)
        except Exception as error:  # any failure: NACK and keep the old policy
            message = (
                str(error)
                if isinstance(error, ValueError)  # WireError and our own checks say it all
                else f"{type(error).__name__}: {error}"
            )
            self._nacks.inc()
            self._record_error(f"rejected version {response.version_info}: {message}")
            with self._lock:
                kept = self._version_info
            _log.warning(
                "xds policy rejected; the last policy keeps serving",
                extra={
                    "rejected_version": response.version_info,
                    "kept_version": kept or None,
                    "policy_version": self._sink.policy_version,
                    "error": message,
                },
            )
            return discovery_pb2.DiscoveryRequest(
                type_url=response.type_url or wire.TYPE_URL,
                version_info=kept,
                response_nonce=response.nonce,
                error_detail=status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message),
            )
        self._acks.inc()
        with self._lock:
            self._version_info = response.version_info
            self._updated_at = time.time()
        _log.info(
            "xds policy applied" if applied else "xds policy confirmed",
            extra={"version": response.version_info, "policy_version": self._sink.policy_version},
        )
        return discovery_pb2.DiscoveryRequest(
            type_url=wire.TYPE_URL,
            version_info=response.version_info,
            response_nonce=response.nonce,
        )

    def _handle_secrets(
        self, response: discovery_pb2.DiscoveryResponse
    ) -> discovery_pb2.DiscoveryRequest:
        """Apply one SDS response (authz's SVID and the trust bundle); ACK or NACK."""
        assert self._tls_sink is not None
        try:
            material = _material(response)
        except Exception as error:  # NACK; the previous certificate keeps serving
            message = (
                str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
            )
            self._secret_nacks.inc()
            self._record_error(f"rejected secrets version {response.version_info}: {message}")
            with self._lock:
                kept = self._secret_version_info
            _log.warning(
                "xds secrets rejected; the last certificate keeps serving",
                extra={"rejected_version": response.version_info, "error": message},
            )
            return discovery_pb2.DiscoveryRequest(
                type_url=SECRET_TYPE_URL,
                version_info=kept,
                resource_names=list(SECRET_NAMES),
                response_nonce=response.nonce,
                error_detail=status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message),
            )
        changed = material != self._tls
        if changed:
            self._tls_sink.set_tls(material)
        self._secret_acks.inc()
        with self._lock:
            self._tls = material
            self._secret_version_info = response.version_info
        if changed:
            _log.info(
                "xds certificate applied",
                extra={
                    "version": response.version_info,
                    "spiffe_id": material.spiffe_id,
                    "serial": material.serial,
                },
            )
        return discovery_pb2.DiscoveryRequest(
            type_url=SECRET_TYPE_URL,
            version_info=response.version_info,
            resource_names=list(SECRET_NAMES),
            response_nonce=response.nonce,
        )

    def _apply(self, response: discovery_pb2.DiscoveryResponse) -> bool:
        """Decode, compile and swap in the response's policy; False if already enforced.
        Raises on anything unacceptable."""
        if response.type_url != wire.TYPE_URL:
            raise ValueError(
                f"unexpected resource type {response.type_url!r}; asked for {wire.TYPE_URL}"
            )
        if len(response.resources) != 1:
            raise ValueError(f"expected exactly one policy resource, got {len(response.resources)}")
        packed = response.resources[0]
        resource = wire.PolicyResource()
        if not packed.Unpack(resource):
            raise ValueError(f"resource is a {packed.type_url!r}, not a {wire.TYPE_URL}")
        policy = wire.from_resource(resource)
        if policy.version == self._sink.policy_version:
            return False
        # The sink compiles (raising on a compile error, which NACKs): it owns the
        # process's JWKS registry, which fetchers of jwks_uri issuers come from.
        self._sink.set_policy(policy)
        return True

    def _set_connected(self, connected: bool) -> None:
        with self._lock:
            changed = self._connected != connected
            self._connected = connected
        self._connected_gauge.set(1 if connected else 0)
        if changed and connected:
            _log.info("xds connected", extra={"xds": self.xds_address, "node": self.node.id})

    def _record_error(self, message: str) -> None:
        with self._lock:
            self._last_error = message
            self._last_error_at = time.time()


def _material(response: discovery_pb2.DiscoveryResponse) -> TlsMaterial:
    """The SVID and bundle an SDS response carries; raises ``ValueError`` saying why not."""
    secrets: dict[str, secret_pb2.Secret] = {}
    for packed in response.resources:
        secret = secret_pb2.Secret()
        if not packed.Unpack(secret):
            raise ValueError(f"resource is a {packed.type_url!r}, not a Secret")
        secrets[secret.name] = secret
    missing = [name for name in SECRET_NAMES if name not in secrets]
    if missing:
        raise ValueError(f"missing secret(s) {', '.join(missing)}; got {sorted(secrets)}")
    svid = secrets[SVID_SECRET].tls_certificate
    bundle = secrets[TRUST_BUNDLE_SECRET].validation_context.trusted_ca
    if not (svid.certificate_chain.inline_bytes and svid.private_key.inline_bytes):
        raise ValueError(f"secret {SVID_SECRET!r} lacks an inline certificate chain and key")
    if not bundle.inline_bytes:
        raise ValueError(f"secret {TRUST_BUNDLE_SECRET!r} lacks an inline trusted_ca")
    return TlsMaterial.parse(
        svid.certificate_chain.inline_bytes, svid.private_key.inline_bytes, bundle.inline_bytes
    )


def _drain(
    requests: SimpleQueue[discovery_pb2.DiscoveryRequest | None],
) -> Iterator[discovery_pb2.DiscoveryRequest]:
    """The request stream: whatever is queued, until ``None`` (then the client half-closes)."""
    while True:
        request = requests.get()
        if request is None:
            return
        yield request
