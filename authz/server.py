"""The gRPC service around :class:`authz.check.Checker`, on one of two serving engines.

Measured on this project's machines (DESIGN.md): a Check handler costs a few µs while
grpcio's sync server spends ~250-350 µs of CPU around it, and 3-4 worker threads do
better than many. The server is therefore kept thin and separate from the decision
code, and the engine is a choice (``engine=``, ``meshward authz --engine``):

* ``stock`` — grpcio's sync server with ``workers`` threads (:func:`new_check_server`),
  public API only;
* ``fast`` — :mod:`authz.engine_fast`: one thread on grpcio's completion queue
  (:func:`new_fast_check_server`), ~1.3-1.6x the stock server's throughput at
  lower CPU per call, but on grpcio's *private*
  Cython API, so it runs only when :func:`authz.engine_fast.fast_engine_unavailable`
  finds that API as expected;
* ``auto`` (the default) — ``fast`` when it is available, else ``stock`` with one log
  line saying why.

Both serve the same handler (:meth:`AuthzService._check`), the same health statuses,
the same transport credentials and the same options (:data:`SERVER_OPTIONS`), so start,
stop, ``set_tls``, ``set_policy`` and health behave the same on either.

``Check`` is registered with a request deserializer that never fails: bytes that do
not decode as a ``CheckRequest`` reach the checker as ``None`` and get a deny, not a
gRPC error (which Envoy would treat as a transport failure). The standard
``grpc.health.v1`` service reports SERVING for ``""`` and the Authorization service
while started *with a policy*, NOT_SERVING before the first policy (a service built
with ``policy=None`` waits for one from the xDS server and denies every Check with
503 ``no_policy`` meanwhile) and once stopping.

With a :class:`authz.transport.ServerTls` the server speaks only mTLS (client
certificate required, chained to the trust bundle) and every call's peer must present
a SPIFFE ID of the trust domain (the policy's ``mesh.trust_domain``, or the SVID's
before the first policy), else ``PERMISSION_DENIED``. It is SERVING only once it has
both a policy and a certificate (:meth:`AuthzService.set_tls`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Protocol

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from authz import engine_fast
from authz.check import Checker
from authz.compiled import CompiledPolicy, compile_policy
from authz.decision_log import DecisionLog
from authz.identity.jwks_remote import JwksRegistry
from authz.identity.jwt import TokenCacheStats
from authz.metrics import AuthzMetrics
from authz.span_export import CountingBatchSpanProcessor
from authz.transport import ServerTls, TlsMaterial, peer_spiffe_ids
from meshward.policy.model import Policy

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
CHECK_METHOD = f"/{SERVICE_NAME}/Check"

#: The serving engines (``--engine``): ``auto`` resolves to one of the other two.
Engine = Literal["auto", "fast", "stock"]
ENGINES: tuple[Engine, ...] = ("auto", "fast", "stock")

#: The largest request either engine accepts; a larger one is refused by gRPC core with
#: RESOURCE_EXHAUSTED before any handler runs (grpcio's default, made explicit).
MAX_RECEIVE_MESSAGE_BYTES = 4 * 1024 * 1024
#: Channel options of both engines' servers.
SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    # Fail loudly on a port already in use instead of sharing it.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
)

_log = logging.getLogger("meshward.authz")


class ListenError(Exception):
    """The gRPC listen address cannot be bound (in use, or not an address here)."""


class EngineUnavailableError(Exception):
    """``engine="fast"`` was asked for but cannot run here (the message says why)."""


def resolve_engine(engine: str) -> Literal["fast", "stock"]:
    """The engine to run for ``engine``: ``auto`` is ``fast`` when
    :func:`~authz.engine_fast.fast_engine_unavailable` finds nothing wrong, else
    ``stock`` (one warning, with the reason). ``fast`` when unavailable raises
    :class:`EngineUnavailableError`."""
    if engine == "stock":
        return "stock"
    if engine not in ("auto", "fast"):
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    reason = engine_fast.fast_engine_unavailable()
    if reason is None:
        return "fast"
    if engine == "fast":
        raise EngineUnavailableError(
            f"the fast engine cannot run here ({reason}); use --engine stock or auto"
        )
    _log.warning(
        "fast engine unavailable; serving with the stock grpcio server",
        extra={"reason": reason},
    )
    return "stock"


class _Health(Protocol):
    """What the service needs of a health store (grpc_health's ``HealthServicer`` for
    the stock engine, :class:`authz.engine_fast.HealthStatuses` for the fast one)."""

    def set(self, service: str, status: Any) -> None: ...

    def enter_graceful_shutdown(self) -> None: ...


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


#: The Check handler a server runs: the decoded request (or :data:`_UNDECODABLE`) and
#: the call context in, the response out.
CheckHandler = Callable[
    [external_auth_pb2.CheckRequest | _Undecodable, grpc.ServicerContext],
    external_auth_pb2.CheckResponse,
]


def new_check_server(check: CheckHandler, workers: int) -> grpc.Server:
    """The stock engine: a grpcio sync server with ``check`` registered as
    ``Authorization/Check``.

    Every setting of the serving engine lives here (worker threads, channel options,
    how the handler is registered), so the bench's do-nothing baseline is served
    exactly like :class:`AuthzService`. The caller adds ports (and other services) and
    starts it.
    """
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="authz"),
        options=list(SERVER_OPTIONS),
    )
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            check,
            request_deserializer=_parse_check_request,
            response_serializer=external_auth_pb2.CheckResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    return server


def new_fast_check_server(
    check: CheckHandler, health: engine_fast.HealthStatuses | None = None
) -> engine_fast.FastServer:
    """The fast engine: ``check`` as ``Authorization/Check`` on
    :class:`authz.engine_fast.FastServer`, with the same deserializer, serializer and
    options as :func:`new_check_server` (and the health service when ``health`` is
    given). The caller adds ports and starts it; check
    :func:`~authz.engine_fast.fast_engine_unavailable` first."""
    method = engine_fast.UnaryMethod(
        _parse_check_request, check, external_auth_pb2.CheckResponse.SerializeToString
    )
    return engine_fast.FastServer({CHECK_METHOD: method}, health=health, options=SERVER_OPTIONS)


class AuthzService:
    """The ext_authz gRPC service for one policy at a time.

    Build it (``policy=None``: fail closed until the first :meth:`set_policy`),
    :meth:`start` it (returns the bound port), :meth:`set_policy` on every reload,
    :meth:`stop` on exit. Metrics live in :attr:`registry`. ``engine`` picks the
    serving engine (see the module docstring; resolved here, so :attr:`engine` is
    ``fast`` or ``stock``; raises :class:`EngineUnavailableError` for an unavailable
    ``fast``); ``workers`` only applies to the stock engine.
    """

    def __init__(
        self,
        policy: Policy | None,
        tracer: trace.Tracer,
        listen: str = "127.0.0.1:0",
        workers: int = 4,
        registry: CollectorRegistry | None = None,
        *,
        tls: ServerTls | None = None,
        decision_log: DecisionLog | None = None,
        engine: str = "auto",
        span_export: CountingBatchSpanProcessor | None = None,
    ) -> None:
        """``span_export``: the tracer's export processor, whose exported/dropped
        counters become metrics (:func:`authz.tracing.span_export_of`)."""
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        #: The engine serving calls: ``fast`` or ``stock``.
        self.engine = resolve_engine(engine)
        self.registry = registry if registry is not None else CollectorRegistry()
        self._metrics = AuthzMetrics(self.registry)
        self._listen = listen
        self._workers = workers
        self._policy = policy
        # The caller's (``meshward authz --decision-log``), else the logger; closed by stop().
        self._decision_log = decision_log if decision_log is not None else DecisionLog()
        # JWKS URLs: one registry for the process's lifetime, so a reload that keeps an
        # issuer keeps its fetcher and keys; set_policy retains only what is in use.
        self.jwks = JwksRegistry(on_fetch=self._metrics.jwks_fetched)
        #: Hits and misses of the verified-token caches of every policy served.
        self.token_cache_stats = TokenCacheStats()
        scraped = self._metrics.read_at_scrape
        scraped.token_cache = self.token_cache_stats
        scraped.spans = span_export
        log = self._decision_log
        scraped.decision_log_dropped = lambda: log.dropped
        self._policy_lock = threading.Lock()
        compiled = self._compile(policy) if policy is not None else None
        self._checker = Checker(compiled, tracer, self._metrics, self._decision_log)
        if policy is not None:
            self._metrics.policy_loaded(policy.version)
        # The stock engine's grpc_health servicer runs in its blocking mode: in the
        # default non-blocking one, set() holds its lock while it sends on every open
        # Watch stream, and a cancelled Watch's close callback (on a serving thread)
        # takes the same lock, so a set_policy racing a Watch cancel could deadlock.
        # Blocking mode only queues the update for the Watch's own thread; the price is
        # one worker thread per open Watch (health watchers are orchestrators, not
        # Envoy). The fast engine's store has neither problem.
        self._health: _Health = (
            engine_fast.HealthStatuses()
            if self.engine == "fast"
            else health.HealthServicer(experimental_non_blocking=False)
        )
        self._server: Any = None
        self._stopping = False
        self._port = 0
        self._lock = threading.RLock()
        self._tls = tls

    def _compile(self, policy: Policy) -> CompiledPolicy:
        return compile_policy(policy, jwks=self.jwks, token_cache_stats=self.token_cache_stats)

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> int:
        """Bind and start serving; returns the bound port. Raises :class:`ListenError`."""
        with self._lock:
            if self._server is not None:
                return self._port
            server = self._new_server()
            try:
                if self._tls is not None:
                    port = server.add_secure_port(self._listen, self._tls.server_credentials())
                else:
                    port = server.add_insecure_port(self._listen)
            except RuntimeError as error:
                server.stop(0)
                raise ListenError(
                    f"cannot listen on {self._listen}: address in use or not local "
                    "(choose another with --listen HOST:PORT)"
                ) from error
            if port == 0:
                server.stop(0)
                raise ListenError(f"cannot listen on {self._listen}")
            self._server = server
            self._set_health()  # before the first call can ask
            server.start()
            self._port = int(port)
            _log.info(
                "authz serving",
                extra={
                    "port": port,
                    "engine": self.engine,
                    "workers": self._engine_workers(),
                    "policy_version": self.policy_version,
                    "transport": "mtls" if self._tls is not None else "plaintext",
                },
            )
            return self._port

    def _new_server(self) -> Any:
        if isinstance(self._health, engine_fast.HealthStatuses):
            return new_fast_check_server(self._check, self._health)
        server = new_check_server(self._check, self._workers)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        return server

    def _engine_workers(self) -> int:
        """Threads serving calls: the stock pool, or the fast engine's one loop."""
        return self._workers if self.engine == "stock" else 1

    def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, stop taking calls, let in-flight ones finish (≤ grace s)."""
        with self._lock:
            server, self._server = self._server, None
            self._stopping = True
        self.jwks.close(timeout=0)  # fetcher threads are daemons: signal, don't wait
        if server is None:
            return
        self._health.enter_graceful_shutdown()
        if self.engine == "fast":
            server.stop(grace)  # returns once its loop has exited
        else:
            server.stop(grace).wait()
        self._decision_log.close()

    # -- state -------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def policy_version(self) -> str | None:
        """The version Checks are decided with; ``None`` before the first policy."""
        compiled = self._checker.policy
        return compiled.version if compiled is not None else None

    def serving(self) -> bool:
        """True while started and holding a policy, and with mTLS a certificate too
        (for ``/healthz``)."""
        return self._server is not None and self._ready()

    def _ready(self) -> bool:
        return self._checker.policy is not None and (self._tls is None or self._tls.ready)

    def set_tls(self, material: TlsMaterial) -> None:
        """Serve ``material`` (SVID + bundle) to new connections; the first one (with a
        policy) turns health to SERVING. Only for a service built with ``tls``."""
        if self._tls is None:
            raise RuntimeError("this authz service serves plaintext; build it with tls")
        self._tls.set(material)
        self._set_health()
        _log.info(
            "tls certificate loaded",
            extra={"spiffe_id": material.spiffe_id, "serial": material.serial},
        )

    def set_policy(self, policy: Policy, compiled: CompiledPolicy | None = None) -> None:
        """Swap ``policy`` in atomically (compiled here unless ``compiled`` is given);
        in-flight checks finish on the old one. A compile error leaves the old policy
        serving and propagates. The first policy turns health to SERVING.

        Calls are serialized, so one reload's JWKS :meth:`~JwksRegistry.retain` never
        stops a fetcher another reload just compiled against."""
        with self._policy_lock:
            if compiled is None:
                compiled = self._compile(policy)
            self._checker.policy = compiled
            self._policy = policy
            self.jwks.retain(policy.issuers)
        self._metrics.policy_loaded(compiled.version)
        self._set_health()
        _log.info("policy loaded", extra={"policy_version": compiled.version})

    def status(self) -> dict[str, Any]:
        """A JSON-able summary for a ``/status`` page."""
        return {
            "serving": self.serving(),
            "port": self._port,
            "engine": self.engine,
            "workers": self._engine_workers(),
            "policy_version": self.policy_version,
            "policy_files": list(self._policy.files) if self._policy is not None else [],
            "transport": self._transport_status(),
        }

    def _transport_status(self) -> dict[str, Any]:
        if self._tls is None:
            return {"mtls": False}
        material = self._tls.material
        return {
            "mtls": True,
            "spiffe_id": material.spiffe_id if material is not None else None,
            "serial": material.serial if material is not None else None,
        }

    def _set_health(self) -> None:
        """SERVING once started with a policy, NOT_SERVING before; frozen once stopping."""
        with self._lock:
            if self._stopping or self._server is None:
                return
            state = (
                health_pb2.HealthCheckResponse.SERVING
                if self._ready()
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in ("", SERVICE_NAME):
                self._health.set(name, state)

    # -- gRPC --------------------------------------------------------------------

    def _check(
        self,
        request: external_auth_pb2.CheckRequest | _Undecodable,
        context: grpc.ServicerContext,
    ) -> external_auth_pb2.CheckResponse:
        if self._tls is not None:
            self._check_peer(context)
        message = None if request is _UNDECODABLE else request
        return self._checker.check(message, context.invocation_metadata())

    def _check_peer(self, context: grpc.ServicerContext) -> None:
        """Abort with PERMISSION_DENIED unless the peer is a SPIFFE ID of the trust domain."""
        policy = self._policy
        material = self._tls.material if self._tls is not None else None
        domain = policy.mesh.trust_domain if policy is not None else None
        if domain is None and material is not None:
            domain = material.trust_domain
        ids = peer_spiffe_ids(context.auth_context())
        if domain is not None and any(i.startswith(f"spiffe://{domain}/") for i in ids):
            return
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"peer {ids[0] if ids else 'without a SPIFFE ID'} is not of trust domain {domain}",
        )
