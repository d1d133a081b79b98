"""Several authz processes as endpoints of the authz cluster, registered by their own ADS
streams: real ``meshward xds`` (no ``--authz``), two real ``meshward authz --xds`` and a
real Envoy 1.40 gateway.

Replica ``a`` listens on ``127.0.0.1:0`` (it announces the port it bound); replica ``b``
on ``0.0.0.0:0`` (a wildcard: the xDS server uses the IP its stream comes from). The
test checks, with Envoy's own view (admin ``/clusters``) and each replica's decision
counter (``meshward_authz_decisions_total``):

* Envoy's authz cluster lists both replicas, and Checks are decided by both;
* one replica SIGKILLed: its endpoint leaves Envoy's cluster, and every later request
  is decided, correctly, by the other;
* both SIGKILLed: the cluster is empty and every request fails closed (403, the
  default ``--authz-failure-status``), never 200;
* the xDS server SIGKILLed and restarted under traffic: no request fails (the restarted
  server holds the proxy's configuration back until a replica registers again).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import tokens
from tests.envoy_harness import EnvoyProcess, free_port, http_request
from tests.mesh_harness import RecordingUpstream
from tests.policy_files import new_keys, write_policy
from tests.process_mesh import Traffic, spawn_meshward, stop_processes, wait_http, wait_until
from xds_server.bootstrap import render_bootstrap
from xds_server.translator import AUTHZ_CLUSTER

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


class Mesh:
    """The processes of the test, each started and killed on the test's terms."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.status_ports: dict[str, int] = {}
        self.envoy: EnvoyProcess | None = None
        self.xds_port = free_port()

    def spawn(self, name: str, *args: str) -> None:
        self.procs[name] = spawn_meshward(self.work / f"{name}.log", list(args))

    def start_xds(self, policy_dir: Path) -> None:
        self.status_ports["xds"] = free_port()
        self.spawn(
            "xds",
            "xds",
            "--policy",
            str(policy_dir),
            "--listen",
            f"127.0.0.1:{self.xds_port}",
            "--status-listen",
            f"127.0.0.1:{self.status_ports['xds']}",
            "--ca-dir",
            str(self.work / "ca"),
            "--no-watch",
        )
        wait_http(f"http://127.0.0.1:{self.status_ports['xds']}/healthz", what="xds")

    def start_authz(self, name: str, listen: str) -> None:
        self.status_ports[name] = free_port()
        self.spawn(
            name,
            "authz",
            "--xds",
            f"127.0.0.1:{self.xds_port}",
            "--node-id",
            f"authz-{name}",
            "--listen",
            listen,
            "--status-listen",
            f"127.0.0.1:{self.status_ports[name]}",
            "--decision-log",
            str(self.work / f"decisions-{name}.jsonl"),
        )

    def start_envoy(self) -> EnvoyProcess:
        path = self.work / "envoy-edge.yaml"
        path.write_text(render_bootstrap("edge-test", "edge", 0, "127.0.0.1", self.xds_port))
        self.envoy = EnvoyProcess(path, 0)
        self.envoy.start()
        self.envoy.wait_live(20)
        return self.envoy

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def get_json(self, name: str, path: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.status_ports[name]}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return dict(json.loads(response.read()))

    def decisions(self, name: str) -> float:
        """Sum of the replica's ``meshward_authz_decisions_total`` (all outcomes)."""
        url = f"http://127.0.0.1:{self.status_ports[name]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("meshward_authz_decisions_total{")
        )

    def xds_metric(self, name: str) -> float:
        url = f"http://127.0.0.1:{self.status_ports['xds']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise AssertionError(f"{name} not in the xDS server's /metrics")

    def envoy_authz_hosts(self) -> set[str]:
        """HOST:PORT of every host of the authz cluster in Envoy's ``/clusters``."""
        assert self.envoy is not None
        status, body = self.envoy.admin("/clusters?format=json")
        assert status == 200
        for cluster in json.loads(body).get("cluster_statuses", []):
            if cluster["name"] == AUTHZ_CLUSTER:
                return {
                    f"{h['address']['socket_address']['address']}:"
                    f"{h['address']['socket_address']['port_value']}"
                    for h in cluster.get("host_statuses", [])
                }
        raise KeyError(f"{AUTHZ_CLUSTER} not in Envoy's /clusters")

    def logs(self) -> str:
        out = [
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.work.glob("*.log"))
        ]
        if self.envoy is not None:
            out.append(f"--- envoy\n{self.envoy.log_text(3000)}")
        return "\n".join(out)

    def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        stop_processes(self.procs.values())


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Mesh, dict[str, int], Any]]:
    keys = new_keys()
    ports = {"orders_port": free_port(), "catalog_port": free_port(), "gateway_port": free_port()}
    write_policy(tmp_path / "policies", keys=keys, **ports)
    upstreams = [
        RecordingUpstream("orders", ports["orders_port"]).start(),
        RecordingUpstream("catalog", ports["catalog_port"]).start(),
    ]
    work = tmp_path / "work"
    work.mkdir()
    mesh = Mesh(work)
    try:
        yield mesh, ports, keys[0]
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        mesh.stop()
        for upstream in upstreams:
            upstream.stop()


def test_replicas_share_checks_and_leave_the_cluster_when_killed(
    setup: tuple[Mesh, dict[str, int], Any],
) -> None:
    mesh, ports, rsa = setup
    policy_dir = mesh.work.parent / "policies"
    mesh.start_xds(policy_dir)
    mesh.start_authz("a", "127.0.0.1:0")
    mesh.start_authz("b", "0.0.0.0:0")
    for name in ("a", "b"):
        wait_http(f"http://127.0.0.1:{mesh.status_ports[name]}/healthz", what=f"authz {name}")

    def replicas() -> dict[str, dict[str, Any]]:
        return {r["node"]: r for r in mesh.get_json("xds", "/status")["authz_replicas"]}

    assert wait_until(lambda: sum(r["ready"] for r in replicas().values()) == 2), mesh.logs()
    registered = replicas()
    a = registered["authz-a"]["address"]
    b = registered["authz-b"]["address"]
    assert registered["authz-a"]["source"] == "announced"
    assert registered["authz-b"]["source"] == "peer"  # 0.0.0.0 → the stream's peer IP
    assert registered["authz-b"]["announced"].startswith("0.0.0.0:")
    assert a.startswith("127.0.0.1:") and b.startswith("127.0.0.1:") and a != b
    assert mesh.xds_metric("meshward_xds_authz_replicas") == 2
    # Replica changes are pushed together after a short coalescing delay.
    assert wait_until(lambda: mesh.xds_metric("meshward_xds_authz_endpoints") == 2)
    assert set(mesh.get_json("xds", "/status")["authz_endpoints"]) == {a, b}

    mesh.start_envoy()
    # Envoy's own EDS view of the authz cluster: both replicas.
    assert wait_until(lambda: mesh.envoy_authz_hosts() == {a, b}, 15), mesh.logs()

    def bearer(sub: str) -> dict[str, str]:
        return {"authorization": "Bearer " + tokens.sign(rsa, tokens.claims(sub, ()))}

    alice, bob = bearer("alice"), bearer("bob")

    def get(headers: dict[str, str]) -> int:
        return http_request(ports["gateway_port"], "/orders/1", headers=headers)[0]

    assert wait_until(lambda: get(alice) == 200, 15), mesh.logs()

    # Checks are spread over both replicas, and every one is decided right.
    before = {n: mesh.decisions(n) for n in ("a", "b")}
    for i in range(40):
        assert get(alice) == 200, i
        assert get(bob) == 403, i
    shares = {n: mesh.decisions(n) - before[n] for n in ("a", "b")}
    print(f"decisions per replica: {shares}")
    assert shares["a"] + shares["b"] == 80, shares
    assert shares["a"] > 0 and shares["b"] > 0, shares

    # Replica a dies: its endpoint leaves Envoy's cluster; b decides everything after.
    mesh.kill("a")
    assert wait_until(lambda: mesh.envoy_authz_hosts() == {b}, 15), mesh.logs()
    assert set(replicas()) == {"authz-b"}
    assert mesh.xds_metric("meshward_xds_authz_replicas") == 1
    before_b = mesh.decisions("b")
    for i in range(20):
        assert get(alice) == 200, i
        assert get(bob) == 403, i
    assert mesh.decisions("b") - before_b == 40

    # Both dead: an empty authz cluster, every request denied by Envoy (fail closed).
    mesh.kill("b")
    assert wait_until(lambda: mesh.envoy_authz_hosts() == set(), 15), mesh.logs()
    assert replicas() == {}
    assert mesh.xds_metric("meshward_xds_authz_endpoints") == 0
    statuses = [get(alice) for _ in range(20)]
    assert set(statuses) == {403}, statuses


def test_an_xds_restart_keeps_every_request_decided(
    setup: tuple[Mesh, dict[str, int], Any],
) -> None:
    """The xDS server SIGKILLed and restarted under traffic: the restarted server knows
    no replica until they reconnect, so it holds the proxy's configuration back until
    one registers (the start-up hold) instead of pushing an empty authz cluster. Envoy
    keeps its endpoints meanwhile: not one request fails."""
    mesh, ports, rsa = setup
    policy_dir = mesh.work.parent / "policies"
    mesh.start_xds(policy_dir)
    mesh.start_authz("a", "127.0.0.1:0")
    mesh.start_authz("b", "127.0.0.1:0")
    for name in ("a", "b"):
        wait_http(f"http://127.0.0.1:{mesh.status_ports[name]}/healthz", what=f"authz {name}")
    mesh.start_envoy()
    assert wait_until(lambda: len(mesh.envoy_authz_hosts()) == 2, 15), mesh.logs()
    hosts = mesh.envoy_authz_hosts()
    alice = {"authorization": "Bearer " + tokens.sign(rsa, tokens.claims("alice", ()))}
    assert wait_until(
        lambda: http_request(ports["gateway_port"], "/orders/1", headers=alice)[0] == 200, 15
    ), mesh.logs()

    def edge_synced() -> bool:
        """The edge proxy is back and applied the restarted server's version."""
        status = mesh.get_json("xds", "/status")
        edge = [n for n in status["nodes"] if n["group"] == "edge"]
        return bool(edge) and edge[0]["applied_version"] == status["version"]

    with Traffic(ports["gateway_port"], "/orders/1", alice) as traffic:
        time.sleep(0.5)
        mesh.kill("xds")
        time.sleep(0.5)
        mesh.start_xds(policy_dir)
        # Back in sync: both replicas registered again and the proxy applied the result.
        assert wait_until(
            lambda: len(mesh.get_json("xds", "/status")["authz_endpoints"]) == 2 and edge_synced(),
            20,
        ), mesh.logs()
        time.sleep(0.5)
    assert mesh.envoy_authz_hosts() == hosts
    statuses = traffic.all()
    assert set(statuses) == {200}, statuses
    assert statuses[200] > 50
