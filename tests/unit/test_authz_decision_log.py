"""Decision log: one JSON line per decision, written in batches by a background thread."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.decision import Decision
from authz.decision_log import (
    DecisionLog,
    DecisionLogError,
    DecisionLogFollower,
    decision_record,
    encode_line,
)
from authz.request import AuthzRequest
from meshward.logs import JsonFormatter
from tests import authz_helpers as testing

REPO = Path(__file__).resolve().parents[2]
REQUEST = AuthzRequest.from_check_request(
    testing.check_request("GET", "/orders/1?x", {"x-request-id": "rid"})
)


def decision(i: int) -> Decision:
    return Decision(
        allowed=i % 2 == 0,
        http_status=200 if i % 2 == 0 else 403,
        reason="allowed" if i % 2 == 0 else "forbidden",
        decision_id=f"d{i}",
        subject=f"user{i}",
        auth_method="jwt",
        route="orders-api",
        service="orders",
        gateway="edge",
        policy_version="pv",
    )


@pytest.fixture
def logger(request: pytest.FixtureRequest) -> Iterator[logging.Logger]:
    log = logging.getLogger(f"test.decision.{request.node.name}")
    log.setLevel(logging.INFO)
    log.propagate = False
    yield log
    log.handlers.clear()


def test_background_writer_writes_every_decision_as_one_json_line(
    logger: logging.Logger,
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    log = DecisionLog(logger)
    for i in range(200):
        log.record(decision(i), REQUEST, f"{i:032x}", 1_800_000_000.123)
    log.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 200
    assert [line["decision"]["decision_id"] for line in lines] == [f"d{i}" for i in range(200)]
    first = lines[0]
    assert first["logger"] == logger.name and first["msg"] == "decision"
    assert first["decision"] == {
        "decision_id": "d0",
        "ts": "2027-01-15T08:00:00.123Z",
        "subject": "user0",
        "auth_method": "jwt",
        "workload": "",
        "route": "orders-api",
        "service": "orders",
        "gateway": "edge",
        "method": "GET",
        "path": "/orders/1",
        "request_id": "rid",
        "decision": "allow",
        "reason": "allowed",
        "status": 200,
        "matched_rule": "",
        "audit": [],
        "audit_outcome": "",
        "policy_version": "pv",
        "proxy_policy_version": "",
        "trace_id": f"{0:032x}",
    }
    assert lines[1]["decision"]["decision"] == "deny"


def test_other_handlers_get_each_record(logger: logging.Logger) -> None:
    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    collector = Collect()
    logger.addHandler(collector)
    log = DecisionLog(logger)
    for i in range(5):
        log.record(decision(i), None, "", 0.0)
    log.close()
    assert [r.decision["decision_id"] for r in collector.records] == [  # type: ignore[attr-defined]
        f"d{i}" for i in range(5)
    ]


def test_disabled_info_costs_nothing_and_full_queue_drops(logger: logging.Logger) -> None:
    stream = io.StringIO()
    logger.addHandler(logging.StreamHandler(stream))
    logger.setLevel(logging.WARNING)
    quiet = DecisionLog(logger, max_pending=0)
    quiet.record(decision(0), REQUEST, "", 0.0)
    assert quiet.dropped == 0  # INFO disabled: not even built
    logger.setLevel(logging.INFO)
    for i in range(3):
        quiet.record(decision(i), REQUEST, "", 0.0)
    quiet.close()
    assert quiet.dropped == 3
    assert stream.getvalue() == ""


def test_synchronous_mode_writes_immediately(logger: logging.Logger) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    DecisionLog(logger, background=False).record(decision(1), REQUEST, "t", 0.0)
    assert json.loads(stream.getvalue())["decision"]["reason"] == "forbidden"


# -- destinations: a rotating file, stdout ----------------------------------------------


def log_files(path: Path) -> list[Path]:
    """``path`` and its rotated copies, oldest first."""
    rotated = sorted(
        (p for p in path.parent.glob(path.name + ".*")), key=lambda p: int(p.suffix[1:])
    )
    return [*reversed(rotated), *([path] if path.exists() else [])]


def read_lines(files: list[Path]) -> list[dict[str, Any]]:
    out = []
    for file in files:
        text = file.read_text()
        assert text == "" or text.endswith("\n"), f"{file} ends in half a line"
        out += [json.loads(line) for line in text.splitlines()]  # every line whole JSON
    return out


def test_file_rotation_keeps_every_line_whole_and_in_order(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(destination=path, max_bytes=4096, backups=100)
    assert log.destination == str(path)
    total = 400
    for i in range(total):
        log.record(decision(i), REQUEST, f"{i:032x}", 1_800_000_000.5)
        if i % 50 == 0:
            time.sleep(0.02)  # several batches, each may straddle a rotation
    log.close()
    files = log_files(path)
    assert len(files) > 10  # it did rotate, many times
    assert [f.name for f in files[-3:]] == [f"{path.name}.2", f"{path.name}.1", path.name]
    for file in files:
        assert file.stat().st_size <= 4096
    lines = read_lines(files)
    assert len(lines) == total - log.dropped
    ids = [int(line["decision_id"][1:]) for line in lines]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # none duplicated or reordered
    assert log.dropped == 0  # far below max_pending: nothing may be lost
    assert log.failed == 0
    for line in lines:
        assert line.keys() >= testing.DECISION_LOG_KEYS
    assert lines[0]["ts"] == "2027-01-15T08:00:00.500Z"


def test_rotation_keeps_at_most_backups_old_files(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    log = DecisionLog(destination=path, max_bytes=4096, backups=2)
    total = 300
    for i in range(total):
        log.record(decision(i), REQUEST, "", 0.0)
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.log", "d.log.1", "d.log.2"]
    lines = read_lines(log_files(path))
    # The newest lines survive, whole and consecutive, ending with the last decision.
    ids = [int(line["decision_id"][1:]) for line in lines]
    assert ids == list(range(total - len(ids), total))
    assert all(p.stat().st_size <= 4096 for p in tmp_path.iterdir())


def test_zero_backups_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    log = DecisionLog(destination=path, max_bytes=4096, backups=0, background=False)
    for i in range(50):
        log.record(decision(i), REQUEST, "", 0.0)
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["d.log"]
    assert read_lines([path])[-1]["decision_id"] == "d49"


def test_a_line_longer_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    log = DecisionLog(destination=path, max_bytes=100, backups=5, background=False)
    for i in range(3):
        log.record(decision(i), REQUEST, "", 0.0)
    log.close()
    files = log_files(path)
    assert [len(f.read_text().splitlines()) for f in files] == [1, 1, 1]
    assert [line["decision_id"] for line in read_lines(files)] == ["d0", "d1", "d2"]


def test_file_is_created_0600_and_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    old_umask = os.umask(0)  # the mode must not depend on the umask
    try:
        log = DecisionLog(destination=path, max_bytes=4096, backups=1)
        for i in range(30):  # enough to rotate: the new file is 0600 too
            log.record(decision(i), REQUEST, "", 0.0)
        log.close()
    finally:
        os.umask(old_umask)
    assert (tmp_path / "d.log.1").exists()
    for file in (path, tmp_path / "d.log.1"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
    before = read_lines([path])
    again = DecisionLog(destination=path, max_bytes=1 << 20, backups=1)
    again.record(decision(99), REQUEST, "", 0.0)
    again.close()
    assert read_lines([path]) == [*before, read_lines([path])[-1]]
    assert read_lines([path])[-1]["decision_id"] == "d99"


@pytest.mark.parametrize("where", ["missing-dir/d.log", "a-directory"])
def test_unwritable_path_is_a_clear_error(tmp_path: Path, where: str) -> None:
    (tmp_path / "a-directory").mkdir()
    path = tmp_path / where
    with pytest.raises(DecisionLogError) as caught:
        DecisionLog(destination=path)
    message = str(caught.value)
    assert str(path) in message
    assert "--decision-log PATH" in message and "'-' for stdout" in message
    assert not (tmp_path / "missing-dir").exists()


def test_write_errors_are_counted_logged_once_and_never_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = DecisionLog(destination="/dev/full")  # every write: ENOSPC
    with caplog.at_level(logging.ERROR, logger="meshward.authz"):
        for i in range(3):
            log.record(decision(i), REQUEST, "", 0.0)
        time.sleep(0.2)  # a first batch fails
        for i in range(3, 7):
            log.record(decision(i), REQUEST, "", 0.0)
        log.close()
    assert log.failed == 7 and log.dropped == 0
    errors = [r for r in caplog.records if r.name == "meshward.authz"]
    assert len(errors) == 1
    assert errors[0].destination == "/dev/full"  # type: ignore[attr-defined]
    assert "No space left" in errors[0].error  # type: ignore[attr-defined]


def test_full_queue_drops_counts_and_never_blocks_the_caller(tmp_path: Path) -> None:
    """The writer is stuck on a pipe nobody reads: callers carry on, excess is dropped."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer's open succeed
    log = DecisionLog(destination=fifo, max_pending=100)
    total = 3000
    slowest = 0.0
    started = time.perf_counter()
    for i in range(total):
        before = time.perf_counter()
        log.record(decision(i), REQUEST, "", 0.0)
        slowest = max(slowest, time.perf_counter() - before)
    elapsed = time.perf_counter() - started
    assert slowest < 0.25 and elapsed < 5.0  # never waited for the writer
    assert log.dropped > 0

    received: list[bytes] = []
    os.set_blocking(reader, True)

    def drain() -> None:
        while chunk := os.read(reader, 65536):
            received.append(chunk)

    pump = threading.Thread(target=drain)
    pump.start()
    log.close(timeout=10)
    pump.join(10)
    os.close(reader)
    text = b"".join(received).decode()
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == total - log.dropped  # no line lost or split but those counted
    ids = [int(line["decision_id"][1:]) for line in lines]
    assert ids == sorted(ids)


def test_batches_are_written_with_one_write_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "d.log"
    calls: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: Any) -> int:
        calls.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    log = DecisionLog(destination=path)
    for i in range(1000):
        log.record(decision(i), REQUEST, "", 0.0)
    log.close()
    assert len(read_lines([path])) == 1000
    assert len(calls) < 20  # batched: not one syscall per decision


def test_close_flushes_and_later_records_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    log = DecisionLog(destination=path)
    log.BATCH_WAIT = 0.3  # type: ignore[misc]  # close must not lose a gathering batch
    for i in range(25):
        log.record(decision(i), REQUEST, "", 0.0)
    log.close()
    assert len(read_lines([path])) == 25
    log.record(decision(25), REQUEST, "", 0.0)
    log.close()  # idempotent
    assert log.dropped == 1
    assert len(read_lines([path])) == 25


def test_audit_fields_are_recorded_when_the_decision_has_them(tmp_path: Path) -> None:
    audited = decision(1)
    if not hasattr(audited, "audit"):  # before Decision grew the fields

        class Audited(Decision):
            pass

        audited = Audited(**{f: getattr(audited, f) for f in Decision.__dataclass_fields__})
        object.__setattr__(audited, "audit", ("deny:binding/role#0",))
        object.__setattr__(audited, "audit_outcome", "would_deny")
    else:
        audited = dataclasses.replace(
            audited,
            audit=("deny:binding/role#0",),  # type: ignore[call-arg]
            audit_outcome="would_deny",  # type: ignore[call-arg]
        )
    path = tmp_path / "d.log"
    log = DecisionLog(destination=path, background=False)
    log.record(audited, REQUEST, "", 0.0)
    log.close()
    (line,) = read_lines([path])
    assert line["audit"] == ["deny:binding/role#0"]
    assert line["audit_outcome"] == "would_deny"


def test_stdout_mode_writes_only_decision_lines_to_stdout() -> None:
    script = """
import logging
from authz.decision import Decision
from authz.decision_log import DecisionLog
from meshward.logs import setup

setup("info", "meshward.authz").info("on stderr, not stdout")
log = DecisionLog(destination="-")
for i in range(50):
    log.record(Decision(allowed=True, http_status=200, reason="allowed",
                        decision_id=f"d{i}", subject="alice"), None, "t", 0.0)
log.close()
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 50
    records = [json.loads(line) for line in lines]
    assert [r["decision_id"] for r in records] == [f"d{i}" for i in range(50)]
    assert all(r.keys() >= testing.DECISION_LOG_KEYS for r in records)
    assert ", " not in lines[0] and '": ' not in lines[0]  # compact JSON
    assert "on stderr, not stdout" in result.stderr
    assert "decision_id" not in result.stderr


def test_stdout_mode_in_process(capfd: pytest.CaptureFixture[str]) -> None:
    log = DecisionLog(destination="-", background=False)
    log.record(decision(3), REQUEST, "", 0.0)
    log.close()
    out = capfd.readouterr().out
    assert json.loads(out)["decision_id"] == "d3" and out.count("\n") == 1


# -- following the file (meshward up's console) ----------------------------------------


def test_follower_reads_new_lines_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    path.write_text('{"decision_id":"old"}\n')  # from an earlier run: not shown
    seen: list[str] = []
    follower = DecisionLogFollower(path, seen.append, interval=0.01)
    follower.start()
    try:
        log = DecisionLog(destination=path, max_bytes=4096, backups=3)
        for i in range(40):
            log.record(decision(i), REQUEST, "", 0.0)
            time.sleep(0.01)
        log.close()
        deadline = time.monotonic() + 5
        while len(seen) < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        follower.stop()
    assert (tmp_path / "d.log.1").exists()
    assert [json.loads(line)["decision_id"] for line in seen] == [f"d{i}" for i in range(40)]


def test_follower_waits_for_the_file_to_appear(tmp_path: Path) -> None:
    path = tmp_path / "later.log"
    seen: list[str] = []
    follower = DecisionLogFollower(path, seen.append)
    follower.start()
    follower.stop()  # the thread is idle; poll by hand from here on
    follower.poll()
    assert seen == []
    path.write_bytes(b'{"a":1}\n{"b":')
    follower.poll()
    assert seen == ['{"a":1}']
    with path.open("ab") as f:
        f.write(b"2}\n")
    follower.poll()
    assert seen == ['{"a":1}', '{"b":2}']


_TEXT = st.text(st.characters(codec="utf-8"), max_size=12)  # any code point, controls too


@settings(max_examples=300, deadline=None)
@given(
    decision=st.builds(
        Decision,
        allowed=st.booleans(),
        http_status=st.sampled_from((200, 401, 403, 500, 503)),
        reason=_TEXT,
        decision_id=_TEXT,
        subject=_TEXT,
        auth_method=_TEXT,
        workload=_TEXT,
        route=_TEXT,
        service=_TEXT,
        gateway=_TEXT,
        policy_version=_TEXT,
        proxy_policy_version=_TEXT,
        matched_rule=_TEXT,
        audit=st.lists(_TEXT, max_size=3).map(tuple),
        audit_outcome=_TEXT,
    ),
    request=st.none() | st.builds(AuthzRequest.of, _TEXT, _TEXT),
    trace_id=_TEXT,
    ts=st.floats(min_value=-86_400 * 365, max_value=4e9, allow_nan=False),
)
def test_the_direct_line_encoder_writes_the_same_bytes_as_the_record_encoder(
    decision: Decision, request: AuthzRequest | None, trace_id: str, ts: float
) -> None:
    # The writer thread formats lines with encode_line; the dict + JSON encoder path
    # (decision_record, JSON-encoded) is the definition it must match byte for byte.
    record = decision_record(decision, request, trace_id, ts)
    assert encode_line(decision, request, trace_id, ts) == (
        json.dumps(record, separators=(",", ":")).encode() + b"\n"
    )
