"""Spans → per-request span trees, as text. Pure: no files, no clocks, no printing.

:func:`group_traces` builds one :class:`Trace` per trace id; :func:`format_trace` renders
it as a header line (trace id, start time, span count, duration, root span) and one line
per span, indented two spaces per level under its parent, children in start order.
meshward's decision spans (``meshward.authz.check``) also show the decision, reason,
matched rule, subject and route.

A span whose parent was not received (not exported yet, sampled out, lost) is an
*orphan*: it is shown at the top level, marked with the missing parent id, so nothing
received is ever hidden. Broken input is tolerated the same way: a span id received
twice counts once (the last copy wins) and spans whose parents form a cycle are shown
as orphans.

:class:`TraceAssembler` is the streaming side (``meshward traces -f``): a trace is
complete once no span of it has arrived for ``quiet_seconds``. Spans are exported in
batches on each process's own schedule (authz every 0.5 s, Envoy every few seconds),
so a span can arrive after its trace was printed; the assembler then prints the trace
again, whole, marked as updated. Memory is bounded by ``max_spans`` pending plus as
many remembered for such updates.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from meshward.spans_file import ReceivedSpan

#: The name of authz's one span per decision.
DECISION_SPAN = "meshward.authz.check"
#: Decision-span attributes shown on its line, as ``label=value``.
DECISION_ATTRIBUTES = (
    ("decision", "meshward.decision"),
    ("reason", "meshward.reason"),
    ("rule", "meshward.matched_rule"),
    ("subject", "meshward.subject"),
    ("route", "meshward.route"),
)
#: OTLP ``Status.code`` of a failed span.
STATUS_ERROR = 2
_HEX = frozenset("0123456789abcdef")


@dataclass
class TraceNode:
    """A span and its children (start order). ``orphan``: its parent was not received."""

    span: ReceivedSpan
    children: list[TraceNode] = field(default_factory=list)
    orphan: bool = False


@dataclass
class Trace:
    """One trace's spans as a forest: true roots and orphans, in start order."""

    trace_id: str
    roots: list[TraceNode]
    span_count: int
    start_ns: int
    end_ns: int
    #: Spans of this trace already printed before (0: printed for the first time).
    earlier_spans: int = 0

    @property
    def root(self) -> ReceivedSpan | None:
        """The earliest span that has no parent, if one was received."""
        return next((n.span for n in self.roots if not n.orphan), None)


def build_trace(trace_id: str, spans: Iterable[ReceivedSpan]) -> Trace:
    """The tree of ``spans`` (all of trace ``trace_id``)."""
    by_id: dict[str, ReceivedSpan] = {}
    for span in spans:
        by_id[span.span_id] = span  # a re-exported span counts once
    nodes = {sid: TraceNode(span) for sid, span in by_id.items()}
    top: list[TraceNode] = []
    for node in nodes.values():
        parent_id = node.span.parent_span_id
        if not parent_id or parent_id == node.span.span_id:
            node.orphan = bool(parent_id)
            top.append(node)
        elif parent_id in nodes:
            nodes[parent_id].children.append(node)
        else:
            node.orphan = True
            top.append(node)
    reached = _reachable(top)
    # A parent cycle is reachable from no top-level span: show its members as orphans.
    for node in nodes.values():
        if id(node) not in reached:
            parent = nodes.get(node.span.parent_span_id)
            if parent is not None:
                parent.children = [c for c in parent.children if c is not node]
            node.orphan = True
            top.append(node)
            reached |= _reachable([node])
    for node in nodes.values():
        node.children.sort(key=_order)
    top.sort(key=_order)
    values = list(by_id.values())
    return Trace(
        trace_id=trace_id,
        roots=top,
        span_count=len(values),
        start_ns=min((s.start_ns for s in values), default=0),
        end_ns=max((s.end_ns for s in values), default=0),
    )


def _order(node: TraceNode) -> tuple[int, int, str]:
    # Roots before orphans at the top level; then start time; span id for stability.
    return (int(node.orphan), node.span.start_ns, node.span.span_id)


def _reachable(top: list[TraceNode]) -> set[int]:
    seen: set[int] = set()
    stack = list(top)
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            stack.extend(node.children)
    return seen


def group_traces(spans: Iterable[ReceivedSpan]) -> list[Trace]:
    """One :class:`Trace` per trace id, oldest first (by start time)."""
    by_trace: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        by_trace.setdefault(span.trace_id, []).append(span)
    traces = [build_trace(tid, group) for tid, group in by_trace.items()]
    traces.sort(key=lambda t: (t.start_ns, t.trace_id))
    return traces


def format_trace(trace: Trace) -> str:
    """The header line and one indented line per span (no trailing newline)."""
    root = trace.root
    if root is not None:
        first = f"root {_label(root)}"
    elif trace.roots:
        first = f"root not received (earliest: {_label(trace.roots[0].span)})"
    else:
        first = "no spans"
    plural = "" if trace.span_count == 1 else "s"
    header = (
        f"trace {trace.trace_id}  {_timestamp(trace.start_ns)}  "
        f"{trace.span_count} span{plural}  {_duration(trace.end_ns - trace.start_ns)}  {first}"
    )
    if trace.earlier_spans:
        header += f"  (updated: {trace.span_count - trace.earlier_spans:+d} spans)"
    lines = [header]
    stack = [(node, 1) for node in reversed(trace.roots)]
    while stack:
        node, depth = stack.pop()
        lines.append("  " * depth + format_span(node.span, node.orphan))
        stack.extend((child, depth + 1) for child in reversed(node.children))
    return "\n".join(lines)


def format_span(span: ReceivedSpan, orphan: bool = False) -> str:
    """One span's line (without indentation)."""
    text = f"{_label(span)}  {_duration(span.end_ns - span.start_ns)}"
    if span.status_code == STATUS_ERROR:
        text += "  ERROR"
    if span.name == DECISION_SPAN:
        attrs = span.attributes
        text += "  " + " ".join(
            f"{label}={_attr(attrs.get(key))}" for label, key in DECISION_ATTRIBUTES
        )
    if orphan:
        text += f"  [orphan: parent {span.parent_span_id} not received]"
    return text


def _label(span: ReceivedSpan) -> str:
    return f"{span.service or '?'}: {span.name or '?'}"


def _attr(value: object) -> str:
    if value is None or value == "":
        return "-"
    text = str(value)
    return f'"{text}"' if " " in text else text


def _duration(ns: int) -> str:
    ms = max(ns, 0) / 1e6
    return f"{ms:.2f} ms" if ms < 100 else f"{ms:.0f} ms"


def _timestamp(ns: int) -> str:
    if ns <= 0:
        return "-"
    secs, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{rest // 1_000_000:03d}Z"


def parse_trace_filter(text: str) -> str:
    """A ``--trace`` value as a lowercase trace-id prefix; :class:`ValueError` names it.

    A prefix is enough (decision lines show the first 16 hex digits of the trace id).
    """
    value = text.strip().lower()
    if not value or len(value) > 32 or not set(value) <= _HEX:
        raise ValueError(
            f"--trace {text!r} is not a trace id: give its hex digits (all 32, or a prefix "
            "such as the 16 shown after 'trace=' in decision lines)"
        )
    return value


@dataclass
class _Pending:
    spans: dict[str, ReceivedSpan]
    last_seen: float
    earlier_spans: int = 0


class TraceAssembler:
    """Collects streamed spans into traces and hands each out once it went quiet.

    ``now`` is a monotonic time in seconds, passed in (tests drive it). See the module
    doc for updates of printed traces and the memory bound.
    """

    def __init__(
        self, quiet_seconds: float = 1.0, max_spans: int = 100_000, remember: int = 1_000
    ) -> None:
        self.quiet_seconds = quiet_seconds
        self.max_spans = max_spans
        self.remember = remember
        self._pending: dict[str, _Pending] = {}
        self._pending_spans = 0
        #: Printed traces' spans (least recently printed first), for updates.
        self._printed: OrderedDict[str, dict[str, ReceivedSpan]] = OrderedDict()
        self._printed_spans = 0

    @property
    def pending_spans(self) -> int:
        return self._pending_spans

    def add(self, span: ReceivedSpan, now: float) -> list[Trace]:
        """Take one span; returns traces pushed out early to keep memory bounded."""
        pending = self._pending.get(span.trace_id)
        if pending is None:
            printed = self._printed.get(span.trace_id)
            if printed is not None and printed.get(span.span_id) == span:
                return []  # the same span exported again: nothing new to show
            earlier = self._forget_printed(span.trace_id)
            pending = _Pending(earlier, now, earlier_spans=len(earlier))
            self._pending[span.trace_id] = pending
            self._pending_spans += len(earlier)
        if span.span_id not in pending.spans:
            self._pending_spans += 1
        pending.spans[span.span_id] = span
        pending.last_seen = now
        out: list[Trace] = []
        while self._pending_spans > self.max_spans:  # the trace just added goes last
            oldest = min(self._pending, key=lambda tid: self._pending[tid].last_seen)
            out.append(self._complete(oldest))
        return out

    def due(self, now: float) -> list[Trace]:
        """Traces with no new span for ``quiet_seconds``, oldest start first."""
        quiet = [tid for tid, p in self._pending.items() if now - p.last_seen >= self.quiet_seconds]
        return sorted((self._complete(tid) for tid in quiet), key=lambda t: t.start_ns)

    def drain(self) -> list[Trace]:
        """Every pending trace, quiet or not (at exit)."""
        return sorted(
            (self._complete(tid) for tid in list(self._pending)), key=lambda t: t.start_ns
        )

    def mark_printed(self, trace_id: str, spans: Iterable[ReceivedSpan]) -> None:
        """Remember ``spans`` as printed (history shown before following)."""
        self._forget_printed(trace_id)
        remembered = {s.span_id: s for s in spans}
        self._printed[trace_id] = remembered
        self._printed_spans += len(remembered)
        self._trim_printed()

    def _complete(self, trace_id: str) -> Trace:
        pending = self._pending.pop(trace_id)
        self._pending_spans -= len(pending.spans)
        trace = build_trace(trace_id, pending.spans.values())
        trace.earlier_spans = pending.earlier_spans
        self._printed[trace_id] = pending.spans
        self._printed_spans += len(pending.spans)
        self._trim_printed()
        return trace

    def _trim_printed(self) -> None:
        while self._printed and (
            len(self._printed) > self.remember or self._printed_spans > self.max_spans
        ):
            _, dropped = self._printed.popitem(last=False)
            self._printed_spans -= len(dropped)

    def _forget_printed(self, trace_id: str) -> dict[str, ReceivedSpan]:
        spans = self._printed.pop(trace_id, None)
        if spans is None:
            return {}
        self._printed_spans -= len(spans)
        return spans
