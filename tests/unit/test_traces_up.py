"""`meshward up`'s tracing set-up: when it runs the built-in receiver, what authz is told,
what the banner and up.json say, and the errors for `--traces` and a busy collector port."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import pytest

from meshward import up
from meshward.policy.loader import load_policy
from meshward.policy.model import Policy, Tracing
from meshward.spans_file import spans_file_path
from tests.policy_files import VALID_POLICY, new_keys, write_policy

STATE = Path("/state")
# Block style: write_policy formats the text, so no braces.
TRACING = "tracing:\n  collector:\n    address: 127.0.0.1\n    port: {port}\n"


def _policy(address: str | None, port: int = 4317) -> Policy:
    if address is None:
        return Policy.build()
    return Policy.build(tracing=Tracing(address, port))


def _args(**flags: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "policy": Path("policies"),
        "state_dir": STATE,
        "no_trace_receiver": False,
        "traces": False,
    }
    values.update(flags)
    return argparse.Namespace(**values)


def test_loopback_collector_runs_the_built_in_receiver() -> None:
    plan = up.trace_plan(_policy("127.0.0.1"), STATE)
    assert plan.receiver and plan.collector == "127.0.0.1:4317"
    assert plan.spans_file == spans_file_path(STATE) == STATE / "logs" / "spans.jsonl"
    assert plan.authz_env() == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    assert up._traces_unavailable(_policy("127.0.0.1"), plan, _args(traces=True)) is None
    v6 = up.trace_plan(_policy("::1", 14317), STATE)
    assert v6.receiver and v6.authz_env()["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://[::1]:14317"


@pytest.mark.parametrize(
    ("address", "start_receiver"),
    [("10.1.2.3", True), ("otel.example", True), ("127.0.0.1", False)],
)
def test_other_collectors_get_authz_spans_but_no_receiver(
    address: str, start_receiver: bool
) -> None:
    plan = up.trace_plan(_policy(address), STATE, start_receiver)
    assert not plan.receiver and plan.spans_file is None
    assert plan.authz_env()["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://{address}:4317"
    assert up._trace_banner(plan, STATE) == [
        f"  traces             exported to your collector at {address}:4317"
    ]


def test_no_tracing_section_means_no_receiver_and_no_otel_env() -> None:
    plan = up.trace_plan(_policy(None), STATE)
    assert plan == up.TracePlan() and plan.authz_env() == {}
    assert "add `tracing:`" in up._trace_banner(plan, STATE)[0]


def test_banner_says_where_traces_go_and_how_to_view_them() -> None:
    plan = up.trace_plan(_policy("127.0.0.1"), Path(".meshward"))
    assert up._trace_banner(plan, Path(".meshward")) == [
        "  traces             .meshward/logs/spans.jsonl   "
        "(built-in OTLP receiver on 127.0.0.1:4317)",
        "  view traces        meshward traces -f   (one span tree per request)",
    ]
    other = up.trace_plan(_policy("127.0.0.1"), Path("/tmp/st"))
    assert "meshward traces -f --state-dir /tmp/st" in up._trace_banner(other, Path("/tmp/st"))[1]


def test_traces_flag_errors_name_the_cause_and_the_fix() -> None:
    none = _policy(None)
    why = up._traces_unavailable(none, up.trace_plan(none, STATE), _args(traces=True))
    assert why is not None and "has no `tracing:` section" in why and "port: 4317" in why
    loop = _policy("127.0.0.1")
    why = up._traces_unavailable(
        loop, up.trace_plan(loop, STATE, False), _args(traces=True, no_trace_receiver=True)
    )
    assert why is not None and "drop --no-trace-receiver" in why
    remote = _policy("10.1.2.3")
    why = up._traces_unavailable(remote, up.trace_plan(remote, STATE), _args(traces=True))
    assert why is not None and "not 10.1.2.3:4317" in why and "use 127.0.0.1" in why


def test_busy_collector_port_is_reported_with_its_policy_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = VALID_POLICY + TRACING.format(port=port)
        policy_dir = write_policy(tmp_path / "p", text, keys=new_keys())
        policy = load_policy(policy_dir)
        assert policy.tracing is not None and policy.tracing.collector_port == port
        plan = up.trace_plan(policy, tmp_path)
        (busy,) = up._busy_policy_ports(policy, False, plan)
        assert busy.startswith(f"{policy_dir}/mesh.yaml:")
        assert f"127.0.0.1:{port}, which is busy" in busy
        assert "--no-trace-receiver" in busy
        # Not ours to start: not checked.
        assert up._busy_policy_ports(policy, False, up.trace_plan(policy, tmp_path, False)) == []


def test_state_file_records_the_spans_file(tmp_path: Path) -> None:
    ports = up.Ports(xds=1, xds_status=2, authz=3, authz_status=4, admin={"edge": 5})
    plan = up.trace_plan(_policy("127.0.0.1"), tmp_path)
    up._write_state(tmp_path, ports, plan)
    info = json.loads((tmp_path / "up.json").read_text())
    assert info["spans_file"] == str(tmp_path / "logs" / "spans.jsonl")
    assert info["trace_collector"] == "127.0.0.1:4317"
    up._write_state(tmp_path, ports)
    info = json.loads((tmp_path / "up.json").read_text())
    assert info["spans_file"] is None and info["decision_log"].endswith("decisions.jsonl")
