"""The decision log: one JSON object per decision, an audit trail of every Check.

Each record (:func:`decision_record`) has stable keys — ``decision_id``, ``ts`` (RFC
3339 UTC with milliseconds), ``subject``, ``auth_method``, ``route``, ``decision``,
``matched_rule``, ``reason``, ``policy_version``, ``trace_id`` and the request and
audit fields around them; ``trace_id`` joins it to the decision span (and to Envoy's
trace when Envoy traced the request). No credentials, no headers.

Where it goes (:class:`DecisionLog`'s ``destination``):

- ``None`` (the default): the ``meshward.decision`` logger; with
  :func:`meshward.logs.setup` a JSON line on stderr whose ``decision`` key holds the
  record;
- ``"-"``: stdout, one compact JSON line per decision and nothing else;
- a file path: appended to (created 0600: the log names subjects). Before a line would
  take the file past ``max_bytes`` it is rotated by rename, ``path`` → ``path.1`` → …
  → ``path.<backups>`` (the oldest beyond that is deleted), and a new ``path`` is
  opened; a line is never split across files. A path that cannot be opened raises
  :class:`DecisionLogError` at construction; a write that fails later (disk full) is
  counted in :attr:`DecisionLog.failed`, logged once, and never affects decisions.

Writing is done by a background thread. Measured with the bench: formatting and
writing the line in the gRPC worker (a ``write`` syscall per decision, which drops and
re-takes the GIL) cut the sync server from ~2.7k to ~0.8k checks/s on 2 cores. The
worker now only builds a dict and enqueues it (bounded: when the writer falls behind by
``max_pending`` records, new ones are dropped and counted in :attr:`dropped`, rather
than letting memory grow or slowing decisions). The writer drains the queue and
writes each batch with one ``write``. :meth:`close` flushes what is queued.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TextIO

from authz.decision import Decision
from authz.request import AuthzRequest
from meshward.rotating_file import LineFollower, LinesNotWrittenError, RotatingFile

LOGGER_NAME = "meshward.decision"
#: The ``destination`` that means stdout.
STDOUT = "-"
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_BACKUPS = 5

_STOP = object()
_log = logging.getLogger("meshward.authz")


class DecisionLogError(Exception):
    """The decision log's destination cannot be written (raised at start)."""


def decision_record(
    decision: Decision, request: AuthzRequest | None, trace_id: str, ts: float
) -> dict[str, Any]:
    """The logged fields of one decision (keys always present, always in this order)."""
    return {
        "decision_id": decision.decision_id,
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
        + f".{int(ts * 1000) % 1000:03d}Z",
        "subject": decision.subject,
        "auth_method": decision.auth_method,
        "workload": decision.workload,
        "route": decision.route,
        "service": decision.service,
        "gateway": decision.gateway,
        "method": request.method if request is not None else "",
        "path": request.path if request is not None else "",
        "request_id": request.request_id if request is not None else "",
        "decision": "allow" if decision.allowed else "deny",
        "reason": decision.reason,
        "status": decision.http_status,
        "matched_rule": decision.matched_rule,
        "audit": list(decision.audit),
        "audit_outcome": decision.audit_outcome,
        "policy_version": decision.policy_version,
        "proxy_policy_version": decision.proxy_policy_version,
        "trace_id": trace_id,
    }


_QUOTE: Callable[[str], str] = json.encoder.encode_basestring_ascii


def encode_line(
    decision: Decision, request: AuthzRequest | None, trace_id: str, ts: float
) -> bytes:
    """One decision as a compact JSON line (ASCII: no byte of it can be a newline):
    :func:`decision_record`'s keys and values in its order, JSON-encoded as
    ``json.dumps(record, separators=(",", ":"))`` would (a test holds the bytes equal),
    without building the dict: a third of the cost, for the writer thread, which shares
    the serving core."""
    q = _QUOTE
    if request is not None:
        method, path, request_id = q(request.method), q(request.path), q(request.request_id)
    else:
        method = path = request_id = '""'
    audit = ",".join(q(a) for a in decision.audit)
    return (
        f'{{"decision_id":{q(decision.decision_id)},"ts":{_timestamp(ts)},'
        f'"subject":{q(decision.subject)},"auth_method":{q(decision.auth_method)},'
        f'"workload":{q(decision.workload)},"route":{q(decision.route)},'
        f'"service":{q(decision.service)},"gateway":{q(decision.gateway)},'
        f'"method":{method},"path":{path},"request_id":{request_id},'
        f'"decision":{_ALLOW if decision.allowed else _DENY},'
        f'"reason":{q(decision.reason)},"status":{int(decision.http_status)},'
        f'"matched_rule":{q(decision.matched_rule)},"audit":[{audit}],'
        f'"audit_outcome":{q(decision.audit_outcome)},'
        f'"policy_version":{q(decision.policy_version)},'
        f'"proxy_policy_version":{q(decision.proxy_policy_version)},'
        f'"trace_id":{q(trace_id)}}}\n'
    ).encode()


_ALLOW, _DENY = '"allow"', '"deny"'


@functools.lru_cache(maxsize=4)
def _second(second: int) -> str:
    """One second's formatted prefix (records of one second share it)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _timestamp(ts: float) -> str:
    """``decision_record``'s ``ts``, quoted: RFC 3339 UTC with milliseconds."""
    return f'"{_second(math.floor(ts))}.{int(ts * 1000) % 1000:03d}Z"'


class _ByteStream(Protocol):
    def write(self, data: bytes, /) -> object: ...
    def flush(self) -> object: ...


class _StreamSink:
    """Lines to a binary stream (stdout), flushed per batch; the stream is not closed."""

    def __init__(self, stream: _ByteStream, name: str) -> None:
        self.name = name
        self._stream = stream

    def write(self, lines: list[bytes]) -> None:
        try:
            self._stream.write(b"".join(lines))
            self._stream.flush()
        except OSError as error:
            raise LinesNotWrittenError(len(lines), error) from error
        except ValueError as error:  # closed stream
            raise LinesNotWrittenError(len(lines), OSError(str(error))) from error

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()


class DecisionLog:
    """Writes decision records to the logger, stdout or a rotating file (module doc).

    In logger mode it does nothing (cheaply) while INFO is disabled.
    ``background=False`` writes in the caller's thread (tests, tools).
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        destination: str | os.PathLike[str] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        background: bool = True,
        max_pending: int = 10_000,
    ) -> None:
        self._logger = logger if logger is not None else logging.getLogger(LOGGER_NAME)
        self._max_pending = max_pending
        self._sink: _StreamSink | RotatingFile | None = None
        if destination is not None and os.fspath(destination) == STDOUT:
            self._sink = _StreamSink(_binary(sys.stdout), "stdout")
        elif destination is not None:
            try:
                self._sink = RotatingFile(destination, max_bytes, backups)
            except OSError as error:
                raise DecisionLogError(
                    f"cannot write the decision log {os.fspath(destination)}: "
                    f"{error.strerror or error}; choose a writable file in an existing "
                    "directory (--decision-log PATH), or '-' for stdout"
                ) from error
        self._queue: queue.SimpleQueue[Any] | None = None
        self._thread: threading.Thread | None = None
        self._sync_lock = threading.Lock()
        self._closed = False
        self._failure_logged = False
        #: Records dropped because the writer fell ``max_pending`` behind (or came
        #: after :meth:`close`).
        self.dropped = 0
        #: Records lost because writing them failed (disk full, closed stdout, ...).
        self.failed = 0
        if background:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(
                target=self._write_loop, name="decision-log", daemon=True
            )
            self._thread.start()

    @property
    def destination(self) -> str:
        """``logger``, ``stdout`` or the file's path."""
        return self._sink.name if self._sink is not None else "logger"

    def record(
        self, decision: Decision, request: AuthzRequest | None, trace_id: str, ts: float
    ) -> None:
        if self._sink is None and not self._logger.isEnabledFor(logging.INFO):
            return
        if self._closed:
            self.dropped += 1
        elif self._queue is None:
            if self._sink is None:
                self._emit(decision_record(decision, request, trace_id, ts))
            else:
                with self._sync_lock:
                    self._write_batch([(decision, request, trace_id, ts)])
        elif self._queue.qsize() < self._max_pending:
            # The inputs are immutable: the writer thread builds the record, off the
            # Check's CPU budget (building it here cost ~15 µs per Check in the server).
            self._queue.put((decision, request, trace_id, ts))
        else:
            self.dropped += 1  # a lost count under a race is acceptable here

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, stop the writer thread and close the file."""
        if self._closed:
            return
        self._closed = True
        if self._queue is not None and self._thread is not None:
            self._queue.put(_STOP)  # the writer closes the sink when it gets here
            self._thread.join(timeout)
            if not self._thread.is_alive():
                while not self._queue.empty():  # raced in behind the stop marker
                    if self._queue.get() is not _STOP:
                        self.dropped += 1
        elif self._sink is not None:
            with self._sync_lock:
                self._sink.close()

    def _emit(self, fields: dict[str, Any]) -> None:
        self._logger.info("decision", extra={"decision": fields})

    def _write_loop(self) -> None:
        assert self._queue is not None
        pending = self._queue
        while True:
            first = pending.get()
            time.sleep(self.BATCH_WAIT)  # let a batch gather: one write per batch
            batch = [first]
            while not pending.empty():
                batch.append(pending.get())
            stop = any(item is _STOP for item in batch)
            try:
                self._write_batch([item for item in batch if item is not _STOP])
            except Exception:  # a broken handler must not kill the writer
                _log.exception("decision log write failed")
            if stop:
                if self._sink is not None:
                    self._sink.close()
                return

    #: Seconds the writer waits after the first queued record before writing the batch.
    BATCH_WAIT = 0.01

    def _write_batch(self, items: list[tuple[Decision, AuthzRequest | None, str, float]]) -> None:
        """Write ``items`` (:meth:`record`'s arguments): one line each."""
        if not items:
            return
        if self._sink is None:
            self._log_batch([decision_record(*item) for item in items])
            return
        try:
            self._sink.write([encode_line(*item) for item in items])
        except LinesNotWrittenError as failure:
            self.failed += failure.unwritten
            if not self._failure_logged:
                self._failure_logged = True
                _log.error(
                    "decision log write failed; decisions continue, lost records are "
                    "counted (logged once)",
                    extra={"destination": self._sink.name, "error": str(failure.error)},
                )

    def _log_batch(self, items: list[dict[str, Any]]) -> None:
        """Emit ``items`` through the logger's handlers as :meth:`logging.Logger.handle`
        would, except that plain stream handlers get the whole batch in one write."""
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO) or logger.disabled:
            return
        records = [
            logger.makeRecord(
                logger.name, logging.INFO, __file__, 0, "decision", (), None,
                extra={"decision": fields},
            )
            for fields in items
        ]  # fmt: skip
        records = [r for r in records if logger.filter(r)]
        for handler in _handlers(logger):
            if not isinstance(handler, logging.StreamHandler) or type(handler).emit not in (
                logging.StreamHandler.emit,
                logging.FileHandler.emit,
            ):
                for record in records:
                    if record.levelno >= handler.level:
                        handler.handle(record)
                continue
            lines = [
                handler.format(r) + handler.terminator
                for r in records
                if r.levelno >= handler.level and handler.filter(r)
            ]
            if not lines:
                continue
            with handler.lock:  # type: ignore[union-attr]
                stream = handler.stream
                if stream is None and isinstance(handler, logging.FileHandler):
                    stream = handler.stream = handler._open()
                stream.write("".join(lines))
                stream.flush()


def _binary(stream: TextIO) -> _ByteStream:
    """The byte stream under a text stream (stdout)."""
    buffer: _ByteStream | None = getattr(stream, "buffer", None)
    if buffer is not None:
        stream.flush()  # keep order with anything already written as text
        return buffer
    return _TextAsBinary(stream)


class _TextAsBinary:
    """Adapts a text-only stream (a test's StringIO) to the two calls the sink makes."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, data: bytes) -> int:
        return self._stream.write(data.decode())

    def flush(self) -> None:
        self._stream.flush()


def _handlers(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers a record to ``logger`` reaches (its own, then its parents')."""
    found: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        found.extend(current.handlers)
        if not current.propagate:
            break
        current = current.parent
    if not found and logging.lastResort is not None:
        found.append(logging.lastResort)
    return found


class DecisionLogFollower:
    """Hands each line appended to a decision-log file to ``on_line``, across rotations.

    For ``meshward up``'s console: it starts at the file's current end (or at the start
    of a file that appears later) and polls every ``interval`` seconds.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        on_line: Callable[[str], None],
        interval: float = 0.2,
    ) -> None:
        self.path = Path(path)
        self._on_line = on_line
        self._interval = interval
        self._stop = threading.Event()
        self._lines = LineFollower(self.path)
        self._thread = threading.Thread(target=self._run, name="decision-follow", daemon=True)

    def start(self) -> None:
        with contextlib.suppress(OSError):
            self._lines.start(from_end=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._lines.close()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.poll()
            except Exception as error:  # a display problem must never stop the follower
                _log.warning("cannot follow the decision log", extra={"error": str(error)})

    def poll(self) -> None:
        """Read what was appended since the last poll (also switching to a new file)."""
        for line in self._lines.poll():
            self._on_line(line.decode("utf-8", "replace"))
