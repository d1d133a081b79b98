"""``meshward up --authz-replicas 2``: both authz processes register with the xDS server
and decide requests through the real gateway Envoy; decision lines from both are shown."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from tests import tokens
from tests.envoy_harness import free_port
from tests.mesh_harness import Mesh, RecordingUpstream, http
from tests.policy_files import new_keys, write_policy

pytestmark = pytest.mark.integration


def decisions(status_url: str) -> float:
    metrics_url = status_url.replace("/status", "/metrics")
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("meshward_authz_decisions_total{")
    )


def test_two_replicas_share_the_checks(tmp_path: Path) -> None:
    keys = new_keys()
    ports: dict[str, int] = {
        "orders_port": free_port(),
        "catalog_port": free_port(),
        "gateway_port": free_port(),
    }
    policy_dir = write_policy(
        tmp_path / "policies",
        keys=keys,
        orders_port=ports["orders_port"],
        catalog_port=ports["catalog_port"],
        gateway_port=ports["gateway_port"],
    )
    orders = RecordingUpstream("orders", ports["orders_port"]).start()
    mesh = Mesh.start(policy_dir, tmp_path / "state", args=("--authz-replicas", "2"))
    try:
        state = json.loads((tmp_path / "state" / "up.json").read_text())
        replicas = state["authz_replicas"]
        assert [r["name"] for r in replicas] == ["authz", "authz-2"]
        assert any("authz-2" in line and "mTLS only" in line for line in mesh.lines)

        # Both registered themselves: the xDS server serves both as authz endpoints.
        with urllib.request.urlopen(state["xds_status_url"], timeout=5) as reply:
            status = json.loads(reply.read())
        assert sorted(status["authz_endpoints"]) == sorted(r["authz"] for r in replicas)

        alice = tokens.sign(keys[0], tokens.claims("alice"))
        bob = tokens.sign(keys[0], tokens.claims("bob", groups=("customers",)))
        url = f"http://127.0.0.1:{ports['gateway_port']}/orders/1"
        results = [
            http(url, headers={"authorization": f"Bearer {alice if i % 2 else bob}"}).status
            for i in range(60)
        ]
        assert results.count(200) == 30 and results.count(403) == 30
        per_replica = [decisions(r["status_url"]) for r in replicas]
        assert sum(per_replica) == 60
        assert all(n > 0 for n in per_replica), per_replica  # Envoy spread the Checks

        # Decision lines of both replicas reach meshward up's output.
        logs = [Path(r["decision_log"]) for r in replicas]
        assert all(p.exists() and p.stat().st_size > 0 for p in logs)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            shown = sum(1 for line in list(mesh.lines) if " GET /orders/1 " in line)
            if shown >= 60:
                break
            time.sleep(0.1)
        assert shown == 60
    finally:
        mesh.stop()
        orders.stop()
