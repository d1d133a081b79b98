"""The spans file on a real filesystem: written 0600 and rotated by size, read back,
tailed across rotations and truncation; history selection and live tailing for
`meshward traces`."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from meshward.spans_file import (
    ReceivedSpan,
    SpansFileError,
    SpansFileWriter,
    SpansFollower,
    generations,
    parse_line,
    read_spans,
)
from meshward.traces_cmd import LiveTraces, recent_traces, resolve_spans_file
from tests.unit.test_traces import span


def ids(spans: list[ReceivedSpan]) -> list[str]:
    return [s.span_id.lstrip("0") for s in spans]


def test_lines_round_trip_and_bytes_attributes_become_hex(tmp_path: Path) -> None:
    original = span("a", attributes={"k": "v", "n": 3, "raw": b"\x01\xff", "list": [1, 2]})
    line = original.to_json_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    decoded = parse_line(line)
    assert decoded is not None
    assert decoded.attributes == {"k": "v", "n": 3, "raw": "01ff", "list": [1, 2]}
    assert decoded.span_id == original.span_id and decoded.start_ns == original.start_ns
    assert set(json.loads(line)) == {
        "service", "name", "trace_id", "span_id", "parent_span_id", "kind",
        "start_ns", "end_ns", "status_code", "attributes",
    }  # fmt: skip


@pytest.mark.parametrize(
    "line",
    [b"", b"not json", b"[]", b'{"trace_id": "ab"}', b'{"kind": true}', b"\xff\xfe"],
)
def test_lines_that_are_not_spans_are_none(line: bytes) -> None:
    assert parse_line(line) is None


def test_writer_creates_0600_and_rotates_between_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    line_len = len(span("a").to_json_line())
    writer = SpansFileWriter(path, max_bytes=line_len * 2, backups=2)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        writer.write([span("1"), span("2"), span("3")])  # the third rotates
        writer.write([span("4")])
        writer.write([span("5")])  # rotates again: 1,2 → .2; 3,4 → .1
    finally:
        writer.close()
    assert generations(path) == [path, Path(f"{path}.1"), Path(f"{path}.2")]
    assert ids(list(read_spans(path))) == ["5"]
    assert ids(list(read_spans(Path(f"{path}.1")))) == ["3", "4"]
    assert ids(list(read_spans(Path(f"{path}.2")))) == ["1", "2"]
    for file in generations(path):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        assert file.read_bytes().endswith(b"\n")
    with pytest.raises(OSError, match="closed"):
        writer.write([span("6")])


def test_writer_drops_the_oldest_generation(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    writer = SpansFileWriter(path, max_bytes=1, backups=1)  # every line rotates
    for i in range(1, 5):
        writer.write([span(str(i))])
    writer.close()
    assert generations(path) == [path, Path(f"{path}.1")]
    assert ids(list(read_spans(path))) == ["4"]
    assert ids(list(read_spans(Path(f"{path}.1")))) == ["3"]


def test_writer_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(SpansFileError, match=r"cannot write the spans file .*/nope/spans.jsonl"):
        SpansFileWriter(tmp_path / "nope" / "spans.jsonl")
    with pytest.raises(SpansFileError, match="--spans-file PATH"):
        SpansFileWriter(tmp_path)  # a directory
    with pytest.raises(SpansFileError, match="--max-bytes must be at least 1"):
        SpansFileWriter(tmp_path / "x", max_bytes=0)


def test_reading_skips_and_counts_lines_that_are_not_spans(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    path.write_bytes(span("1").to_json_line() + b"garbage\n\n" + span("2").to_json_line())
    skipped = [0]
    assert ids(list(read_spans(path, skipped))) == ["1", "2"]
    assert skipped == [1]


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SpansFileError, match=r"cannot read the spans file .*: Is a directory"):
        list(read_spans(tmp_path))
    with pytest.raises(SpansFileError, match="No such file"):
        list(read_spans(tmp_path / "missing.jsonl"))


def test_follower_reads_appends_torn_lines_and_rotations(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    path.write_bytes(span("0").to_json_line())  # before the follower: not shown
    follower = SpansFollower(path, from_end=True)
    try:
        assert follower.poll() == []
        line = span("1").to_json_line()
        with path.open("ab") as f:
            f.write(line[:10])  # a write caught mid-line
        assert follower.poll() == []
        with path.open("ab") as f:
            f.write(line[10:])
        assert ids(follower.poll()) == ["1"]
        # Rotation with more lines written to the old file after the last poll.
        writer = SpansFileWriter(path, max_bytes=len(line) * 3, backups=2)
        writer.write([span("2")])  # fills the old file
        writer.write([span("3")])  # rotates: the new file holds 3
        writer.write([span("4")])
        assert ids(follower.poll()) == ["2", "3", "4"]
        writer.close()
        # Truncated in place: read again from the start.
        path.write_bytes(span("5").to_json_line())
        assert ids(follower.poll()) == ["5"]
        # Deleted, then created again.
        path.unlink()
        assert follower.poll() == []
        path.write_bytes(span("6").to_json_line() + b"junk\n")
        assert ids(follower.poll()) == ["6"]
        assert follower.skipped == 1
    finally:
        follower.close()


def test_follower_of_a_missing_file_reads_it_from_the_start_once_it_appears(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spans.jsonl"
    follower = SpansFollower(path, from_end=True)
    assert follower.poll() == [] and follower.offset == 0
    path.write_bytes(span("1").to_json_line())
    assert ids(follower.poll()) == ["1"]
    follower.close()


def _write_traces(path: Path, count: int, max_bytes: int = 10**9) -> None:
    writer = SpansFileWriter(path, max_bytes=max_bytes, backups=5)
    for i in range(count):
        tid = f"{i + 1:032x}"
        writer.write([span("a", trace_id=tid, start_ms=i * 10), span("b", "a", trace_id=tid)])
    writer.close()


def test_recent_traces_are_the_last_n_by_start_across_generations(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    tid = f"{1:032x}"
    pair = len(span("a", trace_id=tid).to_json_line() + span("b", "a", trace_id=tid).to_json_line())
    _write_traces(path, 6, max_bytes=pair * 2)  # two traces per file: 3 generations
    assert len(generations(path)) == 3
    recent = recent_traces(path, 2)
    assert [t.trace_id[-1] for t in recent] == ["5", "6"]
    assert all(t.span_count == 2 for t in recent)
    # More than the newest two files hold: older generations are read too.
    assert [t.trace_id[-1] for t in recent_traces(path, 5)] == ["2", "3", "4", "5", "6"]
    # A prefix selects traces; a full id finds one in the oldest generation.
    assert [t.trace_id[-1] for t in recent_traces(path, 10, f"{1:032x}")] == ["1"]


def test_recent_traces_stop_at_the_limit_offset(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    _write_traces(path, 3)
    limit = sum(len(line) for line in path.read_bytes().splitlines(keepends=True)[:4])
    assert [t.trace_id[-1] for t in recent_traces(path, 10, limit=limit)] == ["1", "2"]


def test_live_traces_follow_and_reprint_seeded_history(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    tid = "f" * 32
    writer = SpansFileWriter(path)
    writer.write([span("b", "a", trace_id=tid)])
    live = LiveTraces(path, quiet_seconds=1.0, from_end=True)
    history = recent_traces(path, 10, limit=live.offset)
    live.seed(history)
    (old,) = history
    assert old.span_count == 1 and old.roots[0].orphan
    writer.write([span("a", trace_id=tid), span("x", trace_id="e" * 32)])
    assert live.poll(now=100.0) == []
    done = live.poll(now=101.0)
    writer.close()
    live.close()
    assert [(t.trace_id, t.span_count, t.earlier_spans) for t in done] == [
        (tid, 2, 1),
        ("e" * 32, 1, 0),
    ]
    assert not done[0].roots[0].orphan and len(done[0].roots[0].children) == 1


def test_spans_file_defaults_to_what_meshward_up_recorded(tmp_path: Path) -> None:
    assert resolve_spans_file(None, tmp_path) == tmp_path / "logs" / "spans.jsonl"
    (tmp_path / "up.json").write_text(json.dumps({"spans_file": "/elsewhere/s.jsonl"}))
    assert resolve_spans_file(None, tmp_path) == Path("/elsewhere/s.jsonl")
    assert resolve_spans_file(Path("given"), tmp_path) == Path("given")
    (tmp_path / "up.json").write_text(json.dumps({"spans_file": None}))
    assert resolve_spans_file(None, tmp_path) == tmp_path / "logs" / "spans.jsonl"
    os.unlink(tmp_path / "up.json")
