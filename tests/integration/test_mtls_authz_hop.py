"""The Envoy → authz hop is mTLS with SPIFFE identities, like every other hop.

All real processes (``tests/process_mesh.py``): ``meshward xds`` with its built-in CA,
``meshward authz --xds`` (which gets its SVID and the trust bundle over ADS, beside the
policy) and a gateway Envoy. Requests through Envoy are still decided; authz refuses a
plaintext client, a client certificate of another CA and a client without one, and
answers a client holding an SVID of the trust domain. Standalone authz (``--policy``)
serves static mTLS with ``--tls-cert/--tls-key/--tls-ca``. Envoy's authz cluster checks
authz's exact SPIFFE ID.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshward.pki import CertificateAuthority
from meshward.policy.loader import load_policy
from tests import tokens
from tests.authz_helpers import check_request
from tests.envoy_harness import free_port, http_request
from tests.mesh_harness import RecordingUpstream
from tests.mtls_harness import TlsRelay
from tests.policy_files import new_keys, write_policy
from tests.process_mesh import ROOT, ProcessMesh, wait_http, wait_until

pytestmark = pytest.mark.integration

GRPC_OK, GRPC_PERMISSION_DENIED = 0, 7


class Hop:
    def __init__(self, mesh: ProcessMesh, ports: dict[str, int], keys: Any) -> None:
        self.mesh = mesh
        self.ports = ports
        self.rsa = keys[0]
        self.policy = load_policy(mesh.policy_dir)
        self.ca = CertificateAuthority.load_or_create(mesh.ca_dir, self.policy.mesh.trust_domain)
        self.relays: list[TlsRelay] = []

    def get(self, path: str, sub: str) -> int:
        token = tokens.sign(self.rsa, tokens.claims(sub, ()))
        status, _, _ = http_request(
            self.ports["gateway_port"], path, headers={"authorization": f"Bearer {token}"}
        )
        return status

    def relay(self, cert: tuple[bytes, bytes] | None, bundle: bytes | None = None) -> TlsRelay:
        relay = TlsRelay(self.mesh.authz_port, bundle or self.ca.bundle_pem, cert)
        self.relays.append(relay)
        return relay

    def check(self, address: str, sub: str = "alice") -> Any:
        """A Check of ``GET /orders/1`` as ``sub`` through gRPC at ``address``."""
        token = tokens.sign(self.rsa, tokens.claims(sub, ()))
        request = check_request("GET", "/orders/1", {"authorization": f"Bearer {token}"})
        with grpc.insecure_channel(address) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            return stub.Check(request, timeout=5)


@pytest.fixture(scope="module")
def hop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hop]:
    tmp = tmp_path_factory.mktemp("authzhop")
    keys = new_keys()
    ports = {"orders_port": free_port(), "catalog_port": free_port(), "gateway_port": free_port()}
    policy_dir = write_policy(tmp / "policies", keys=keys, **ports)
    upstreams = [
        RecordingUpstream("orders", ports["orders_port"]).start(),
        RecordingUpstream("catalog", ports["catalog_port"]).start(),
    ]
    work = tmp / "work"
    work.mkdir()
    mesh = ProcessMesh(policy_dir, work, ["edge"])
    hop: Hop | None = None
    try:
        mesh.start()
        hop = Hop(mesh, ports, keys)
        assert wait_until(lambda: hop.get("/orders/1", "alice") == 200, 15), mesh.logs()  # type: ignore[union-attr]
        yield hop
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        for relay in hop.relays if hop is not None else []:
            relay.close()
        mesh.stop()
        for upstream in upstreams:
            upstream.stop()


def test_requests_through_envoy_are_still_decided(hop: Hop) -> None:
    assert hop.get("/orders/1", "alice") == 200
    assert hop.get("/orders/1", "bob") == 403
    # authz reports the SVID it serves with, received over ADS.
    status = hop.mesh.metrics("authz")
    assert 'meshward_authz_secret_updates_total{result="ack"}' in status


def test_envoy_authz_cluster_is_mtls_to_the_exact_authz_spiffe_id(hop: Hop) -> None:
    dump = hop.mesh.envoys["edge"].config_dump()
    clusters = [
        c["cluster"]
        for section in dump["configs"]
        if section["@type"].endswith("ClustersConfigDump")
        for c in section.get("dynamic_active_clusters", [])
    ]
    [authz] = [c for c in clusters if c["name"] == "meshward_authz"]
    socket = authz["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    common = socket["typed_config"]["common_tls_context"]
    assert common["tls_certificate_sds_secret_configs"][0]["name"] == "svid"
    combined = common["combined_validation_context"]
    assert combined["validation_context_sds_secret_config"]["name"] == "trust-bundle"
    [san] = combined["default_validation_context"]["match_typed_subject_alt_names"]
    assert san["san_type"] == "URI"
    assert san["matcher"] == {"exact": hop.policy.spiffe_id("meshward-authz")}
    assert common["alpn_protocols"] == ["h2"]


def test_a_plaintext_check_fails(hop: Hop) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        hop.check(f"127.0.0.1:{hop.mesh.authz_port}")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_a_client_certificate_of_another_ca_fails(hop: Hop) -> None:
    other = CertificateAuthority.generate(hop.policy.mesh.trust_domain)
    # Same trust domain, same workload name, but not chained to the mesh bundle.
    svid = other.issue_svid(hop.policy.spiffe_id("edge"))
    relay = hop.relay((svid.chain_pem, svid.key_pem))
    with pytest.raises(grpc.RpcError) as caught:
        hop.check(relay.address)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    # And no client certificate at all fails too.
    bare = hop.relay(None)
    with pytest.raises(grpc.RpcError):
        hop.check(bare.address)


def test_a_client_with_an_svid_of_the_trust_domain_is_answered(hop: Hop) -> None:
    svid = hop.ca.issue_svid(hop.policy.spiffe_id("edge"))
    relay = hop.relay((svid.chain_pem, svid.key_pem))
    assert hop.check(relay.address, "alice").status.code == GRPC_OK
    assert hop.check(relay.address, "bob").status.code == GRPC_PERMISSION_DENIED
    with grpc.insecure_channel(relay.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # authz verified the server side too: the relay checked authz against the bundle.
    assert not [e for e in relay.handshake_errors if "CERTIFICATE" in e.upper()]


def test_standalone_authz_serves_static_mtls_with_tls_files(hop: Hop, tmp_path: Path) -> None:
    svid = hop.ca.issue_svid(hop.policy.spiffe_id("meshward-authz"))
    files = {"cert": svid.chain_pem, "key": svid.key_pem, "ca": hop.ca.bundle_pem}
    for name, data in files.items():
        (tmp_path / f"{name}.pem").write_bytes(data)
    tls_args = [f"--tls-{n}={tmp_path / f'{n}.pem'}" for n in files]
    port, status_port = free_port(), free_port()
    base = [sys.executable, "-m", "meshward", "authz"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    with_xds = run("--xds", "127.0.0.1:1", *tls_args)
    assert with_xds.returncode == 2 and "only apply with --policy" in with_xds.stderr
    partial = run("--policy", str(hop.mesh.policy_dir), tls_args[0])
    assert partial.returncode == 2 and "together" in partial.stderr

    proc = subprocess.Popen(
        [
            *base,
            "--policy",
            str(hop.mesh.policy_dir),
            "--listen",
            f"127.0.0.1:{port}",
            "--status-listen",
            f"127.0.0.1:{status_port}",
            *tls_args,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{status_port}/healthz", what="static mTLS authz")
        with pytest.raises(grpc.RpcError):
            hop.check(f"127.0.0.1:{port}")  # plaintext: refused
        client = hop.ca.issue_svid(hop.policy.spiffe_id("edge"))
        relay = TlsRelay(port, hop.ca.bundle_pem, (client.chain_pem, client.key_pem))
        hop.relays.append(relay)
        assert hop.check(relay.address, "alice").status.code == GRPC_OK
        assert hop.check(relay.address, "bob").status.code == GRPC_PERMISSION_DENIED
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
