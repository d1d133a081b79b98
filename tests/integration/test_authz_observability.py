"""``meshward authz`` as a real process with a real OTLP collector that goes away and
comes back: decisions never wait for it, lost spans are counted, and /metrics exposes
the series issue 6 names with plausible values."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from meshward.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests import authz_helpers as testing
from tests.envoy_harness import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TRACEPARENT = "00-{trace}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def key() -> testing.SigningKey:
    return testing.rsa_key("obs-key")


@pytest.fixture
def policy_dir(tmp_path: Path, key: testing.SigningKey) -> Path:
    return testing.demo_policy_dir(tmp_path / "policies", key)


class Authz:
    """A ``meshward authz --policy`` process exporting spans to ``collector_port``."""

    def __init__(self, policy_dir: Path, collector_port: int, engine: str) -> None:
        env = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector_port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1",  # seconds: give up on a batch quickly
            "OTEL_BSP_MAX_QUEUE_SIZE": "40",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "10",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshward", "authz", "--policy", str(policy_dir),
             "--listen", "127.0.0.1:0", "--status-listen", "127.0.0.1:0",
             "--engine", engine, "--decision-log", "-"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.log: list[str] = []
        started = threading.Event()
        self.ports: tuple[int, int] = (0, 0)

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("msg") == "authz started":
                    self.ports = (int(record["port"]), int(record["status_port"]))
                    started.set()

        threading.Thread(target=pump, daemon=True).start()
        if not started.wait(30):
            self.stop()
            raise AssertionError("authz did not start:\n" + "".join(self.log))

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.ports[1]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def collector_port() -> int:
    return free_port()


@pytest.fixture
def authz(policy_dir: Path, collector_port: int, authz_engine: str) -> Iterator[Authz]:
    process = Authz(policy_dir, collector_port, authz_engine)
    try:
        yield process
    finally:
        process.stop()


def wait_until(predicate: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_collector_down_decisions_go_on_and_drops_are_counted(
    authz: Authz, collector_port: int, key: testing.SigningKey
) -> None:
    alice = key.sign(testing.claims("alice", ["orders-readers"]))
    bob = key.sign(testing.claims("bob", []))
    with grpc.insecure_channel(f"127.0.0.1:{authz.ports[0]}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)

        def check(token: str, i: int) -> int:
            request = testing.check_request(
                "GET", "/orders/1", {"authorization": f"Bearer {token}"}
            )
            started = time.perf_counter()
            metadata = (("traceparent", TRACEPARENT.format(trace=f"{i + 1:032x}")),)
            code = int(stub.Check(request, metadata=metadata, timeout=5).status.code)
            assert time.perf_counter() - started < 1.0  # never waits for the collector
            return code

        # Collector down: 200 decisions, all right, none slowed by the dead exporter.
        codes = [check(alice if i % 2 else bob, i) for i in range(200)]
        assert codes.count(0) == 100 and codes.count(7) == 100
        queue_full = 'meshward_authz_spans_dropped_total{reason="queue_full"}'
        wait_until(lambda: authz.metrics().get(queue_full, 0) > 0)
        down = authz.metrics()
        lost = (
            down['meshward_authz_spans_dropped_total{reason="queue_full"}']
            + down['meshward_authz_spans_dropped_total{reason="export_failed"}']
        )
        assert lost >= 200 - 40 - 10  # at most a queue and a batch are still pending
        assert down["meshward_authz_spans_exported_total"] == 0
        assert down["meshward_authz_spans_queued"] <= 40

        # The collector comes up: spans flow again, and counts only go up.
        receiver = OtlpReceiver(f"127.0.0.1:{collector_port}")
        receiver.start()
        try:
            # The exporter's channel reconnects with backoff: keep deciding until a span
            # of this phase arrives (the queue keeps the newest spans).
            deadline = time.monotonic() + 30
            received: list[ReceivedSpan] = []
            i = 200
            while not received and time.monotonic() < deadline:
                check(alice, i)
                i += 1
                received = receiver.wait_for(lambda s: int(s.trace_id, 16) > 200, timeout=0.2)
            assert received, "no span reached the collector after it came back"
            span = received[0]
            assert span.parent_span_id == "00f067aa0ba902b7"
            assert span.service == "meshward-authz"
            up = authz.metrics()
            assert up["meshward_authz_spans_exported_total"] >= 2
            assert (
                up['meshward_authz_spans_dropped_total{reason="queue_full"}']
                >= down['meshward_authz_spans_dropped_total{reason="queue_full"}']
            )
        finally:
            receiver.stop()


def test_metrics_expose_the_named_series(authz: Authz, key: testing.SigningKey) -> None:
    token = key.sign(testing.claims("alice", ["orders-readers"]))
    with grpc.insecure_channel(f"127.0.0.1:{authz.ports[0]}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for _ in range(10):  # one signature check, then nine cache hits
            request = testing.check_request(
                "GET", "/orders/1", {"authorization": f"Bearer {token}"}
            )
            assert stub.Check(request, timeout=5).status.code == 0
        stub.Check(testing.check_request("GET", "/orders/1"), timeout=5)  # no token: 401
    values = authz.metrics()
    assert values['meshward_authz_decisions_total{decision="allow",reason="allowed"}'] == 10
    assert values['meshward_authz_decisions_total{decision="deny",reason="missing_token"}'] == 1
    assert values["meshward_authz_check_duration_seconds_count"] == 11
    # Plausible: each Check took more than nothing and less than a second.
    total = values["meshward_authz_check_duration_seconds_sum"]
    assert 0 < total < 11
    assert values['meshward_authz_token_cache_lookups_total{result="hit"}'] == 9
    assert values['meshward_authz_token_cache_lookups_total{result="miss"}'] == 1
    assert values["meshward_authz_token_cache_hit_ratio"] == pytest.approx(0.9)
    assert values["meshward_authz_decision_log_dropped_total"] == 0
    assert any(re.match(r"meshward_authz_policy_info\{version=", k) for k in values)
    for name in ("meshward_authz_spans_exported_total", "meshward_authz_spans_queued"):
        assert name in values
