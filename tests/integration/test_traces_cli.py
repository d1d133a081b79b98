"""Local trace viewing with real processes: `meshward otlp-receiver` fed by the real OTLP
gRPC exporter, `meshward traces` printing span trees, and `meshward up --traces` with a
policy whose tracing collector is on loopback (real Envoy, authz and receiver)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from tests import tokens
from tests.envoy_harness import free_port
from tests.mesh_harness import OutputLines, http
from tests.policy_files import VALID_POLICY, new_keys, write_policy
from tests.process_mesh import ROOT, wait_until

pytestmark = pytest.mark.integration

ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def meshward(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshward", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=ENV,
    )


def _stop(process: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def meshward_process(
    *args: str, env: dict[str, str] = ENV, cwd: Path | None = None
) -> subprocess.Popen[str]:
    """``meshward ARGS`` as a real process, stdout and stderr merged for :class:`OutputLines`."""
    return subprocess.Popen(
        [sys.executable, "-m", "meshward", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@contextmanager
def receiver(spans_file: Path, port: int) -> Iterator[tuple[subprocess.Popen[str], OutputLines]]:
    """`meshward otlp-receiver` as a real process, SERVING on gRPC health before use."""
    process = meshward_process(
        "otlp-receiver", "--listen", f"127.0.0.1:{port}", "--spans-file", str(spans_file)
    )
    out = OutputLines(process)
    try:
        assert wait_until(lambda: _serving(port), timeout=15), out.text()
        yield process, out
    finally:
        _stop(process)


def _serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _provider(service: str, port: int) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}", insecure=True)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def export_request_trace(port: int, subject: str) -> str:
    """A request as a gateway and authz would trace it, via the real OTLP exporter;
    returns the trace id."""
    edge = _provider("edge", port)
    authz = _provider("meshward-authz", port)
    try:
        gateway = edge.get_tracer("envoy")
        attributes = {
            "meshward.decision": "deny",
            "meshward.reason": "forbidden",
            "meshward.subject": subject,
            "meshward.route": "orders-api",
        }
        with gateway.start_as_current_span("ingress") as root:
            # Another process (authz) continues the trace: the parent travels in metadata.
            with (
                gateway.start_as_current_span("ext_authz egress"),
                authz.get_tracer("authz").start_as_current_span(
                    "meshward.authz.check", kind=trace.SpanKind.SERVER, attributes=attributes
                ),
            ):
                time.sleep(0.001)
            with gateway.start_as_current_span("router orders egress"):
                time.sleep(0.002)
    finally:
        authz.shutdown()
        edge.shutdown()
    return f"{root.get_span_context().trace_id:032x}"


def _shape(text: str) -> list[str]:
    """Output lines without durations and start time (they vary run to run)."""
    text = re.sub(r"  \d{4}-\d\d-\d\dT[\d:.]+Z", "", text)
    return [re.sub(r"  [\d.]+ ms", "", line) for line in text.splitlines()]


def test_received_spans_are_printed_as_a_tree(tmp_path: Path) -> None:
    spans = tmp_path / "spans.jsonl"
    port = free_port()
    with receiver(spans, port) as (process, out):
        older = export_request_trace(port, "alice")
        trace_id = export_request_trace(port, "bob")
        assert wait_until(lambda: spans.read_text().count("\n") == 8, timeout=10)
        assert (spans.stat().st_mode & 0o777) == 0o600
        shown = meshward("traces", "--spans-file", str(spans), "--last", "1")
        assert shown.returncode == 0, shown.stderr
        assert _shape(shown.stdout) == [
            f"trace {trace_id}  4 spans  root edge: ingress",
            "  edge: ingress",
            "    edge: ext_authz egress",
            "      meshward-authz: meshward.authz.check  decision=deny reason=forbidden rule=-"
            " subject=bob route=orders-api",
            "    edge: router orders egress",
            "",
        ]
        assert older not in shown.stdout
        # A prefix of the id (as decision lines show) selects the older trace.
        picked = meshward("traces", "--spans-file", str(spans), "--trace", older[:16])
        assert picked.returncode == 0, picked.stderr
        assert f"trace {older}" in picked.stdout and "subject=alice" in picked.stdout
        assert trace_id not in picked.stdout
        assert _stop(process) == 0  # SIGTERM: a clean stop
    assert "otlp receiver stopped" in out.text()


def test_follow_prints_each_new_trace_once_complete(tmp_path: Path) -> None:
    spans = tmp_path / "spans.jsonl"
    port = free_port()
    with receiver(spans, port):
        export_request_trace(port, "before")  # history: --last 0 shows none of it
        assert wait_until(lambda: spans.read_text().count("\n") == 4, timeout=10)
        follow = meshward_process(
            "traces", "-f", "--last", "0", "--quiet-seconds", "0.3", "--spans-file", str(spans)
        )
        out = OutputLines(follow)
        try:
            # Spans written from here on are new to it (like tail -f).
            assert out.wait(r"^meshward traces: following ", 15) is not None, out.text()
            trace_id = export_request_trace(port, "carol")
            header = out.wait(rf"^trace {trace_id}  .*  4 spans  ", timeout=15)
            assert header is not None, out.text()
            assert out.wait(r"subject=carol") == header + 3
            assert "subject=before" not in out.text()
        finally:
            code = _stop(follow, signal.SIGINT)
        assert code == 0, out.text()
        assert out.text().count(f"trace {trace_id}") == 1


def test_receiver_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = meshward(
            "otlp-receiver", "--listen", address, "--spans-file", str(tmp_path / "s.jsonl")
        )
    assert result.returncode == 1
    assert f"cannot listen on {address}" in result.stderr
    assert "--listen HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_receiver_unwritable_spans_file_is_a_clear_error(tmp_path: Path) -> None:
    result = meshward(
        "otlp-receiver", "--listen", f"127.0.0.1:{free_port()}", "--spans-file", str(tmp_path)
    )
    assert result.returncode == 1
    assert f"cannot write the spans file {tmp_path}: Is a directory" in result.stderr
    bad = meshward("otlp-receiver", "--listen", "nowhere", "--spans-file", str(tmp_path / "s"))
    assert bad.returncode == 2 and "'nowhere' is not HOST:PORT" in bad.stderr


def test_unreadable_or_missing_spans_file_is_a_clear_error(tmp_path: Path) -> None:
    unreadable = meshward("traces", "--spans-file", str(tmp_path))
    assert unreadable.returncode == 1
    assert f"cannot read the spans file {tmp_path}: Is a directory" in unreadable.stderr
    assert "Traceback" not in unreadable.stderr
    missing = meshward("traces", "--state-dir", str(tmp_path))
    assert missing.returncode == 1
    assert f"no spans file at {tmp_path}/logs/spans.jsonl" in missing.stderr
    assert "`tracing:`" in missing.stderr
    bad_id = meshward("traces", "--spans-file", str(tmp_path), "--trace", "not-hex")
    assert bad_id.returncode == 2 and "--trace 'not-hex' is not a trace id" in bad_id.stderr


def test_meshward_up_runs_the_receiver_and_prints_span_trees(tmp_path: Path) -> None:
    """`meshward up --traces`: a loopback collector in the policy starts the built-in
    receiver; authz's decision spans (and Envoy's) land in the spans file and print as
    trees; Ctrl-C stops the receiver with everything else."""
    keys = new_keys()
    collector = free_port()
    ports = {"orders_port": free_port(), "catalog_port": free_port(), "gateway_port": free_port()}
    text = VALID_POLICY + f"tracing:\n  collector:\n    address: 127.0.0.1\n    port: {collector}\n"
    policy_dir = write_policy(tmp_path / "policies", text, keys=keys, **ports)
    state = tmp_path / "state"
    process = meshward_process(
        "up", "--traces", "--policy", str(policy_dir), "--state-dir", str(state),
        "--bootstrap-template", str(ROOT / "envoy" / "bootstrap.yaml"),
        cwd=tmp_path, env=dict(ENV, OTEL_BSP_SCHEDULE_DELAY="100"),
    )  # fmt: skip
    out = OutputLines(process)
    try:
        ready = out.wait(r"^Traces, one tree per request \(Ctrl-C stops everything\):", 60)
        assert ready is not None, out.text() + _logs(state)
        spans_file = state / "logs" / "spans.jsonl"
        assert f"traces             {spans_file}" in out.text()
        assert f"meshward traces -f --state-dir {state}" in out.text()
        token = tokens.sign(keys[0], tokens.claims("alice"))
        gateway = f"http://127.0.0.1:{ports['gateway_port']}"
        result = http(f"{gateway}/orders/7", headers={"authorization": f"Bearer {token}"})
        assert result.status == 200
        line = out.wait(r"meshward-authz: meshward\.authz\.check .* subject=alice", 20)
        assert line is not None, out.text() + _logs(state)
        assert "decision=allow reason=allowed" in out.lines[line]
        assert "route=orders-api" in out.lines[line]
        # No decision lines: the trees replace them.
        assert not any(x.startswith("ALLOW ") for x in out.lines)
        # The same trace, read back from the file by `meshward traces`.
        header = next(x for x in reversed(out.lines[: line + 1]) if x.startswith("trace "))
        trace_id = header.split()[1]
        shown = meshward("traces", "--state-dir", str(state), "--trace", trace_id)
        assert shown.returncode == 0, shown.stderr
        assert "subject=alice" in shown.stdout
    finally:
        code = _stop(process, signal.SIGINT)
    assert code == 0, out.text()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", collector)) != 0, "the receiver still listens"


def _logs(state: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((state / "logs").glob("*.log"))
    )
