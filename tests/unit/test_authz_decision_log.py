"""Decision log: one JSON line per decision, written in batches by a background thread."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from authz.decision import Decision
from authz.decision_log import DecisionLog
from authz.request import AuthzRequest
from meshward.logs import JsonFormatter
from tests import authz_helpers as testing

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
