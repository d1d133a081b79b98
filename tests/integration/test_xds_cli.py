"""``meshward xds`` as a process: policy errors, listening, status side door, reload, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.envoy_harness import http_request
from tests.policy_files import write_policy
from tests.process_mesh import wait_log
from tests.xds_harness import AdsClient
from xds_server import resources as rs

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _start(policy_dir: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshward",
            "xds",
            "--policy",
            str(policy_dir),
            "--listen",
            "127.0.0.1:0",
            "--status-listen",
            "127.0.0.1:0",
            "--ca-dir",
            str(policy_dir.parent / "ca"),  # never the checkout's .meshward/
            *extra,
        ],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        raise


def _status(port: int) -> dict[str, Any]:
    code, _, body = http_request(port, "/status")
    assert code == 200
    return dict(json.loads(body))


def test_bad_policy_exits_2_with_file_and_line(tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "policy")
    mesh = policy / "mesh.yaml"
    mesh.write_text(mesh.read_text().replace("service: catalog", "service: nowhere"))
    proc = _start(policy)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert f"{mesh}:" in err
    assert "nowhere" in err
    assert "Traceback" not in err


def test_serves_status_reloads_on_sighup_and_stops_on_sigterm(tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "policy")
    proc = _start(policy, "--authz", "127.0.0.1:9999", "--authz", "127.0.0.1:9998")
    try:
        record = wait_log(proc, "xds server listening")
        xds_port = int(record["listen"].rsplit(":", 1)[1])
        status_port = int(record["status"].rsplit(":", 1)[1])
        assert record["gateways"] == ["edge"]
        assert record["authz"] == ["127.0.0.1:9999", "127.0.0.1:9998"]

        assert http_request(status_port, "/healthz")[0] == 200
        status = _status(status_port)
        version = status["version"]
        assert version.startswith(status["policy_version"] + "-")  # non-default authz
        assert status["snapshots"] == {"edge": version, "meshward-authz": version}

        async def subscribe() -> None:
            async with AdsClient(xds_port) as client:
                await client.send(rs.CLUSTER)
                response = await client.recv()
                assert response.version_info == version
                await client.ack(response)
                # The status thread sees the connected node and its ACK.
                for _ in range(100):
                    nodes = (await asyncio.to_thread(_status, status_port))["nodes"]
                    if nodes and nodes[0]["types"]["cds"]["acked"] == version:
                        break
                    await asyncio.sleep(0.05)
                assert nodes[0]["group"] == "edge"
                assert nodes[0]["types"]["cds"]["acked"] == version

        asyncio.run(asyncio.wait_for(subscribe(), 20))
        _, _, metrics = http_request(status_port, "/metrics")
        assert b'meshward_xds_responses_total{type="cds"} 1.0' in metrics

        # A bad edit + SIGHUP: rejected, logged, the last good policy keeps serving.
        mesh = policy / "mesh.yaml"
        good_text = mesh.read_text()
        mesh.write_text(good_text.replace("prefix: /catalog", "prefix: 42x: ["))
        os.kill(proc.pid, signal.SIGHUP)
        line = wait_log(proc, "policy edit rejected")
        assert any("mesh.yaml:" in error for error in line["errors"])
        assert _status(status_port)["version"] == version

        # A good edit + SIGHUP: a new version.
        mesh.write_text(good_text.replace("prefix: /catalog", "prefix: /shop"))
        os.kill(proc.pid, signal.SIGHUP)
        line = wait_log(proc, "policy applied")
        assert line["previous"] == version
        assert _status(status_port)["version"] == line["version"] != version
    finally:
        code = _stop(proc)
    assert code == 0
    assert proc.stderr is not None
    rest = proc.stderr.read()
    assert "Traceback" not in rest
    assert "xds server stopping" in rest
