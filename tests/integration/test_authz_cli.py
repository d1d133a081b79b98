"""``meshward authz`` as a real process: serve, /healthz, /metrics, SIGHUP reload, SIGTERM."""

from __future__ import annotations

import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from tests import authz_helpers as testing

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def key() -> testing.SigningKey:
    return testing.rsa_key("cli-key")


@pytest.fixture
def policy_dir(tmp_path: Path, key: testing.SigningKey) -> Path:
    return testing.demo_policy_dir(tmp_path / "policies", key)


class Process:
    def __init__(self, args: list[str], stdout: int = subprocess.DEVNULL) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshward", "authz", *args],
            cwd=REPO,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_for_log(self, msg: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.seen.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("msg") == msg:
                return dict(record)
        raise AssertionError(f"no {msg!r} log line; got: {''.join(self.seen)}")


@pytest.fixture
def serving(policy_dir: Path, authz_engine: str) -> Iterator[tuple[Process, int, int]]:
    process = Process(
        [
            "--policy",
            str(policy_dir),
            "--listen",
            "127.0.0.1:0",
            "--status-listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--engine",
            authz_engine,
        ]
    )
    try:
        started = process.wait_for_log("authz started")
        assert started["engine"] == authz_engine
        yield process, int(started["port"]), int(started["status_port"])
    finally:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(10)


def test_serves_reloads_and_stops_cleanly(
    serving: tuple[Process, int, int], policy_dir: Path, key: testing.SigningKey
) -> None:
    process, port, status_port = serving
    base = f"http://127.0.0.1:{status_port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as reply:
        assert reply.status == 200

    dave = testing.check_request(
        "GET",
        "/orders",
        {"authorization": f"Bearer {key.sign(testing.claims('dave', []))}"},
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        assert stub.Check(dave, timeout=5).status.code == 7
        logged = process.wait_for_log("decision")
        assert logged["logger"] == "meshward.decision"
        assert {k: logged["decision"][k] for k in ("subject", "reason", "status", "path")} == {
            "subject": "dave",
            "reason": "forbidden",
            "status": 403,
            "path": "/orders",
        }
        assert len(logged["decision"]["trace_id"]) == 32

        # SIGHUP with a broken policy: rejected, the old one keeps serving.
        mesh = policy_dir / "mesh.yaml"
        good = mesh.read_text()
        mesh.write_text(good.replace("role: orders-admin", "role: no-such-role"))
        process.proc.send_signal(signal.SIGHUP)
        rejected = process.wait_for_log("policy rejected; the last good policy keeps serving")
        assert any("mesh.yaml" in e for e in rejected["errors"])
        assert stub.Check(dave, timeout=5).status.code == 7

        # SIGHUP with a good policy that grants dave.
        mesh.write_text(good.replace("subjects: [alice]", "subjects: [alice, dave]"))
        process.proc.send_signal(signal.SIGHUP)
        process.wait_for_log("policy loaded")
        assert stub.Check(dave, timeout=5).status.code == 0

    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as reply:
        metrics = reply.read().decode()
    assert 'meshward_authz_decisions_total{decision="allow",reason="allowed"} 1.0' in metrics
    assert 'meshward_authz_decisions_total{decision="deny",reason="forbidden"} 2.0' in metrics

    process.proc.send_signal(signal.SIGTERM)
    assert process.proc.wait(15) == 0
    process.wait_for_log("authz stopping", timeout=5)


def test_policy_error_exits_2_with_file_and_line(policy_dir: Path) -> None:
    mesh = policy_dir / "mesh.yaml"
    mesh.write_text(mesh.read_text().replace("role: orders-admin", "role: no-such-role"))
    result = subprocess.run(
        [sys.executable, "-m", "meshward", "authz", "--policy", str(policy_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"{mesh}:" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_listen_exits_2(policy_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshward", "authz", "--policy", str(policy_dir), "--listen", "x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--listen" in result.stderr and "Traceback" not in result.stderr


def _start(policy_dir: Path, *extra: str, engine: str, stdout: int = subprocess.DEVNULL) -> Process:
    return Process(
        ["--policy", str(policy_dir), "--listen", "127.0.0.1:0",
         "--status-listen", "127.0.0.1:0", "--workers", "2", "--engine", engine, *extra],
        stdout=stdout,
    )  # fmt: skip


def _decision_id(response: external_auth_pb2.CheckResponse) -> str:
    """The id the response carries: the allow header, or the deny body's decision_id."""
    if response.HasField("ok_response"):
        (value,) = [
            h.header.value
            for h in response.ok_response.headers
            if h.header.key == "x-meshward-decision-id"
        ]
        return str(value)
    return str(json.loads(response.denied_response.body)["decision_id"])


def _lines_when(path: Path, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text()
            if text.count("\n") >= count:
                return [json.loads(line) for line in text.splitlines()]
        time.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {count} decision lines")


def test_decision_log_to_a_file(
    policy_dir: Path, key: testing.SigningKey, tmp_path: Path, authz_engine: str
) -> None:
    path = tmp_path / "decisions.jsonl"
    process = _start(
        policy_dir,
        "--decision-log", str(path),
        "--decision-log-max-bytes", "64KiB",
        "--decision-log-backups", "2",
        engine=authz_engine,
    )  # fmt: skip
    try:
        started = process.wait_for_log("authz started")
        assert started["decision_log"] == str(path)
        alice = testing.check_request(
            "GET", "/orders/7", {"authorization": f"Bearer {key.sign(testing.claims('alice'))}"}
        )
        anonymous = testing.check_request("GET", "/orders/7")
        with grpc.insecure_channel(f"127.0.0.1:{started['port']}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            allowed = stub.Check(alice, timeout=5)
            denied = stub.Check(anonymous, timeout=5)
        assert allowed.status.code == 0 and denied.status.code == 16
        lines = _lines_when(path, 2)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        first, second = lines
        assert first["decision_id"] == _decision_id(allowed)
        assert second["decision_id"] == _decision_id(denied)
        for line in lines:
            assert line.keys() >= testing.DECISION_LOG_KEYS
        assert {k: first[k] for k in ("subject", "auth_method", "route", "decision")} == {
            "subject": "alice",
            "auth_method": "jwt",
            "route": "orders-api",
            "decision": "allow",
        }
        assert first["matched_rule"].startswith("alice-runs-orders/orders-admin")
        assert first["policy_version"] and len(first["trace_id"]) == 32
        assert first["ts"].endswith("Z") and len(first["ts"]) == len("2027-01-15T08:00:00.123Z")
        assert (second["decision"], second["reason"]) == ("deny", "missing_token")
        # Not on stderr too: the file is the one destination.
        assert not any('"meshward.decision"' in line for line in process.seen)
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(15) == 0
    finally:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(10)


def test_decision_log_to_stdout(policy_dir: Path, authz_engine: str) -> None:
    process = _start(policy_dir, "--decision-log", "-", engine=authz_engine, stdout=subprocess.PIPE)
    try:
        started = process.wait_for_log("authz started")
        with grpc.insecure_channel(f"127.0.0.1:{started['port']}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            denied = stub.Check(testing.check_request("GET", "/orders"), timeout=5)
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(15) == 0
        assert process.proc.stdout is not None
        out = process.proc.stdout.read()
    finally:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(10)
    (line,) = out.splitlines()  # exactly one line: the decision, nothing else
    record = json.loads(line)
    assert record["decision_id"] == _decision_id(denied)
    assert record.keys() >= testing.DECISION_LOG_KEYS


@pytest.mark.parametrize(
    ("flags", "code", "wanted"),
    [
        (["--decision-log", "/no/such/dir/d.jsonl"], 1, "/no/such/dir/d.jsonl"),
        (["--decision-log", "d.jsonl", "--decision-log-max-bytes", "100"], 2, "at least 4096"),
        (["--decision-log", "d.jsonl", "--decision-log-max-bytes", "lots"], 2, "not a size"),
        (["--decision-log", "d.jsonl", "--decision-log-backups", "101"], 2, "between 0 and 100"),
        (["--decision-log-backups", "3"], 2, "only apply with --decision-log PATH"),
    ],
)
def test_decision_log_flag_errors(
    policy_dir: Path, tmp_path: Path, flags: list[str], code: int, wanted: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshward", "authz", "--policy", str(policy_dir),
         "--listen", "127.0.0.1:0", "--status-listen", "127.0.0.1:0", *flags],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == code, result.stderr
    assert wanted in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "d.jsonl").exists()
