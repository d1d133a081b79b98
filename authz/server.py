"""The gRPC serving loop: grpcio's sync server around :class:`authz.check.Checker`.

Measured on this project's machines (DESIGN.md): a Check handler costs a few µs while
grpcio's sync server spends ~250-350 µs of CPU around it, and 3-4 worker threads do
better than many. The server is therefore kept thin and separate from the decision
code, so a faster engine can replace it without touching decisions.

``Check`` is registered with a request deserializer that never fails: bytes that do
not decode as a ``CheckRequest`` reach the checker as ``None`` and get a deny, not a
gRPC error (which Envoy would treat as a transport failure). The standard
``grpc.health.v1`` service reports SERVING for ``""`` and the Authorization service
while started, NOT_SERVING once stopping.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from authz.check import Checker
from authz.compiled import compile_policy
from authz.decision_log import DecisionLog
from authz.metrics import AuthzMetrics
from meshward.policy.model import Policy

SERVICE_NAME = "envoy.service.auth.v3.Authorization"

_log = logging.getLogger("meshward.authz")


class ListenError(Exception):
    """The gRPC listen address cannot be bound (in use, or not an address here)."""


class _Undecodable:
    """Stands for request bytes that are not a CheckRequest (grpcio treats a ``None``
    from a deserializer as a failure and aborts the call with INTERNAL)."""


_UNDECODABLE = _Undecodable()


def _parse_check_request(data: bytes) -> external_auth_pb2.CheckRequest | _Undecodable:
    message = external_auth_pb2.CheckRequest()
    try:
        message.ParseFromString(data)
    except DecodeError:
        return _UNDECODABLE
    return message


class AuthzService:
    """The ext_authz gRPC service for one policy at a time.

    Build it, :meth:`start` it (returns the bound port), :meth:`set_policy` on every
    reload, :meth:`stop` on exit. Metrics live in :attr:`registry`.
    """

    def __init__(
        self,
        policy: Policy,
        tracer: trace.Tracer,
        listen: str = "127.0.0.1:0",
        workers: int = 4,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.registry = registry if registry is not None else CollectorRegistry()
        self._metrics = AuthzMetrics(self.registry)
        self._listen = listen
        self._workers = workers
        self._policy = policy
        self._decision_log = DecisionLog()
        self._checker = Checker(compile_policy(policy), tracer, self._metrics, self._decision_log)
        self._metrics.policy_loaded(policy.version)
        self._health = health.HealthServicer()
        self._server: Any = None
        self._port = 0
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> int:
        """Bind and start serving; returns the bound port. Raises :class:`ListenError`."""
        with self._lock:
            if self._server is not None:
                return self._port
            server = grpc.server(
                ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="authz"),
                # Fail loudly on a port already in use instead of sharing it.
                options=[("grpc.so_reuseport", 0)],
            )
            handlers = {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self._check,
                    request_deserializer=_parse_check_request,
                    response_serializer=external_auth_pb2.CheckResponse.SerializeToString,
                )
            }
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
            )
            server.add_registered_method_handlers(SERVICE_NAME, handlers)
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            try:
                port = server.add_insecure_port(self._listen)
            except RuntimeError as error:
                raise ListenError(
                    f"cannot listen on {self._listen}: address in use or not local "
                    "(choose another with --listen HOST:PORT)"
                ) from error
            if port == 0:
                raise ListenError(f"cannot listen on {self._listen}")
            server.start()
            for name in ("", SERVICE_NAME):
                self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
            self._server = server
            self._port = int(port)
            _log.info(
                "authz serving",
                extra={
                    "port": port,
                    "workers": self._workers,
                    "policy_version": self.policy_version,
                },
            )
            return self._port

    def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, stop taking calls, let in-flight ones finish (≤ grace s)."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        self._health.enter_graceful_shutdown()
        server.stop(grace).wait()
        self._decision_log.close()

    # -- state -------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def policy_version(self) -> str:
        return self._checker.policy.version

    def serving(self) -> bool:
        """True while started (for ``/healthz``)."""
        return self._server is not None

    def set_policy(self, policy: Policy) -> None:
        """Compile ``policy`` and swap it in atomically; in-flight checks finish on the
        old one. A compile error leaves the old policy serving and propagates."""
        compiled = compile_policy(policy)
        self._checker.policy = compiled
        self._policy = policy
        self._metrics.policy_loaded(compiled.version)
        _log.info("policy loaded", extra={"policy_version": compiled.version})

    def status(self) -> dict[str, Any]:
        """A JSON-able summary for a ``/status`` page."""
        return {
            "serving": self.serving(),
            "port": self._port,
            "workers": self._workers,
            "policy_version": self.policy_version,
            "policy_files": list(self._policy.files),
        }

    # -- gRPC --------------------------------------------------------------------

    def _check(
        self,
        request: external_auth_pb2.CheckRequest | _Undecodable,
        context: grpc.ServicerContext,
    ) -> external_auth_pb2.CheckResponse:
        message = None if request is _UNDECODABLE else request
        return self._checker.check(message, context.invocation_metadata())
