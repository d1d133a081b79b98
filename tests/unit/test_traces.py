"""Span trees as text (meshward.traces): parenting, orphans, ordering, decision spans,
and the streaming assembler that decides when a trace is complete."""

from __future__ import annotations

import pytest

from meshward.spans_file import ReceivedSpan
from meshward.traces import (
    DECISION_SPAN,
    TraceAssembler,
    build_trace,
    format_span,
    format_trace,
    group_traces,
    parse_trace_filter,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
T0 = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z


def span(
    span_id: str,
    parent: str = "",
    *,
    name: str | None = None,
    service: str = "edge",
    start_ms: float = 0.0,
    dur_ms: float = 1.0,
    trace_id: str = TRACE,
    attributes: dict[str, object] | None = None,
    status_code: int = 0,
) -> ReceivedSpan:
    start = T0 + int(start_ms * 1e6)
    return ReceivedSpan(
        service=service,
        name=name or f"op-{span_id}",
        trace_id=trace_id,
        span_id=span_id.rjust(16, "0"),
        parent_span_id=parent.rjust(16, "0") if parent else "",
        kind=1,
        start_ns=start,
        end_ns=start + int(dur_ms * 1e6),
        attributes=attributes or {},
        status_code=status_code,
    )


def decision(span_id: str, parent: str, **attrs: object) -> ReceivedSpan:
    values = {
        "meshward.decision": "deny",
        "meshward.reason": "forbidden",
        "meshward.subject": "bob",
        "meshward.route": "orders-api",
        "meshward.decision_id": "d-1",
    }
    values.update({f"meshward.{k}": v for k, v in attrs.items()})
    return span(
        span_id,
        parent,
        name=DECISION_SPAN,
        service="meshward-authz",
        start_ms=2,
        dur_ms=0.4,
        attributes=values,
    )


def test_tree_is_indented_by_parent_and_children_follow_start_order() -> None:
    spans = [
        span("c", "a", name="router egress", start_ms=5, dur_ms=3),  # arrives first
        decision("d", "b"),
        span("a", name="ingress", dur_ms=12.5),
        span("b", "a", name="ext_authz egress", start_ms=1, dur_ms=2),
    ]
    (trace,) = group_traces(spans)
    assert format_trace(trace).splitlines() == [
        f"trace {TRACE}  2023-11-14T22:13:20.000Z  4 spans  12.50 ms  root edge: ingress",
        "  edge: ingress  12.50 ms",
        "    edge: ext_authz egress  2.00 ms",
        "      meshward-authz: meshward.authz.check  0.40 ms  decision=deny reason=forbidden"
        " rule=- subject=bob route=orders-api",
        "    edge: router egress  3.00 ms",
    ]


def test_decision_line_shows_matched_rule_and_quotes_values_with_spaces() -> None:
    line = format_span(decision("d", "b", decision="allow", matched_rule="alice reads"))
    assert line.endswith(
        'decision=allow reason=forbidden rule="alice reads" subject=bob route=orders-api'
    )
    # Other spans never show decision fields, even if they carry meshward attributes.
    plain = format_span(span("x", attributes={"meshward.decision": "allow"}))
    assert "decision=" not in plain


def test_orphans_are_top_level_and_marked_with_the_missing_parent() -> None:
    spans = [span("a", name="ingress", dur_ms=10), decision("d", "feedbeef", subject="carol")]
    trace = build_trace(TRACE, spans)
    lines = format_trace(trace).splitlines()
    assert lines[0].endswith("root edge: ingress")
    assert lines[1] == "  edge: ingress  10.00 ms"
    assert lines[2].startswith("  meshward-authz: meshward.authz.check")  # top level
    assert lines[2].endswith("[orphan: parent 00000000feedbeef not received]")
    assert "subject=carol" in lines[2]


def test_trace_with_only_orphans_names_its_earliest_span() -> None:
    trace = build_trace(TRACE, [decision("d", "feedbeef")])
    header = format_trace(trace).splitlines()[0]
    assert "1 span " in header
    assert header.endswith("root not received (earliest: meshward-authz: meshward.authz.check)")


def test_duplicates_count_once_and_cycles_are_still_shown() -> None:
    spans = [
        span("a", name="root"),
        span("a", name="root"),  # re-exported
        span("x", "y", name="in-cycle-x", start_ms=1),
        span("y", "x", name="in-cycle-y", start_ms=2),
        span("z", "z", name="self-parent", start_ms=3),
    ]
    trace = build_trace(TRACE, spans)
    assert trace.span_count == 4
    text = format_trace(trace)
    for name in ("root", "in-cycle-x", "in-cycle-y", "self-parent"):
        assert text.count(f"edge: {name} ") == 1, text
    assert "self-parent  1.00 ms  [orphan: parent 000000000000000z not received]" in text


def test_error_status_is_marked() -> None:
    assert format_span(span("a", status_code=2)).endswith("  ERROR")
    assert "ERROR" not in format_span(span("a", status_code=1))


def test_traces_are_grouped_by_id_and_sorted_by_start() -> None:
    other = "0" * 31 + "1"
    spans = [span("a", start_ms=50), span("b", trace_id=other, start_ms=10)]
    assert [t.trace_id for t in group_traces(spans)] == [other, TRACE]


@pytest.mark.parametrize(("text", "expected"), [("4BF92F35", "4bf92f35"), (f" {TRACE} ", TRACE)])
def test_trace_filter_accepts_hex_prefixes(text: str, expected: str) -> None:
    assert parse_trace_filter(text) == expected


@pytest.mark.parametrize("text", ["", "xyz", TRACE + "0", "4bf9-2f35"])
def test_trace_filter_rejects_non_ids_naming_the_input(text: str) -> None:
    with pytest.raises(ValueError, match=r"--trace .* is not a trace id"):
        parse_trace_filter(text)


def test_assembler_prints_a_trace_once_it_went_quiet() -> None:
    asm = TraceAssembler(quiet_seconds=1.0)
    asm.add(span("a"), now=10.0)
    asm.add(span("b", "a"), now=10.6)
    assert asm.due(11.5) == []  # b arrived 0.9 s ago
    (trace,) = asm.due(11.6)
    assert trace.span_count == 2 and trace.earlier_spans == 0
    assert asm.due(20.0) == []
    assert asm.pending_spans == 0


def test_late_span_reprints_the_whole_trace_marked_updated() -> None:
    asm = TraceAssembler(quiet_seconds=1.0)
    asm.add(decision("d", "b"), now=0.0)
    (first,) = asm.due(1.0)
    assert "orphan" in format_trace(first)
    # Envoy flushes its spans later: the decision span gets its parents.
    asm.add(span("a", name="ingress", dur_ms=10), now=4.0)
    asm.add(span("b", "a", name="ext_authz egress", start_ms=1, dur_ms=3), now=4.0)
    (second,) = asm.due(5.0)
    text = format_trace(second)
    assert second.span_count == 3 and second.earlier_spans == 1
    assert text.splitlines()[0].endswith("(updated: +2 spans)")
    assert "orphan" not in text
    assert text.splitlines()[3].startswith("      meshward-authz: meshward.authz.check")
    # The same span exported again changes nothing.
    asm.add(span("a", name="ingress", dur_ms=10), now=6.0)
    assert asm.due(10.0) == []


def test_assembler_memory_is_bounded() -> None:
    asm = TraceAssembler(quiet_seconds=60.0, max_spans=3, remember=2)
    early = []
    for i in range(5):
        early += asm.add(span("a", trace_id=f"{i:032x}"), now=float(i))
    # Past 3 pending spans the least recently active traces are pushed out, oldest first.
    assert [t.trace_id for t in early] == [f"{0:032x}", f"{1:032x}"]
    assert asm.pending_spans == 3
    assert len(asm.drain()) == 3
    assert len(asm._printed) == 2  # only the last `remember` printed traces are kept


def test_drain_returns_everything_pending_in_start_order() -> None:
    asm = TraceAssembler(quiet_seconds=60.0)
    asm.add(span("a", trace_id="2" * 32, start_ms=5), now=0.0)
    asm.add(span("a", trace_id="1" * 32, start_ms=1), now=0.0)
    assert [t.trace_id for t in asm.drain()] == ["1" * 32, "2" * 32]
