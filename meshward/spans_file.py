"""The spans file: received spans as JSON lines on disk, written, read back and tailed.

``meshward otlp-receiver`` appends one line per span (:meth:`ReceivedSpan.to_json_line`:
``service``, ``name``, ``trace_id``, ``span_id``, ``parent_span_id``, ``kind``,
``start_ns``, ``end_ns``, ``status_code``, ``attributes``); ``meshward traces`` and
``meshward up --traces`` read it back. The format is the contract between them, so the
encoder, the decoder and the rotation scheme live here together.

Rotation is the decision log's (:mod:`authz.decision_log`): before a line would take
the file past ``max_bytes`` it is renamed ``path`` → ``path.1`` → … → ``path.<backups>``
and a new ``path`` is created (0600: spans name subjects). A line is never split across
files and each batch is one ``write`` with no user-space buffer, so a reader sees a
span as soon as the receiver has it. Readers tolerate a torn last line (held back until
its newline arrives) and lines that are not spans (skipped and counted).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meshward.rotating_file import LineFollower, LinesNotWrittenError, RotatingFile

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_BACKUPS = 3


def spans_file_path(state_dir: Path) -> Path:
    """Where ``meshward up``'s built-in receiver writes spans under its state directory."""
    return state_dir / "logs" / "spans.jsonl"


class SpansFileError(Exception):
    """The spans file cannot be opened, written or read (message names the path and fix)."""


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, flattened: ids as lowercase hex, attributes as Python values."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int

    def to_json_line(self) -> bytes:
        """The span as one compact JSON line (bytes attribute values become hex)."""
        return json.dumps(asdict(self), separators=(",", ":"), default=_jsonable).encode() + b"\n"

    @classmethod
    def from_json(cls, data: Any) -> ReceivedSpan:
        """Decode one spans-file record; :class:`ValueError` when it is not a span."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        try:
            span = cls(
                service=_typed(data, "service", str),
                name=_typed(data, "name", str),
                trace_id=_typed(data, "trace_id", str),
                span_id=_typed(data, "span_id", str),
                parent_span_id=_typed(data, "parent_span_id", str),
                kind=_typed(data, "kind", int),
                start_ns=_typed(data, "start_ns", int),
                end_ns=_typed(data, "end_ns", int),
                attributes=_typed(data, "attributes", dict),
                status_code=_typed(data, "status_code", int),
            )
        except KeyError as missing:
            raise ValueError(f"no {missing} field") from None
        if not span.trace_id or not span.span_id:
            raise ValueError("empty trace_id or span_id")
        return span


def _typed(data: dict[str, Any], key: str, kind: type[Any]) -> Any:
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"field {key!r} is not a {kind.__name__}")
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    return str(value)


def parse_line(line: bytes | str) -> ReceivedSpan | None:
    """The span on one line, or ``None`` for a blank line or one that is not a span."""
    if not line.strip():
        return None
    try:
        return ReceivedSpan.from_json(json.loads(line))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


class SpansFileWriter:
    """Appends spans to ``path`` as JSON lines, rotating by size
    (:class:`~meshward.rotating_file.RotatingFile`); thread-safe.

    Raises :class:`SpansFileError` at construction when ``path`` cannot be opened.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
    ) -> None:
        if max_bytes < 1:
            raise SpansFileError(f"--max-bytes must be at least 1, not {max_bytes}")
        if backups < 0:
            raise SpansFileError(f"--backups must be 0 or more, not {backups}")
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._file = RotatingFile(self.path, max_bytes, backups)
        except OSError as error:
            raise SpansFileError(
                f"cannot write the spans file {self.path}: {error.strerror or error}; "
                "choose a writable file in an existing directory (--spans-file PATH)"
            ) from error

    def write(self, spans: Iterable[ReceivedSpan]) -> None:
        """Append ``spans`` (raises :class:`OSError` when the disk refuses them)."""
        lines = [span.to_json_line() for span in spans]
        with self._lock:
            if self._closed:
                raise OSError(f"the spans file {self.path} is closed")
            if not lines:
                return
            try:
                self._file.write(lines)
            except LinesNotWrittenError as failure:
                raise failure.error from failure

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._file.close()


def generations(path: Path) -> list[Path]:
    """``path`` and its rotated predecessors that exist, newest first."""
    found = [path] if path.exists() else []
    index = 1
    while (older := Path(f"{path}.{index}")).exists():
        found.append(older)
        index += 1
    return found


def _unreadable(path: Path, error: OSError) -> SpansFileError:
    return SpansFileError(
        f"cannot read the spans file {path}: {error.strerror or error}; "
        "give a readable spans file with --spans-file PATH"
    )


def read_spans(
    path: Path, skipped: list[int] | None = None, *, limit: int | None = None
) -> Iterator[ReceivedSpan]:
    """Every span in one file (in its first ``limit`` bytes when given), in file order.
    Lines that are not spans are skipped and counted in ``skipped[0]`` when given.
    Raises :class:`SpansFileError`."""
    try:
        handle = path.open("rb")
    except OSError as error:
        raise _unreadable(path, error) from error
    with handle:
        consumed = 0
        try:
            for line in handle:
                consumed += len(line)
                if limit is not None and consumed > limit:
                    break
                span = parse_line(line)
                if span is not None:
                    yield span
                elif line.strip() and skipped is not None:
                    skipped[0] += 1
        except OSError as error:  # EISDIR surfaces on the first read
            raise _unreadable(path, error) from error


class SpansFollower:
    """Returns the spans appended to ``path`` since the last :meth:`poll`, across rotations.

    It starts at the current end of the file (``from_end``) or at its start; a file that
    appears later is read from its start. On rotation it finishes the old file before
    switching to the new one; a file truncated in place is read again from its start
    (:class:`~meshward.rotating_file.LineFollower`).
    """

    def __init__(self, path: Path, *, from_end: bool = True) -> None:
        self.path = path
        self.skipped = 0
        self._lines = LineFollower(path)
        try:
            self._lines.start(from_end=from_end)
        except OSError as error:
            raise _unreadable(path, error) from error

    @property
    def offset(self) -> int:
        """How far into the current file the follower has read (0 before it exists)."""
        return self._lines.offset

    def poll(self) -> list[ReceivedSpan]:
        try:
            lines = self._lines.poll()
        except OSError as error:  # EISDIR surfaces on the first read
            raise _unreadable(self.path, error) from error
        out = []
        for line in lines:
            span = parse_line(line)
            if span is not None:
                out.append(span)
            elif line.strip():
                self.skipped += 1
        return out

    def close(self) -> None:
        self._lines.close()
