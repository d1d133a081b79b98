"""Policy lifecycle and faults, with real processes: xDS server, authz fed over ADS, Envoy.

- an edit of the policy file is enforced everywhere within a second;
- an invalid edit is rejected with file:line errors and the old rules keep working;
- the xDS server killed and restarted under continuous traffic: zero failed requests;
- authz killed: every request denied (fail closed, with the configured status), never
  let through; authz back: traffic recovers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import tokens
from tests.envoy_harness import free_port, http_request
from tests.mesh_harness import RecordingUpstream
from tests.policy_files import VALID_POLICY, new_keys, write_policy
from tests.process_mesh import ROOT, ProcessMesh, Traffic, wait_until

pytestmark = pytest.mark.integration


class World:
    def __init__(self, mesh: ProcessMesh, ports: dict[str, int], keys: tuple) -> None:
        self.mesh = mesh
        self.ports = ports
        self.rsa = keys[0]
        self.keys = keys

    def bearer(self, sub: str, groups: tuple[str, ...] = ()) -> dict[str, str]:
        return {"authorization": "Bearer " + tokens.sign(self.rsa, tokens.claims(sub, groups))}

    def get(self, path: str, sub: str | None = None) -> int:
        headers = self.bearer(sub) if sub else {}
        status, _, _ = http_request(self.ports["gateway_port"], path, headers=headers)
        return status

    def edit(self, text: str) -> None:
        path = self.mesh.policy_dir / "mesh.yaml"
        tmp = path.with_suffix(".tmp-edit")
        tmp.write_text(text.format(**self.ports))
        tmp.replace(path)  # atomic, as editors and config management tools do

    def node_versions(self) -> dict[str, str | None]:
        return {n["id"]: n.get("applied_version") for n in self.mesh.status()["nodes"]}


def _start(tmp: Path, xds_args: tuple[str, ...] = ()) -> tuple[World, list[RecordingUpstream]]:
    keys = new_keys()
    ports = {"orders_port": free_port(), "catalog_port": free_port(), "gateway_port": free_port()}
    policy_dir = write_policy(tmp / "policies", keys=keys, **ports)
    upstreams = [
        RecordingUpstream("orders", ports["orders_port"]).start(),
        RecordingUpstream("catalog", ports["catalog_port"]).start(),
    ]
    work = tmp / "work"
    work.mkdir()
    mesh = ProcessMesh(policy_dir, work, ["edge"], xds_args=xds_args)
    try:
        mesh.start()
    except BaseException:
        print(mesh.logs())
        mesh.stop()
        raise
    world = World(mesh, ports, keys)
    assert wait_until(lambda: world.get("/orders/1", "alice") == 200, 15), mesh.logs()
    return world, upstreams


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w, upstreams = _start(tmp_path)
    try:
        yield w
    finally:
        w.mesh.stop()
        for u in upstreams:
            u.stop()


def test_policy_edit_is_enforced_within_one_second(world: World) -> None:
    assert world.get("/orders/1", "bob") == 403
    before = world.mesh.status()["policy"]["serving_version"]
    world.edit(VALID_POLICY.replace("subjects: [alice]", "subjects: [alice, bob]"))
    edited = time.monotonic()
    assert wait_until(lambda: world.get("/orders/1", "bob") == 200, timeout=5, step=0.01)
    took = time.monotonic() - edited
    print(f"policy edit enforced after {took * 1000:.0f} ms")
    assert took < 1.0, f"the edit took {took:.2f}s to be enforced"

    status = world.mesh.status()
    after = status["policy"]["serving_version"]
    assert after != before
    # Every node (the Envoy and the authz replica) reports the new version, with a
    # convergence time measured from the policy change.
    nodes = {n["group"]: n for n in status["nodes"]}
    assert set(nodes) == {"edge", "meshward-authz"}
    for node in nodes.values():
        assert after in node["applied_version"], node
        assert 0 <= node["convergence_seconds"] < 5, node

    # `meshward status` shows the same as a table, and exits 0 when all is well.
    table = _meshward_status(world)
    assert table.returncode == 0, table.stderr
    assert f"policy {after} from" in table.stdout and "files valid" in table.stdout
    rows = [line.split() for line in table.stdout.splitlines()]
    assert ["edge-test", "edge"] in [r[:2] for r in rows]
    assert ["authz-test", "meshward-authz"] in [r[:2] for r in rows]


def _meshward_status(world: World) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "meshward",
            "status",
            "--url",
            f"http://127.0.0.1:{world.mesh.xds_status_port}/status",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


def test_invalid_edit_is_rejected_and_old_rules_keep_working(world: World) -> None:
    version = world.mesh.status()["policy"]["serving_version"]
    # Grants bob but also references a role that does not exist: the whole edit is refused.
    world.edit(
        VALID_POLICY.replace("subjects: [alice]", "subjects: [alice, bob]").replace(
            "    role: catalog-reader", "    role: catalog-writer"
        )
    )
    assert wait_until(lambda: not world.mesh.status()["policy"]["valid"], timeout=5)
    policy = world.mesh.status()["policy"]
    assert policy["serving_version"] == version
    (error,) = policy["errors"]
    assert error.startswith(f"{world.mesh.policy_dir}/mesh.yaml:")
    assert "role 'catalog-writer' is not defined" in error
    assert "meshward_xds_policy_errors 1.0" in world.mesh.metrics()
    table = _meshward_status(world)
    assert table.returncode == 1  # invalid files are something an operator must see
    assert "files INVALID (last good version still served)" in table.stdout
    assert "role 'catalog-writer' is not defined" in table.stdout
    # The old rules are still what Envoy and authz enforce.
    assert world.get("/orders/1", "bob") == 403
    assert world.get("/orders/1", "alice") == 200
    assert all(v is not None and version in v for v in world.node_versions().values())

    world.edit(VALID_POLICY)  # fixed (back to the served content)
    assert wait_until(lambda: world.mesh.status()["policy"]["valid"], timeout=5)
    assert "meshward_xds_policy_errors 0.0" in world.mesh.metrics()


def test_xds_restart_under_traffic_loses_no_request(world: World) -> None:
    with Traffic(world.ports["gateway_port"], "/orders/1", world.bearer("alice")) as traffic:
        time.sleep(0.5)
        world.mesh.kill("xds", signal.SIGKILL)
        time.sleep(1.5)  # Envoy and authz keep serving their last config meanwhile
        world.mesh.start_xds()
        # Both clients come back (empty nonce, full state) and ACK the same version.
        version = world.mesh.status()["policy"]["serving_version"]
        assert wait_until(
            lambda: (
                len(world.node_versions()) == 2
                and all(v is not None and version in v for v in world.node_versions().values())
            ),
            timeout=15,
        ), world.mesh.status()
        time.sleep(0.5)
    counts = traffic.all()
    assert counts[200] > 50, counts
    assert set(counts) == {200}, f"failed requests during the xDS restart: {counts}"
    # The restarted server pushes the full state again and rules still apply.
    assert world.get("/orders/1", "bob") == 403


def test_authz_down_fails_closed_with_configured_status_then_recovers(tmp_path: Path) -> None:
    world, upstreams = _start(tmp_path, xds_args=("--authz-failure-status", "503"))
    try:
        orders = upstreams[0]
        with Traffic(world.ports["gateway_port"], "/orders/1", world.bearer("alice")) as traffic:
            time.sleep(0.3)
            world.mesh.kill("authz", signal.SIGKILL)
            killed = time.monotonic()
            seen_before = len(orders.requests)
            time.sleep(1.5)
            outage_end = time.monotonic()
            outage = traffic.between(killed + 0.05, outage_end)
            reached_upstream = len(orders.requests) - seen_before
            world.mesh.start_authz()
            assert wait_until(
                lambda: traffic.between(time.monotonic() - 0.2, time.monotonic())[200] > 0, 15
            )
        assert outage, "no requests were sent during the outage"
        assert set(outage) == {503}, f"during the authz outage: {outage}"
        # Allowing for requests in flight at the kill, nothing reached the upstream.
        assert reached_upstream <= 2, reached_upstream
        assert traffic.all()[200] > 0
        assert world.get("/orders/1", "bob") == 403  # rules apply again, from xDS
    finally:
        world.mesh.stop()
        for u in upstreams:
            u.stop()
