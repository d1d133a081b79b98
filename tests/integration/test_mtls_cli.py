"""``meshward xds`` with the PKI flags, as real processes: the built-in CA created in
``--ca-dir`` on first run (and nothing else written), an operator CA from
``--ca-cert``/``--ca-key``, ``--svid-lifetime`` driving real rotations, flag errors.

Envoys and the xDS server are separate processes (``tests/process_mesh.py``); authz is
the in-process recording stand-in, so requests pass and the tests can see what the
sidecar's ext_authz sent (``source.principal``).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshward import route_context
from meshward.pki import CertificateAuthority
from tests.envoy_harness import free_port
from tests.mesh_harness import RecordingUpstream
from tests.mtls_harness import (
    BackgroundLoop,
    RecordingAuthz,
    authz_tls_from_ca,
    client_context,
    https_request,
    start_authz,
    tls_exchange,
)
from tests.process_mesh import ROOT, ProcessMesh, wait_until

pytestmark = pytest.mark.integration

POLICY = """\
mesh:
  trust_domain: example.org
  namespace: shop
services:
  - name: orders
    endpoints: [{{address: 127.0.0.1, port: {app}}}]
    sidecar: {{port: {sidecar}}}
gateways:
  - name: edge
    port: {edge}
    tls: {{dns_names: [localhost]}}
    routes:
      - name: orders-api
        match: {{prefix: /orders}}
        service: orders
"""


@dataclass
class Cluster:
    mesh: ProcessMesh
    authz: RecordingAuthz
    ports: dict[str, int]


def _policy_dir(tmp: Path, ports: dict[str, int]) -> Path:
    directory = tmp / "policies"
    directory.mkdir()
    (directory / "mesh.yaml").write_text(POLICY.format(**ports))
    return directory


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    ports = {"app": free_port(), "sidecar": free_port(), "edge": free_port()}
    upstream = RecordingUpstream("orders", ports["app"]).start()
    work = tmp_path / "work"
    work.mkdir()
    mesh = ProcessMesh(
        _policy_dir(tmp_path, ports),
        work,
        ["edge"],
        xds_args=("--svid-lifetime", "70"),
        sidecars=["orders-sidecar"],
    )
    loop = BackgroundLoop()
    mesh.start_xds()  # creates the CA in mesh.ca_dir
    # Envoy → authz is mTLS: the stand-in serves an authz SVID of that CA.
    ca = CertificateAuthority.load_or_create(mesh.ca_dir, "example.org")
    tls = authz_tls_from_ca(ca, "spiffe://example.org/ns/shop/sa/meshward-authz")
    server, authz = loop.run(start_authz(mesh.authz_port, tls))
    try:
        for group in ("edge", "orders-sidecar"):
            mesh.start_envoy(group)
        yield Cluster(mesh, authz, ports)
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        mesh.stop()
        loop.run(server.stop(0.2))
        loop.close()
        upstream.stop()


def _get(cluster: Cluster, path: str) -> int:
    context = client_context(cluster.mesh.bundle)
    return https_request(cluster.ports["edge"], path, context)[0]


def _served_serials(cluster: Cluster, group: str) -> set[str]:
    _, body = cluster.mesh.envoys[group].admin("/certs")
    return {
        cert["serial_number"]
        for entry in json.loads(body)["certificates"]
        for cert in entry.get("cert_chain", [])
    }


def test_built_in_ca_is_created_and_drives_tls_mtls_and_rotation(cluster: Cluster) -> None:
    mesh = cluster.mesh
    # The CA directory holds exactly the CA's two files; the key is private.
    assert sorted(p.name for p in mesh.ca_dir.iterdir()) == ["ca.crt", "ca.key"]
    assert stat.S_IMODE(mesh.ca_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((mesh.ca_dir / "ca.key").stat().st_mode) == 0o600
    # An outside client with only ca.crt reaches the service through gateway → sidecar.
    assert wait_until(lambda: _get(cluster, "/orders/1") == 200, 15), mesh.logs()
    inbound = [
        c
        for c in cluster.authz.snapshot()
        if c.context.get(route_context.ROUTE) == "orders.inbound"
    ]
    assert inbound and inbound[-1].principal == "spiffe://example.org/ns/shop/sa/edge"

    status = mesh.status()
    creds = status["credentials"]
    assert status["version"].startswith(status["policy_version"] + "-")
    assert status["version"].endswith("+" + creds["generation"])
    first = creds["svids"]["orders"]["serial"]
    assert first in _served_serials(cluster, "orders-sidecar")
    # --svid-lifetime 70: renewed 5 s after issue (see test_mtls_rotation), by the
    # rotation task of the real process, with the real clock.
    assert wait_until(
        lambda: mesh.status()["credentials"]["svids"]["orders"]["serial"] != first, 80, 0.2
    )
    rotated = mesh.status()
    second = rotated["credentials"]["svids"]["orders"]["serial"]
    assert rotated["policy_version"] == status["policy_version"]
    assert rotated["version"] != status["version"]
    assert wait_until(lambda: second in _served_serials(cluster, "orders-sidecar"), 10)
    assert _get(cluster, "/orders/2") == 200
    assert "meshward_xds_credential_rotations_total" in mesh.metrics()

    # Private keys are never shown or logged.
    assert "PRIVATE KEY" not in json.dumps(rotated)
    log = (mesh.work / "xds.log").read_text()
    assert "PRIVATE KEY" not in log
    assert "certificates rotated" in log


def test_operator_ca_from_pem_files(tmp_path: Path) -> None:
    operator = tmp_path / "operator-ca"
    ca = CertificateAuthority.load_or_create(operator, "example.org")
    ports = {"app": free_port(), "sidecar": free_port(), "edge": free_port()}
    work = tmp_path / "work"
    work.mkdir()
    mesh = ProcessMesh(
        _policy_dir(tmp_path, ports),
        work,
        ["edge"],
        xds_args=("--ca-cert", str(operator / "ca.crt"), "--ca-key", str(operator / "ca.key")),
    )
    try:
        mesh.start_xds()
        mesh.start_envoy("edge")
        assert mesh.bundle == operator / "ca.crt"
        # The gateway's certificate chains to the operator's CA (authz is not running:
        # the request is denied, but over TLS verified with the operator's bundle).
        context = client_context(mesh.bundle)

        def answered() -> bool:
            request = b"GET /orders/1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            _, data = tls_exchange(ports["edge"], context, request, server_hostname="localhost")
            return data.startswith(b"HTTP/1.1 403")

        assert wait_until(answered, 15), mesh.logs()
        assert not mesh.ca_dir.exists()  # the built-in CA was not created
        assert mesh.status()["credentials"]["trust_domain"] == ca.trust_domain
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        mesh.stop()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ca-cert", "x.pem"], "--ca-cert and --ca-key go together"),
        (["--svid-lifetime", "30"], "--svid-lifetime 30: give 60 to 86400 seconds"),
        (["--ca-cert", "missing.crt", "--ca-key", "missing.key"], "not found"),
    ],
)
def test_bad_pki_flags_exit_2_with_the_fix(tmp_path: Path, flags: list[str], message: str) -> None:
    policy = _policy_dir(tmp_path, {"app": 1, "sidecar": 2, "edge": 3})
    result = subprocess.run(
        [sys.executable, "-m", "meshward", "xds", "--policy", str(policy), *flags],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert not (tmp_path / ".meshward").exists()
