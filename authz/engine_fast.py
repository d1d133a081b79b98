"""The fast serving engine: one thread serving every call on grpcio's completion queue.

Why single-threaded
-------------------
A Check costs a few µs of Python; grpcio's stock sync server spends ~250-350 µs of
CPU around it (DESIGN.md, "Python speed"): its polling thread hands each call to a pool
worker and the worker hands every batch back, so one call is several thread wake-ups
and GIL hand-offs. The handler is short, CPU-bound and holds the GIL anyway, so more
threads only add contention. :class:`FastServer` polls one completion queue on one
thread and runs each handler right there, between two polls: no hand-off at all
(bench/authz_bench.py on 2 cores: ~1.6x the stock server's throughput serving a
do-nothing Check at half its CPU per call, ~1.3-1.5x with meshward's decisions,
whose own work then dominates). It relies on the handler never blocking: the
:class:`authz.check.Checker` already leaves span export and decision-log writes to
background threads.

The protocol of a unary call (three completions on the queue)
--------------------------------------------------------------
1. ``request_call`` completes: a new call with its method, deadline and metadata. The
   loop asks core for the next call at once (one request is always outstanding), then
   starts a batch that receives the one request message.
2. The message arrives: the handler runs and one batch sends initial metadata, the
   response and the status, and receives the close.
3. That batch completes: the call is over; dropping the tag releases it.

Unknown methods get ``UNIMPLEMENTED`` in one batch, as the stock server answers them.

What core does for us, and what can go wrong
---------------------------------------------
* A request larger than ``grpc.max_receive_message_length``: core fails the receive
  (no message) and answers ``RESOURCE_EXHAUSTED`` itself; the loop only drops the call.
* Deadlines: a call whose deadline passed before the loop got to its message (it was
  busy) is **not decided**: nobody waits for the answer (Envoy has failed the request
  closed already), so a decision would only be a span and a decision-log line for a
  verdict that was never enforced. The loop cancels it with ``DEADLINE_EXCEEDED`` and
  counts it (:attr:`FastServer.expired`). If the deadline passes while the response
  is on its way, core drops the response; the batch completes either way.
* A client that cancels: its pending batch completes with ``success=False`` (or a
  later one does); the loop never raises on a dead call, and an exception in a handler
  becomes ``UNKNOWN`` for that call only, as in the stock server.

Health
------
``grpc.health.v1.Health/Check`` and ``/Watch`` are served from
:class:`HealthStatuses` with grpc_health's semantics (unknown service: ``NOT_FOUND`` for
Check, ``SERVICE_UNKNOWN`` for Watch). Status changes come from other threads
(``set_policy``, ``set_tls``, stop) and cygrpc's sync API has no cross-thread wake-up,
so while any Watch is open the loop polls with a short timeout (:data:`WATCH_TICK`)
and sends each stream its service's status when it changed. One send is in flight per
stream; states that change faster than the stream drains coalesce to the latest (as
grpc_health's own blocking watcher does). A Watch ends when the client cancels it, or
at stop: after the final (``NOT_SERVING``) status, with ``UNAVAILABLE``.

Stop
----
:meth:`FastServer.stop` (any thread) calls ``server.shutdown`` with a tag: core stops
accepting calls and fails the outstanding ``request_call``, which wakes the loop. Calls
already received finish normally (a Check is handled synchronously on the loop, so
"in flight" means accepted but not yet answered); open Watches are ended. Core
delivers the shutdown tag once no call is left; the loop then waits for its last
completions, destroys the server, shuts the queue down, drains it and exits. If that
takes longer than ``grace`` seconds, ``cancel_all_calls`` ends whatever is left.
``stop`` returns when the loop thread has exited.

The private-API guard
---------------------
``grpc._cython.cygrpc`` is grpcio's private Cython layer: nothing promises it stays the
same between releases. :func:`fast_engine_unavailable` checks, once per process and at
run time, that every name used here exists with the parameters used here, then serves a
real loopback call, a health Check, a Watch and an unknown method through a
:class:`FastServer` and stops it; any difference is the reason returned, and the
caller falls back to the stock server (``--engine auto``) or refuses to start
(``--engine fast``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, NoReturn

import grpc
from grpc_health.v1 import health_pb2

_log = logging.getLogger("meshward.authz")

try:
    from grpc._cython import cygrpc as _cygrpc_module

    _IMPORT_ERROR: str | None = None
except ImportError as _error:  # pragma: no cover - depends on the installed grpcio
    _cygrpc_module = None
    _IMPORT_ERROR = f"cannot import grpc._cython.cygrpc: {_error}"

#: grpcio's private, untyped Cython module: the one place it is treated as ``Any``.
cygrpc: Any = _cygrpc_module

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
_HEALTH_CHECK = HEALTH_CHECK.encode()  # core reports method names as bytes
_HEALTH_WATCH = HEALTH_WATCH.encode()
#: Poll timeout while a health Watch is open: the longest a status change waits.
WATCH_TICK = 0.02
#: Poll timeout otherwise (nothing is due on a timer; this only bounds a missed wake-up).
IDLE_TICK = 0.25
#: How long :meth:`FastServer.stop` waits for the loop after cancelling every call.
CANCEL_WAIT = 5.0

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class FastEngineUnavailableError(RuntimeError):
    """The installed grpcio cannot run the fast engine (the message says why)."""


class AbortCallError(Exception):
    """Raised by :meth:`CallContext.abort`: the call ends with this status, no response."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class UnaryMethod(NamedTuple):
    """A unary method: request bytes → ``deserialize`` → ``handler(request, context)``
    → ``serialize`` → response bytes. A ``deserialize`` that raises gets ``INTERNAL``."""

    deserialize: Callable[[bytes], Any]
    handler: Callable[[Any, Any], Any]
    serialize: Callable[[Any], bytes]


class CallContext:
    """What a handler sees of its call: the part of ``grpc.ServicerContext`` that authz
    uses, so the stock server's handlers run unchanged."""

    __slots__ = ("_call", "_deadline", "_metadata")

    def __init__(self, call: Any, metadata: Any, deadline: float) -> None:
        self._call = call
        self._metadata = metadata
        self._deadline = deadline

    def invocation_metadata(self) -> Any:
        """The call's metadata, as grpcio's ServicerContext returns it."""
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        """The transport's auth properties (peer certificate SANs with mTLS)."""
        raw = cygrpc.auth_context(self._call)
        return {key.decode(): list(values) for key, values in (raw or {}).items()}

    def peer(self) -> str:
        return str(self._call.peer().decode())

    def time_remaining(self) -> float:
        return max(self._deadline - time.time(), 0.0)

    def is_active(self) -> bool:
        return True  # a handler only ever runs for a live call, synchronously

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        """End the call with ``code`` and ``details`` instead of a response."""
        raise AbortCallError(code, details)


class HealthStatuses:
    """Service name → ``HealthCheckResponse`` status, safe to set from any thread.

    The same API as grpc_health's ``HealthServicer`` (:meth:`set`,
    :meth:`enter_graceful_shutdown`), without its threads: :class:`FastServer` serves
    it. :attr:`version` changes with every change of any status (no change: no bump).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._statuses: dict[str, int] = {}
        self._frozen = False
        #: Bumped on every change; the loop compares it to decide whether to notify.
        self.version = 0

    def set(self, service: str, status: int) -> None:
        """Set ``service``'s status (ignored once shutting down)."""
        with self._lock:
            if self._frozen or self._statuses.get(service) == status:
                return
            self._statuses[service] = status
            self.version += 1

    def get(self, service: str) -> int | None:
        """The status of ``service``; ``None`` for a service never set."""
        with self._lock:
            return self._statuses.get(service)

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on; later :meth:`set` calls are ignored."""
        with self._lock:
            if self._frozen:
                return
            for service in self._statuses:
                self._statuses[service] = _NOT_SERVING
            self._frozen = True
            self.version += 1


def _health_check(request: health_pb2.HealthCheckRequest, health: HealthStatuses) -> Any:
    status = health.get(request.service)
    if status is None:
        raise AbortCallError(grpc.StatusCode.NOT_FOUND, "")
    return health_pb2.HealthCheckResponse(status=status)


# -- tags: what each completion on the queue belongs to ------------------------------


class _Marker:
    """A tag that needs no state (a new call, a finished call, the server shutdown)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_NEW_CALL = _Marker("new call")
_FINISHED = _Marker("finished call")
_SHUTDOWN = _Marker("server shutdown")


class _Unary:
    """A unary call waiting for its request message."""

    __slots__ = ("call", "deadline", "metadata", "method")

    def __init__(self, call: Any, method: UnaryMethod, deadline: float, metadata: Any) -> None:
        self.call = call
        self.method = method
        self.deadline = deadline
        self.metadata = metadata


class _Watch:
    """One open health Watch stream."""

    __slots__ = ("call", "closed", "ending", "finished", "sending", "sent", "service")

    def __init__(self, call: Any) -> None:
        self.call = call
        self.service = ""
        self.sent: int | None = None  # the last status sent (None: nothing yet)
        self.sending = False  # a send batch is in flight
        self.closed = False  # the call is over (client cancel, or our final status)
        self.ending = False  # the server is stopping: finish after the latest status
        self.finished = False  # the final status was sent


class _WatchStep:
    """A completion of one of a Watch's batches."""

    __slots__ = ("step", "watch")

    RECEIVED, SENT, CLOSED = 0, 1, 2

    def __init__(self, watch: _Watch, step: int) -> None:
        self.watch = watch
        self.step = step


# -- the engine ----------------------------------------------------------------------


class FastServer:
    """A gRPC server whose calls are all served by one thread polling one completion
    queue (see the module docstring for the protocol).

    ``methods`` maps full method names (``/package.Service/Method``) to unary handlers;
    with ``health`` it also serves ``grpc.health.v1.Health`` from it. The surface
    mirrors ``grpc.Server`` where it can: add ports, :meth:`start`, :meth:`stop`
    (which, unlike grpcio's, blocks until the loop thread has exited).
    """

    def __init__(
        self,
        methods: Mapping[str, UnaryMethod],
        *,
        health: HealthStatuses | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if cygrpc is None:
            raise FastEngineUnavailableError(_IMPORT_ERROR or "grpc._cython.cygrpc is missing")
        self._methods: dict[bytes, UnaryMethod] = {
            name.encode(): method for name, method in methods.items()
        }
        self._health = health
        self._health_method: UnaryMethod | None = None
        if health is not None:
            self._health_method = UnaryMethod(
                health_pb2.HealthCheckRequest.FromString,
                lambda request, _context: _health_check(request, health),
                health_pb2.HealthCheckResponse.SerializeToString,
            )
        self._cq = cygrpc.CompletionQueue()
        self._server = cygrpc.Server(tuple(options), False)
        self._server.register_completion_queue(self._cq)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._exited = threading.Event()
        self._stop_requested = False  # set by stop() (any thread), read by the loop
        self._destroyed = False
        # Loop-thread state only:
        self._due = 0  # tags handed to core whose completion has not arrived yet
        self._shutdown_seen = False
        self._ending = False
        self._watchers: set[_Watch] = set()
        self._health_version = -1
        #: Calls whose deadline had passed before they could be decided (not decided).
        self.expired = 0

    # -- lifecycle -----------------------------------------------------------------

    def add_insecure_port(self, address: str) -> int:
        """Listen in plaintext on ``address``; returns the port. Raises RuntimeError."""
        return self._add_port(address, None)

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        """Listen with TLS on ``address``: the very ``grpc.ServerCredentials`` the stock
        server takes (static or dynamic, so certificate rotation works the same)."""
        return self._add_port(address, credentials._credentials)

    def _add_port(self, address: str, credentials: Any) -> int:
        port = int(self._server.add_http2_port(address.encode(), credentials))
        if port == 0:
            raise RuntimeError(f"Failed to bind to address {address}")
        return port

    def start(self) -> None:
        """Start serving on a new thread (``authz-fast``)."""
        with self._lock:
            if self._thread is not None or self._destroyed:
                raise RuntimeError("the fast server can be started once")
            self._server.start()
            self._request_call()
            self._thread = threading.Thread(target=self._run, name="authz-fast", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        """True from :meth:`start` until the loop thread has exited."""
        return self._thread is not None and not self._exited.is_set()

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let received ones finish for up to ``grace`` seconds
        (``None``: none), cancel the rest; returns once the loop thread has exited."""
        with self._lock:
            thread = self._thread
            if thread is None:  # never started: only the core server to release
                if not self._destroyed:
                    self._destroyed = True
                    self._server.destroy()
                return
            if not self._stop_requested:
                self._stop_requested = True
                self._server.shutdown(self._cq, _SHUTDOWN)
        if grace is None or not self._exited.wait(max(grace, 0.0)):
            with self._lock:
                if not self._destroyed:
                    self._server.cancel_all_calls()
            if not self._exited.wait(CANCEL_WAIT):
                _log.error("fast engine: the serving loop did not exit after cancelling calls")
        thread.join(timeout=1.0)

    # -- the loop ------------------------------------------------------------------

    def _run(self) -> None:
        poll = self._cq.poll
        operation_complete = cygrpc.CompletionType.operation_complete
        queue_shutdown = cygrpc.CompletionType.queue_shutdown
        health = self._health
        try:
            while not (self._shutdown_seen and self._due == 0):
                tick = WATCH_TICK if self._watchers else IDLE_TICK
                event = poll(time.time() + tick)
                kind = event.completion_type
                if kind == operation_complete:
                    self._due -= 1
                    tag = event.tag
                    try:
                        if tag is _FINISHED:
                            pass
                        elif type(tag) is _Unary:
                            self._on_request(tag, event)
                        elif tag is _NEW_CALL:
                            self._on_new_call(event)
                        elif type(tag) is _WatchStep:
                            self._on_watch(tag, event)
                        elif tag is _SHUTDOWN:  # handed to core by stop(): never in _due
                            self._due += 1
                            self._shutdown_seen = True
                    except Exception:
                        _log.exception("fast engine: handling a completion failed")
                elif kind == queue_shutdown:  # only after _close(); not expected here
                    break
                if self._stop_requested and not self._ending:
                    self._begin_ending()
                if health is not None and health.version != self._health_version:
                    self._push_health(health)
                event = None  # drop the last call's references before blocking again
        except Exception:
            _log.exception("fast engine: the serving loop failed")
        finally:
            self._close()
            self._exited.set()

    def _close(self) -> None:
        """Release the core server and drain the queue (loop thread, at exit)."""
        with self._lock:
            if self._shutdown_seen and not self._destroyed:
                self._destroyed = True
                self._server.destroy()
        if not self._shutdown_seen:
            return  # the loop failed: leave core alone rather than block on it
        self._cq.shutdown()
        queue_shutdown = cygrpc.CompletionType.queue_shutdown
        while self._cq.poll().completion_type != queue_shutdown:
            pass

    def _start_batch(self, call: Any, operations: tuple[Any, ...], tag: object) -> bool:
        if call.start_server_batch(operations, tag) != 0:  # the call is already over
            return False
        self._due += 1
        return True

    def _request_call(self) -> None:
        if self._stop_requested:
            return
        try:
            error = self._server.request_call(self._cq, self._cq, _NEW_CALL)
        except ValueError:  # stop() began the shutdown meanwhile (another thread)
            return
        if error == 0:
            self._due += 1
        else:
            _log.error("fast engine: request_call failed", extra={"call_error": int(error)})

    def _on_new_call(self, event: Any) -> None:
        self._request_call()  # always one request outstanding, before anything slow
        if not event.success:  # the server is shutting down
            return
        call = event.call
        details = event.call_details
        method = self._methods.get(details.method)
        if method is None and self._health_method is not None:
            if details.method == _HEALTH_CHECK:
                method = self._health_method
            elif details.method == _HEALTH_WATCH:
                step = _WatchStep(_Watch(call), _WatchStep.RECEIVED)
                self._start_batch(call, (cygrpc.ReceiveMessageOperation(0),), step)
                return
        if method is None:
            self._finish(call, cygrpc.StatusCode.unimplemented, b"Method not found!")
            return
        self._start_batch(
            call,
            (cygrpc.ReceiveMessageOperation(0),),
            _Unary(call, method, details.deadline, event.invocation_metadata),
        )

    def _on_request(self, pending: _Unary, event: Any) -> None:
        """The request message of a unary call arrived (or the receive failed)."""
        call = pending.call
        data = event.batch_operations[0].message()
        if data is None:
            if event.success:  # the client closed without sending a message
                self._finish(
                    call,
                    cygrpc.StatusCode.unimplemented,
                    b"the method requires exactly one request message",
                )
            return  # cancelled, or too large: core has answered the client already
        if pending.deadline <= time.time():
            self.expired += 1
            call.cancel(cygrpc.StatusCode.deadline_exceeded, b"Deadline Exceeded")
            return
        method = pending.method
        try:
            request = method.deserialize(data)
        except Exception:
            self._finish(call, cygrpc.StatusCode.internal, b"Exception deserializing request!")
            return
        try:
            response = method.serialize(
                method.handler(request, CallContext(call, pending.metadata, pending.deadline))
            )
        except AbortCallError as abort:
            self._finish(call, abort.code.value[0], abort.details.encode())
            return
        except Exception as error:
            _log.exception("fast engine: the handler failed")
            self._finish(
                call,
                cygrpc.StatusCode.unknown,
                f"Exception calling application: {error}".encode(),
            )
            return
        self._start_batch(
            call,
            (
                cygrpc.SendInitialMetadataOperation((), 0),
                cygrpc.SendMessageOperation(response, 0),
                cygrpc.SendStatusFromServerOperation((), cygrpc.StatusCode.ok, b"", 0),
                cygrpc.ReceiveCloseOnServerOperation(0),
            ),
            _FINISHED,
        )

    def _finish(self, call: Any, code: Any, details: bytes) -> None:
        """End ``call`` with a status and no response."""
        self._start_batch(
            call,
            (
                cygrpc.SendInitialMetadataOperation((), 0),
                cygrpc.SendStatusFromServerOperation((), code, details, 0),
                cygrpc.ReceiveCloseOnServerOperation(0),
            ),
            _FINISHED,
        )

    # -- health Watch streams ------------------------------------------------------

    def _on_watch(self, tag: _WatchStep, event: Any) -> None:
        watch = tag.watch
        if tag.step == _WatchStep.SENT:
            watch.sending = False
            if not event.success:
                self._drop(watch)
            else:
                self._advance(watch)
        elif tag.step == _WatchStep.CLOSED:
            self._drop(watch)
        else:
            self._on_watch_request(watch, event)

    def _on_watch_request(self, watch: _Watch, event: Any) -> None:
        data = event.batch_operations[0].message()
        if data is None:
            if event.success:
                self._finish(
                    watch.call,
                    cygrpc.StatusCode.unimplemented,
                    b"the method requires exactly one request message",
                )
            return
        try:
            watch.service = health_pb2.HealthCheckRequest.FromString(data).service
        except Exception:
            self._finish(
                watch.call, cygrpc.StatusCode.internal, b"Exception deserializing request!"
            )
            return
        closed = _WatchStep(watch, _WatchStep.CLOSED)
        if not self._start_batch(watch.call, (cygrpc.ReceiveCloseOnServerOperation(0),), closed):
            return
        watch.ending = self._ending
        self._watchers.add(watch)
        self._advance(watch)

    def _advance(self, watch: _Watch) -> None:
        """Send ``watch`` its service's status if it changed; when ending and up to
        date, its final status. One batch in flight per stream."""
        if watch.sending or watch.closed or watch.finished or self._health is None:
            return
        status = self._health.get(watch.service)
        if status is None:
            status = _SERVICE_UNKNOWN
        sent = _WatchStep(watch, _WatchStep.SENT)
        if status != watch.sent:
            message = cygrpc.SendMessageOperation(
                health_pb2.HealthCheckResponse(status=status).SerializeToString(), 0
            )
            operations: tuple[Any, ...] = (message,)
            if watch.sent is None:
                operations = (cygrpc.SendInitialMetadataOperation((), 0), message)
            if self._start_batch(watch.call, operations, sent):
                watch.sending = True
                watch.sent = status
            else:
                self._drop(watch)
        elif watch.ending:
            final = cygrpc.SendStatusFromServerOperation(
                (), cygrpc.StatusCode.unavailable, b"server stopping", 0
            )
            watch.finished = True
            watch.sending = self._start_batch(watch.call, (final,), sent)

    def _drop(self, watch: _Watch) -> None:
        watch.closed = True
        self._watchers.discard(watch)

    def _push_health(self, health: HealthStatuses) -> None:
        self._health_version = health.version  # read first: a later change is seen next
        for watch in list(self._watchers):
            self._advance(watch)

    def _begin_ending(self) -> None:
        self._ending = True
        for watch in list(self._watchers):
            watch.ending = True
            self._advance(watch)


# -- the guard -----------------------------------------------------------------------

#: Every cygrpc name the engine uses (``a.b``: attribute ``b`` of ``a``).
_REQUIRED_NAMES = (
    "CompletionQueue",
    "Server",
    "Call",
    "ServerCredentials",
    "auth_context",
    "ReceiveMessageOperation",
    "SendInitialMetadataOperation",
    "SendMessageOperation",
    "SendStatusFromServerOperation",
    "ReceiveCloseOnServerOperation",
    "CompletionType.operation_complete",
    "CompletionType.queue_timeout",
    "CompletionType.queue_shutdown",
    "StatusCode.ok",
    "StatusCode.unimplemented",
    "StatusCode.internal",
    "StatusCode.unknown",
    "StatusCode.unavailable",
    "StatusCode.deadline_exceeded",
)
#: The parameters the engine passes, for every method whose signature Cython exposes.
_REQUIRED_SIGNATURES: dict[str, tuple[str, ...]] = {
    "Server.register_completion_queue": ("self", "queue"),
    "Server.add_http2_port": ("self", "address", "server_credentials"),
    "Server.start": ("self", "backup_queue"),
    "Server.request_call": ("self", "call_queue", "server_queue", "tag"),
    "Server.shutdown": ("self", "queue", "tag"),
    "Server.cancel_all_calls": ("self",),
    "Server.destroy": ("self",),
    "CompletionQueue.poll": ("self", "deadline"),
    "CompletionQueue.shutdown": ("self",),
    "Call.start_server_batch": ("self", "operations", "tag"),
    "Call.cancel": ("self", "error_code", "details"),
    "Call.peer": ("self",),
    "ReceiveMessageOperation.message": ("self",),
    "auth_context": ("call",),
}


def _lookup(dotted: str) -> Any:
    value = cygrpc
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _api_problem() -> str | None:
    """What is missing or different in cygrpc, if anything."""
    if cygrpc is None:
        return _IMPORT_ERROR or "grpc._cython.cygrpc is missing"
    missing = []
    for name in (*_REQUIRED_NAMES, *_REQUIRED_SIGNATURES):
        try:
            _lookup(name)
        except AttributeError:
            missing.append(name)
    if missing:
        return f"grpc._cython.cygrpc lacks {', '.join(missing)}"
    for name, wanted in _REQUIRED_SIGNATURES.items():
        try:
            parameters = tuple(inspect.signature(_lookup(name)).parameters)
        except (TypeError, ValueError):
            continue  # not introspectable: the smoke test below exercises it
        if parameters != wanted:
            return f"grpc._cython.cygrpc.{name} takes {parameters}, not {wanted}"
    if not hasattr(grpc.insecure_server_credentials(), "_credentials"):
        return "grpc.ServerCredentials has no _credentials"
    return None


_SMOKE_METHOD = "/meshward.engine.Smoke/Echo"


def _smoke_handler(request: bytes, context: Any) -> bytes:
    metadata = dict(context.invocation_metadata())
    auth = context.auth_context()
    if metadata.get("x-smoke") != "1" or auth.get("transport_security_type") != [b"insecure"]:
        raise AbortCallError(grpc.StatusCode.FAILED_PRECONDITION, "metadata or auth context")
    return b"echo:" + request


def _smoke_test() -> str | None:
    """Serve real loopback calls through a :class:`FastServer`; the first failure."""
    health = HealthStatuses()
    health.set("", _SERVING)
    server = FastServer(
        {_SMOKE_METHOD: UnaryMethod(bytes, _smoke_handler, bytes)},
        health=health,
        options=[("grpc.so_reuseport", 0)],
    )
    try:
        port = server.add_secure_port("127.0.0.1:0", grpc.insecure_server_credentials())
    except RuntimeError as error:
        server.stop()
        return f"cannot listen on loopback: {error}"
    server.start()
    problem: str | None = None
    options = [("grpc.use_local_subchannel_pool", 1)]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            echo = channel.unary_unary(_SMOKE_METHOD)
            if echo(b"ping", metadata=(("x-smoke", "1"),), timeout=5) != b"echo:ping":
                problem = "the smoke call got a wrong response"
            request = health_pb2.HealthCheckRequest(service="").SerializeToString()
            reply = channel.unary_unary(HEALTH_CHECK)(request, timeout=5)
            if health_pb2.HealthCheckResponse.FromString(reply).status != _SERVING:
                problem = "the smoke health Check got a wrong status"
            watch = channel.unary_stream(HEALTH_WATCH)(request, timeout=5)
            first = health_pb2.HealthCheckResponse.FromString(next(watch))
            watch.cancel()
            if first.status != _SERVING:
                problem = "the smoke health Watch got a wrong status"
            try:
                channel.unary_unary("/meshward.engine.Smoke/Missing")(b"", timeout=5)
                problem = "an unknown method was answered"
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                    problem = f"an unknown method got {error.code()}, not UNIMPLEMENTED"
    except grpc.RpcError as error:
        problem = f"the smoke call failed: {error.code()} {error.details()}"
    except Exception as error:
        problem = f"the smoke call failed: {error!r}"
    finally:
        server.stop(1.0)
    if problem is None and server.running:
        problem = "the serving loop did not stop"
    return problem


@functools.cache
def _probe() -> str | None:
    problem = _api_problem()
    if problem is None:
        try:
            problem = _smoke_test()
        except Exception as error:  # any surprise from the private API means "no"
            problem = f"the smoke test failed: {error!r}"
    if problem is not None:
        return f"grpcio {grpc.__version__}: {problem}"
    return None


def fast_engine_unavailable() -> str | None:
    """Why the fast engine cannot run with the installed grpcio, or ``None`` if it can.

    Checked once per process, at run time (never assumed from a version number): the
    cygrpc names and parameters this module uses, then a smoke test over loopback.
    """
    return _probe()
