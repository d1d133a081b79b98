"""`meshward up` with the zero-trust topology: HTTPS gateway → mTLS → sidecar → service.

Real processes throughout: the xDS server (with its built-in CA), authz fed over ADS, a
gateway Envoy and one sidecar Envoy per service; the test is an outside HTTPS client
that trusts only the CA bundle `meshward up` prints.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from joserfc.jwk import ECKey, RSAKey

from tests import tokens
from tests.envoy_harness import free_port
from tests.mesh_harness import Mesh, RecordingUpstream
from tests.mtls_harness import plaintext_exchange
from tests.policy_files import new_keys, write_policy

pytestmark = pytest.mark.integration

TLS_POLICY = """\
mesh:
  trust_domain: example.org
  namespace: shop
services:
  - name: orders
    endpoints: [{{address: 127.0.0.1, port: {orders_port}}}]
    sidecar: {{port: {orders_sidecar}}}
  - name: catalog
    endpoints: [{{address: 127.0.0.1, port: {catalog_port}}}]
    sidecar: {{port: {catalog_sidecar}}}
gateways:
  - name: edge
    port: {gateway_port}
    tls: {{dns_names: [localhost], min_version: "1.2"}}
    routes:
      - name: orders-api
        match: {{prefix: /orders}}
        service: orders
      - name: catalog-api
        match: {{prefix: /catalog}}
        service: catalog
issuers:
  - name: test
    issuer: https://issuer.test
    audiences: [meshward-test]
    jwks_file: keys/jwks.json
roles:
  - name: orders-reader
    permissions: [{{methods: [GET], paths: ["/orders/*"]}}]
bindings:
  - name: alice-reads-orders
    role: orders-reader
    subjects: [alice]
default: deny
"""


@dataclass
class TlsStack:
    mesh: Mesh
    ports: dict[str, int]
    orders: RecordingUpstream
    keys: tuple[RSAKey, ECKey]
    ca_bundle: Path

    def curl(
        self, path: str, *extra: str, token: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        args = [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/stderr",
            "-w",
            "%{http_code} %{http_version}",
            "--cacert",
            str(self.ca_bundle),
            *extra,
        ]
        if token:
            args += ["-H", f"Authorization: Bearer {token}"]
        args.append(f"https://localhost:{self.ports['gateway_port']}{path}")
        return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsStack]:
    base = tmp_path_factory.mktemp("tlsmesh")
    keys = new_keys()
    ports = {name: free_port() for name in ("orders_port", "catalog_port", "orders_sidecar",
                                            "catalog_sidecar", "gateway_port")}  # fmt: skip
    policy_dir = write_policy(base / "policies", text=TLS_POLICY, keys=keys, **ports)
    orders = RecordingUpstream("orders", ports["orders_port"]).start()
    catalog = RecordingUpstream("catalog", ports["catalog_port"]).start()
    mesh = Mesh.start(policy_dir, base / "state")
    try:
        yield TlsStack(mesh, ports, orders, keys, base / "state" / "ca" / "ca.crt")
    finally:
        mesh.stop()
        orders.stop()
        catalog.stop()


def test_banner_prints_https_url_and_curl_with_ca_bundle(stack: TlsStack) -> None:
    text = "\n".join(stack.mesh.lines)
    assert f"https://localhost:{stack.ports['gateway_port']}" in text
    assert f"curl -i --cacert {stack.ca_bundle} https://localhost:" in text
    assert "sidecar orders" in text and "spiffe://example.org/ns/shop/sa/orders" in text
    assert stack.ca_bundle.exists()
    assert (stack.ca_bundle.parent / "ca.key").stat().st_mode & 0o777 == 0o600


def test_external_client_reaches_service_through_gateway_and_sidecar(stack: TlsStack) -> None:
    token = tokens.sign(stack.keys[0], tokens.claims("alice"))
    before = len(stack.orders.requests)
    result = stack.curl("/orders/7", token=token)
    assert result.stdout.split()[0] == "200", result
    seen = stack.orders.requests[before:]
    assert len(seen) == 1
    # The sidecar's authz decision saw the gateway's SPIFFE ID as the mTLS peer.
    assert seen[0].headers["x-meshward-subject"] == "alice"
    assert seen[0].headers["x-meshward-workload"] == "spiffe://example.org/ns/shop/sa/edge"
    # HTTP/2 through ALPN.
    h2 = stack.curl("/orders/8", "--http2", token=token)
    assert h2.stdout.split() == ["200", "2"], h2


def test_denials_still_apply_over_tls(stack: TlsStack) -> None:
    assert stack.curl("/orders/7").stdout.split()[0] == "401"
    bob = tokens.sign(stack.keys[0], tokens.claims("bob"))
    assert stack.curl("/orders/7", token=bob).stdout.split()[0] == "403"


def test_gateway_refuses_plaintext_and_old_tls(stack: TlsStack) -> None:
    port = stack.ports["gateway_port"]
    reply = plaintext_exchange(port, b"GET /orders/7 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert not reply.startswith(b"HTTP/"), reply
    context = ssl.create_default_context(cafile=str(stack.ca_bundle))
    with warnings.catch_warnings():  # offering TLS 1.1 is the point of this check
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", port), 5) as raw:
        context.wrap_socket(raw, server_hostname="localhost")


def test_sidecar_refuses_plaintext_and_clients_without_certificates(stack: TlsStack) -> None:
    port = stack.ports["orders_sidecar"]
    reply = plaintext_exchange(port, b"GET /orders/7 HTTP/1.1\r\nHost: orders\r\n\r\n")
    assert not reply.startswith(b"HTTP/"), reply
    # TLS but no client certificate: the handshake (or the first read) fails.
    context = ssl.create_default_context(cafile=str(stack.ca_bundle))
    context.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", port), 5) as raw,
        pytest.raises((ssl.SSLError, ConnectionResetError)),
    ):
        tls = context.wrap_socket(raw)
        tls.sendall(b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
        if not tls.recv(100):
            raise ConnectionResetError("closed without a response")


def test_status_lists_every_proxy_and_authz(stack: TlsStack) -> None:
    status_url = json.loads((stack.mesh.state_dir / "up.json").read_text())["xds_status_url"]
    import urllib.request

    with urllib.request.urlopen(status_url, timeout=5) as resp:
        status = json.loads(resp.read())
    groups = {n["group"] for n in status["nodes"]}
    assert groups == {"edge", "orders-sidecar", "catalog-sidecar", "meshward-authz"}
    assert all(n["applied_version"] for n in status["nodes"])
