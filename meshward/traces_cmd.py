"""``meshward traces``: the spans the built-in OTLP receiver wrote, one tree per request.

It reads the spans file (``--spans-file``, else the one ``meshward up`` writes:
``spans_file`` in ``<state-dir>/up.json``, else ``<state-dir>/logs/spans.jsonl``) and
prints the most recent ``--last`` traces as trees (:mod:`meshward.traces`). With
``--follow`` it then tails the file, across rotations, and prints each new trace once
no span of it has arrived for ``--quiet-seconds``; a span arriving later reprints its
trace, marked as updated. ``meshward up --traces`` uses the same tail
(:class:`TraceTail`).

Reading history costs memory for the traces shown, not for the whole file: a first
pass finds each trace's start, a second collects only the chosen traces' spans. The
current file and the previous generation are always read (a trace may straddle a
rotation); older generations only while fewer than ``--last`` traces were found.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshward.spans_file import (
    ReceivedSpan,
    SpansFileError,
    SpansFollower,
    generations,
    read_spans,
    spans_file_path,
)
from meshward.traces import Trace, TraceAssembler, format_trace, group_traces, parse_trace_filter

#: Seconds between two looks at the spans file while following.
POLL_INTERVAL = 0.2


def register(sub: Any) -> None:
    p = sub.add_parser(
        "traces",
        help="print received spans as one tree per request (from the built-in OTLP receiver)",
        description=(
            "Print each request's span tree from the spans file the built-in OTLP receiver "
            "writes (meshward up starts it when the policy's tracing collector is on "
            "loopback). Decision spans show decision, reason, rule, subject and route; a "
            "span whose parent was not received is shown at the top level as an orphan."
        ),
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--spans-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="the spans file to read (default: the one meshward up writes in --state-dir)",
    )
    source.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".meshward"),
        help="meshward up's state directory (default: .meshward)",
    )
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep reading: print each new trace once it is complete (like tail -f)",
    )
    p.add_argument(
        "--trace",
        metavar="TRACE_ID",
        default=None,
        help="only this trace (all 32 hex digits, or a prefix such as a decision line's trace=)",
    )
    p.add_argument(
        "--last",
        type=int,
        default=10,
        metavar="N",
        help="print the N most recent traces (default: 10; with -f, 0 prints only new ones)",
    )
    p.add_argument(
        "--quiet-seconds",
        type=float,
        default=1.0,
        metavar="S",
        help="with -f: a trace is printed once no span of it arrived for S seconds (default: 1)",
    )
    p.set_defaults(func=run)


def resolve_spans_file(spans_file: Path | None, state_dir: Path) -> Path:
    """``--spans-file``, else what ``meshward up`` recorded in ``up.json``, else the default."""
    if spans_file is not None:
        return spans_file
    try:
        info = json.loads((state_dir / "up.json").read_text())
        if isinstance(info, dict) and isinstance(info.get("spans_file"), str):
            return Path(info["spans_file"])
    except (OSError, ValueError):
        pass
    return spans_file_path(state_dir)


def run(args: argparse.Namespace) -> int:
    prefix = ""
    try:
        if args.trace is not None:
            prefix = parse_trace_filter(args.trace)
        if args.last < (0 if args.follow else 1):
            raise ValueError(
                f"--last {args.last}: give a number of traces, at least 1 "
                "(0 is allowed with --follow: only new traces)"
            )
        if not args.quiet_seconds > 0:
            raise ValueError(f"--quiet-seconds {args.quiet_seconds}: give a positive number")
    except ValueError as error:
        print(f"meshward traces: {error}", file=sys.stderr)
        return 2
    path = resolve_spans_file(args.spans_file, args.state_dir)
    try:
        if args.follow:
            return _follow(path, args.last, prefix, args.quiet_seconds)
        return _print_recent(path, args.last, prefix)
    except SpansFileError as error:
        print(f"meshward traces: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `meshward traces | head`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _print_recent(path: Path, last: int, prefix: str) -> int:
    if not generations(path):
        raise SpansFileError(
            f"no spans file at {path}; it is written by the OTLP receiver that `meshward up` "
            "starts when the policy has `tracing:` with a loopback collector (or by "
            "`meshward otlp-receiver --spans-file PATH`); give --spans-file PATH or --state-dir DIR"
        )
    skipped = [0]
    traces = recent_traces(path, last, prefix, skipped=skipped)
    for trace in traces:
        _emit(trace)
    if skipped[0]:
        print(f"meshward traces: skipped {skipped[0]} lines that are not spans", file=sys.stderr)
    if not traces:
        wanted = f"trace {prefix}…" if prefix else "traces"
        print(f"meshward traces: no {wanted} in {path} (or its rotated files)", file=sys.stderr)
        return 1 if prefix else 0
    return 0


def _emit(trace: Trace) -> None:
    print(format_trace(trace) + "\n", flush=True)


def recent_traces(
    path: Path,
    last: int,
    prefix: str = "",
    *,
    limit: int | None = None,
    skipped: list[int] | None = None,
) -> list[Trace]:
    """The ``last`` most recent traces (by start) in ``path`` and its rotated files whose
    id starts with ``prefix``, oldest first; the current file is read up to ``limit``
    bytes. Raises :class:`SpansFileError`."""
    if last < 1:
        return []
    files = generations(path)
    starts: dict[str, int] = {}
    used: list[Path] = []
    for index, file in enumerate(files):
        file_limit = limit if index == 0 else None
        for span in read_spans(file, skipped, limit=file_limit):
            if span.trace_id.startswith(prefix):
                known = starts.get(span.trace_id, span.start_ns)
                starts[span.trace_id] = min(known, span.start_ns)
        used.append(file)
        if index >= 1 and (len(starts) >= last or (prefix and starts)):
            break
    chosen = set(sorted(starts, key=lambda tid: (starts[tid], tid))[-last:])
    spans: list[ReceivedSpan] = []
    for index, file in enumerate(used):
        file_limit = limit if index == 0 else None
        spans.extend(s for s in read_spans(file, limit=file_limit) if s.trace_id in chosen)
    return group_traces(spans)


class LiveTraces:
    """Tails a spans file and assembles complete traces (see the module doc).

    ``from_end``: only spans appended from now on count (``meshward up``), else the
    whole current file is read first.
    """

    def __init__(
        self,
        path: Path,
        *,
        quiet_seconds: float = 1.0,
        prefix: str = "",
        from_end: bool = True,
    ) -> None:
        self._follower = SpansFollower(path, from_end=from_end)
        self._assembler = TraceAssembler(quiet_seconds)
        self._prefix = prefix

    @property
    def offset(self) -> int:
        return self._follower.offset

    def seed(self, traces: list[Trace]) -> None:
        """Mark ``traces`` as printed: later spans of theirs reprint them, updated."""
        for trace in traces:
            self._assembler.mark_printed(trace.trace_id, _spans_of(trace))

    def poll(self, now: float | None = None) -> list[Trace]:
        """Read what was appended; return the traces now complete."""
        now = time.monotonic() if now is None else now
        out: list[Trace] = []
        for span in self._follower.poll():
            if span.trace_id.startswith(self._prefix):
                out += self._assembler.add(span, now)
        return out + self._assembler.due(now)

    def drain(self) -> list[Trace]:
        return self._assembler.drain()

    def close(self) -> None:
        self._follower.close()


def _spans_of(trace: Trace) -> list[ReceivedSpan]:
    out: list[ReceivedSpan] = []
    stack = list(trace.roots)
    while stack:
        node = stack.pop()
        out.append(node.span)
        stack.extend(node.children)
    return out


def _follow(path: Path, last: int, prefix: str, quiet_seconds: float) -> int:
    live = LiveTraces(path, quiet_seconds=quiet_seconds, prefix=prefix, from_end=True)
    try:
        if generations(path):
            history = recent_traces(path, last, prefix, limit=live.offset)
            for trace in history:
                _emit(trace)
            live.seed(history)
            print(f"meshward traces: following {path} (Ctrl-C stops)", file=sys.stderr)
        else:
            print(f"meshward traces: waiting for spans in {path} ...", file=sys.stderr)
        sys.stderr.flush()
        try:
            while True:
                for trace in live.poll():
                    _emit(trace)
                time.sleep(POLL_INTERVAL)
        except KeyboardInterrupt:
            for trace in live.drain():
                _emit(trace)
    finally:
        live.close()
    return 0


class TraceTail:
    """Runs :class:`LiveTraces` on a thread, handing each formatted trace to ``on_text``
    (``meshward up --traces``). Only spans appended after :meth:`start` are shown."""

    def __init__(
        self, path: Path, on_text: Callable[[str], None], quiet_seconds: float = 1.0
    ) -> None:
        self.path = path
        self._on_text = on_text
        self._quiet_seconds = quiet_seconds
        self._stop = threading.Event()
        self._live: LiveTraces | None = None
        self._thread = threading.Thread(target=self._run, name="trace-tail", daemon=True)

    def start(self) -> None:
        self._live = LiveTraces(self.path, quiet_seconds=self._quiet_seconds, from_end=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._live is not None:
            self._live.close()

    def _run(self) -> None:
        assert self._live is not None
        while not self._stop.wait(POLL_INTERVAL):
            try:
                traces = self._live.poll()
            except SpansFileError as error:  # shown, then retried: the file may come back
                self._on_text(f"[meshward] {error}")
                self._stop.wait(5.0)
                continue
            for trace in traces:
                self._on_text(format_trace(trace) + "\n")
