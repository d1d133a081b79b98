"""Zero-trust transport with real Envoy 1.40: TLS at the gateway, mTLS gateway → sidecar.

One mesh for the module (the xDS server runs in-process with the built-in CA of the
test's directory; authz is a stand-in that allows everything and records each
CheckRequest):

* ``edge``   — TLS gateway (TLS 1.2+): ``/orders`` → orders (sidecar), ``/ghost`` →
  ghost (a sidecar no Envoy serves: the tests put an impostor on its port), ``/plain``
  → plain (no sidecar: plaintext as before);
* ``edge13`` — TLS gateway with ``min_version: "1.3"``;
* ``orders-sidecar`` — the sidecar of orders, on Delta ADS (the gateways use SotW), so
  SDS is exercised over both protocols.

Clients are real: Python ``ssl`` and ``curl``, trusting only the CA bundle file.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from meshward import route_context
from meshward.pki import CertificateAuthority, utc_now
from meshward.policy.model import (
    Endpoint,
    Gateway,
    GatewayTls,
    Mesh,
    Policy,
    Route,
    RouteMatch,
    Service,
    Sidecar,
)
from tests.envoy_harness import EnvoyProcess, free_port, http_request
from tests.mesh_harness import RecordingUpstream
from tests.mtls_harness import (
    MtlsMesh,
    TlsServer,
    client_context,
    https_request,
    plaintext_exchange,
    tls_exchange,
    write_pem,
)
from tests.process_mesh import wait_until
from xds_server.translator import SERVER_CERT_SECRET, SVID_SECRET, TRUST_BUNDLE_SECRET

pytestmark = pytest.mark.integration

TD = "example.org"
NS = "shop"


def spiffe(workload: str) -> str:
    return f"spiffe://{TD}/ns/{NS}/sa/{workload}"


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports = {
            name: free_port()
            for name in ("edge", "edge13", "orders_app", "plain_app", "orders_sc", "ghost_sc")
        }
        self.orders = RecordingUpstream("orders", self.ports["orders_app"]).start()
        self.plain = RecordingUpstream("plain", self.ports["plain_app"]).start()
        p = self.ports
        policy = Policy.build(
            mesh=Mesh(trust_domain=TD, namespace=NS),
            services=(
                Service(
                    "orders", (Endpoint("127.0.0.1", p["orders_app"]),), Sidecar(p["orders_sc"])
                ),
                # Its endpoint is never reached: only the (impostor on the) sidecar port is.
                Service("ghost", (Endpoint("127.0.0.1", 9),), Sidecar(p["ghost_sc"])),
                Service("plain", (Endpoint("127.0.0.1", p["plain_app"]),)),
            ),
            gateways=(
                Gateway(
                    "edge",
                    p["edge"],
                    (
                        Route("orders-api", RouteMatch(prefix="/orders"), "orders"),
                        Route("ghost-api", RouteMatch(prefix="/ghost"), "ghost"),
                        Route("plain-api", RouteMatch(prefix="/plain"), "plain"),
                    ),
                    tls=GatewayTls(dns_names=("localhost",)),
                ),
                Gateway(
                    "edge13",
                    p["edge13"],
                    (Route("orders13-api", RouteMatch(prefix="/orders"), "orders"),),
                    tls=GatewayTls(dns_names=("localhost",), min_version="1.3"),
                ),
            ),
        )
        self.mesh = MtlsMesh(policy, tmp)
        self.mesh.start({"edge": "GRPC", "edge13": "GRPC", "orders-sidecar": "DELTA_GRPC"})
        assert self.mesh.ca is not None
        self.ca: CertificateAuthority = self.mesh.ca

    def https(self, port: str, path: str, **kwargs: object) -> tuple[int, dict[str, str], bytes]:
        context = client_context(self.mesh.bundle, **kwargs)  # type: ignore[arg-type]
        return https_request(self.ports[port], path, context)

    def stop(self) -> None:
        self.mesh.stop()
        self.orders.stop()
        self.plain.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("mtls"))
    try:
        yield w
    except BaseException:
        print(w.mesh.logs())
        raise
    finally:
        w.stop()


def _checks_for(world: World, route: str) -> list[tuple[dict[str, str], str]]:
    assert world.mesh.authz is not None
    return [
        (c.context, c.principal)
        for c in world.mesh.authz.snapshot()
        if c.context.get(route_context.ROUTE) == route
    ]


def test_https_client_reaches_service_through_gateway_and_sidecar(world: World) -> None:
    before = len(world.orders.requests)
    # A client-sent x-forwarded-client-cert must never reach the app as such.
    forged = "By=spiffe://example.org/ns/shop/sa/orders;URI=spiffe://example.org/ns/shop/sa/admin"
    status, _, body = https_request(
        world.ports["edge"],
        "/orders/7",
        client_context(world.mesh.bundle),
        headers={"x-forwarded-client-cert": forged},
    )
    assert status == 200, body
    assert json.loads(body) == {"service": "orders", "path": "/orders/7"}
    [seen] = world.orders.requests[before:]
    # The sidecar replaced the forged XFCC with what it verified: the gateway's SVID.
    xfcc = seen.headers["x-forwarded-client-cert"]
    assert f"By={spiffe('orders')}" in xfcc and f"URI={spiffe('edge')}" in xfcc, xfcc
    assert "sa/admin" not in xfcc

    # authz ran twice: at the gateway (outside client: no peer identity) and at the
    # sidecar, where Envoy put the gateway's verified SPIFFE ID into source.principal.
    gateway_checks = _checks_for(world, "orders-api")
    inbound_checks = _checks_for(world, "orders.inbound")
    assert gateway_checks and inbound_checks
    context, principal = inbound_checks[-1]
    assert principal == spiffe("edge")
    assert context == {
        route_context.ROUTE: "orders.inbound",
        route_context.SERVICE: "orders",
        route_context.GATEWAY: "orders-sidecar",
        route_context.POLICY_VERSION: world.mesh.policy.version,
    }
    assert gateway_checks[-1][1] == ""

    # A service without a sidecar is still reached in plaintext.
    status, _, body = world.https("edge", "/plain/x")
    assert status == 200 and json.loads(body)["service"] == "plain"
    assert "x-forwarded-client-cert" not in world.plain.requests[-1].headers


def test_gateway_tls_versions_are_enforced(world: World) -> None:
    v = ssl.TLSVersion
    # TLS 1.1 is refused by the gateway (the client is willing: security level 0).
    outcome, data = tls_exchange(
        world.ports["edge"],
        client_context(world.mesh.bundle, minimum=v.TLSv1_1, maximum=v.TLSv1_1),
        server_hostname="localhost",
    )
    assert data == b"" and "ALERT_PROTOCOL_VERSION" in outcome, outcome
    # TLS 1.2 and 1.3 work at edge.
    for version in (v.TLSv1_2, v.TLSv1_3):
        status, _, _ = world.https("edge", "/orders/1", minimum=version, maximum=version)
        assert status == 200, version
    # edge13 (min_version "1.3"): a TLS 1.2 client is refused, TLS 1.3 works.
    outcome, data = tls_exchange(
        world.ports["edge13"],
        client_context(world.mesh.bundle, minimum=v.TLSv1_2, maximum=v.TLSv1_2),
        server_hostname="localhost",
    )
    assert data == b"" and "ALERT_PROTOCOL_VERSION" in outcome, outcome
    status, _, body = world.https("edge13", "/orders/2", minimum=v.TLSv1_3)
    assert status == 200 and json.loads(body)["path"] == "/orders/2"
    # A client that does not trust the mesh CA refuses the gateway's certificate.
    with pytest.raises(ssl.SSLCertVerificationError):
        https_request(world.ports["edge"], "/orders/1", ssl.create_default_context())


def test_curl_http2_with_only_the_ca_bundle(world: World) -> None:
    assert shutil.which("curl"), "curl is needed as the outside client (apt-get install curl)"
    result = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--http2",
            "--cacert",
            str(world.mesh.bundle),
            "--resolve",
            f"localhost:{world.ports['edge']}:127.0.0.1",
            "--write-out",
            "\n%{http_code} %{http_version}",
            f"https://localhost:{world.ports['edge']}/orders/h2",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    body, _, summary = result.stdout.rpartition("\n")
    assert summary == "200 2", result.stdout
    assert json.loads(body)["path"] == "/orders/h2"


def test_sidecar_refuses_plaintext(world: World) -> None:
    before = len(world.orders.requests)
    data = plaintext_exchange(
        world.ports["orders_sc"], b"GET /orders/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert b"HTTP/" not in data
    # Direct HTTP with a real client: no response either.
    with pytest.raises((OSError, ConnectionError)) as info:
        http_request(world.ports["orders_sc"], "/orders/1")
    assert info.value is not None
    assert len(world.orders.requests) == before


def _listener_stat(envoy: EnvoyProcess, suffix: str) -> int:
    """A counter of the (one) TLS listener of ``envoy``: ``listener.<addr>_<port>.<suffix>``."""
    values = [
        value
        for name, value in envoy.stats().items()
        if name.startswith("listener.127.0.0.1_") and name.endswith("." + suffix)
    ]
    assert len(values) == 1, values
    return values[0]


def _sidecar_exchange(world: World, cert: tuple[Path, Path] | None) -> tuple[str, bytes]:
    context = client_context(world.mesh.bundle, cert=cert, check_hostname=False)
    return tls_exchange(
        world.ports["orders_sc"],
        context,
        b"GET /orders/1 HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n",
    )


def test_sidecar_requires_a_valid_client_certificate_of_the_mesh_ca(world: World) -> None:
    before = len(world.orders.requests)
    certs = world.tmp / "client-certs"
    # Control: a current SVID of the mesh CA gets through (so the refusals below are
    # about the certificate, not about the client).
    good = write_pem(certs, "good", world.ca.issue_svid(spiffe("tester")))
    outcome, data = _sidecar_exchange(world, good)
    assert data.startswith(b"HTTP/1.1 200"), (outcome, data)

    sidecar = world.mesh.envoys["orders-sidecar"]
    no_cert = _listener_stat(sidecar, "ssl.fail_verify_no_cert")
    verify_errors = _listener_stat(sidecar, "ssl.fail_verify_error")
    # No client certificate.
    outcome, data = _sidecar_exchange(world, None)
    assert b"HTTP/" not in data, outcome
    assert _listener_stat(sidecar, "ssl.fail_verify_no_cert") == no_cert + 1
    # A certificate from another CA (same trust domain name and SPIFFE ID, other key).
    other = CertificateAuthority.generate(TD)
    foreign = write_pem(certs, "foreign", other.issue_svid(spiffe("edge")))
    outcome, data = _sidecar_exchange(world, foreign)
    assert b"HTTP/" not in data, outcome
    # A certificate of the mesh CA that expired an hour ago.
    expired = world.ca.issue_svid(
        spiffe("edge"), timedelta(hours=1), not_before=utc_now() - timedelta(hours=2)
    )
    assert expired.not_after < utc_now()
    outcome, data = _sidecar_exchange(world, write_pem(certs, "expired", expired))
    assert b"HTTP/" not in data, outcome
    # Both refused by Envoy's certificate verification (under TLS 1.3 the client sees
    # the alert, e.g. "unknown ca" / "certificate expired", or just the close).
    assert _listener_stat(sidecar, "ssl.fail_verify_error") == verify_errors + 2
    # Only the control request reached the app.
    assert len(world.orders.requests) == before + 1


def test_gateway_refuses_a_sidecar_with_the_wrong_spiffe_id(world: World) -> None:
    port = world.ports["ghost_sc"]
    certs = world.tmp / "impostor"
    # An impostor with a perfectly valid SVID of the mesh CA, but for another workload.
    impostor = TlsServer(
        port, write_pem(certs, "impostor", world.ca.issue_svid(spiffe("impostor")))
    )
    edge = world.mesh.envoys["edge"]
    san_failures = edge.stats().get("cluster.ghost.ssl.fail_verify_san", 0)
    try:
        status, _, body = world.https("edge", "/ghost/secret")
        assert status == 503, body
        assert wait_until(lambda: impostor.connections > 0 and bool(impostor.errors), 5)
        # The gateway aborted the handshake (alert) before any request was sent.
        assert impostor.handshakes == 0 and impostor.requests == 0, impostor.errors
        assert "ALERT_CERTIFICATE_UNKNOWN" in impostor.errors[0], impostor.errors
        assert edge.stats()["cluster.ghost.ssl.fail_verify_san"] > san_failures
    finally:
        impostor.stop()
    # Control: the same server with the right identity (ghost's SVID) is accepted, so
    # the refusal above was the SAN check.
    genuine = TlsServer(port, write_pem(certs, "ghost", world.ca.issue_svid(spiffe("ghost"))))
    try:
        ok = wait_until(lambda: world.https("edge", "/ghost/secret")[0] == 200, 10, 0.2)
        assert ok and genuine.requests >= 1, genuine.errors
    finally:
        genuine.stop()


def test_sds_secrets_and_status(world: World) -> None:
    status = world.mesh.status()
    version = status["version"]
    creds = status["credentials"]
    # <policy version>-<hash of the authz endpoints>+<credential generation>
    base, _, generation = version.partition("+")
    assert base.startswith(status["policy_version"] + "-") and generation == creds["generation"]
    # Every gateway and authz hold an SVID too: the Envoy → authz hop is mTLS.
    assert set(creds["svids"]) == {"edge", "edge13", "orders", "ghost", "meshward-authz"}
    assert creds["svids"]["orders"]["spiffe_id"] == spiffe("orders")
    assert set(creds["server_certs"]) == {"edge", "edge13"}
    assert "PRIVATE KEY" not in json.dumps(status)
    nodes = world.mesh.wait_applied(version)
    for group in ("edge", "orders-sidecar"):
        assert nodes[group]["types"]["sds"]["acked"] == version
        assert nodes[group]["types"]["sds"]["nack_error"] is None
    assert sorted(nodes["edge"]["types"]["sds"]["names"]) == sorted(
        [SERVER_CERT_SECRET, SVID_SECRET, TRUST_BUNDLE_SECRET]
    )
    assert sorted(nodes["orders-sidecar"]["types"]["sds"]["names"]) == sorted(
        [SVID_SECRET, TRUST_BUNDLE_SECRET]
    )
    assert nodes["orders-sidecar"]["protocol"] == "delta"

    # Envoy's own view: the secrets it holds, the certificates it serves.
    sidecar = world.mesh.envoys["orders-sidecar"]
    dump = sidecar.config_dump()
    [secrets] = [c for c in dump["configs"] if c["@type"].endswith("SecretsConfigDump")]
    active = {s["name"]: s for s in secrets.get("dynamic_active_secrets", [])}
    assert set(active) == {SVID_SECRET, TRUST_BUNDLE_SECRET}
    # Private keys are redacted by Envoy itself.
    key = active[SVID_SECRET]["secret"]["tls_certificate"]["private_key"]
    assert "PRIVATE KEY" not in json.dumps(key)
    _, body = sidecar.admin("/certs")
    serials = {
        cert["serial_number"]
        for entry in json.loads(body)["certificates"]
        for cert in entry.get("cert_chain", [])
    }
    assert creds["svids"]["orders"]["serial"] in serials


def test_live_edit_moves_a_service_behind_its_sidecar_and_back(tmp_path: Path) -> None:
    """A policy edit adds a sidecar to a service a TLS gateway already routes to: the
    gateway's cluster turns into mTLS to the sidecar (new SDS names requested and
    served on the same stream), and back to plaintext when the sidecar is removed.
    (Requests during the switch may fail while the sidecar's Envoy starts: ordering
    across proxies is the operator's rollout, not checked here.)"""
    app, sidecar_port, edge_port = free_port(), free_port(), free_port()
    upstream = RecordingUpstream("orders", app).start()

    def policy(with_sidecar: bool) -> Policy:
        return Policy.build(
            mesh=Mesh(trust_domain=TD, namespace=NS),
            services=(
                Service(
                    "orders",
                    (Endpoint("127.0.0.1", app),),
                    Sidecar(sidecar_port) if with_sidecar else None,
                ),
            ),
            gateways=(
                Gateway(
                    "edge",
                    edge_port,
                    (Route("orders-api", RouteMatch(prefix="/orders"), "orders"),),
                    tls=GatewayTls(),
                ),
            ),
        )

    mesh = MtlsMesh(policy(False), tmp_path)
    try:
        mesh.start({"edge": "GRPC"})
        context = client_context(mesh.bundle)

        def via_edge() -> tuple[int, dict[str, str]]:
            status, _, _ = https_request(edge_port, "/orders/1", context)
            return status, upstream.requests[-1].headers if upstream.requests else {}

        status, headers = via_edge()
        assert status == 200 and "x-forwarded-client-cert" not in headers
        edge_status = mesh.status()["nodes"][0]["types"]
        assert "sds" in edge_status  # server-cert, and the svid + bundle for authz
        assert edge_status["sds"]["names"] == [SERVER_CERT_SECRET, "svid", "trust-bundle"]

        mesh.loop.run(mesh.xds.set_policy(policy(True)))
        mesh.start_envoy("orders-sidecar", "DELTA_GRPC")
        mesh.wait_applied(mesh.version())
        status, headers = via_edge()
        assert status == 200
        assert f"URI={spiffe('edge')}" in headers["x-forwarded-client-cert"]
        nodes = {n["group"]: n for n in mesh.status()["nodes"]}
        assert sorted(nodes["edge"]["types"]["sds"]["names"]) == sorted(
            [SERVER_CERT_SECRET, SVID_SECRET, TRUST_BUNDLE_SECRET]
        )

        mesh.loop.run(mesh.xds.set_policy(policy(False)))
        version = mesh.version()
        assert wait_until(
            lambda: (
                {n["group"]: n for n in mesh.status()["nodes"]}["edge"]["applied_version"]
                == version
            ),
            10,
        )
        status, headers = via_edge()
        assert status == 200 and "x-forwarded-client-cert" not in headers
        # The gateway keeps its SVID and the bundle: its authz cluster is mTLS either way.
        nodes = {n["group"]: n for n in mesh.status()["nodes"]}
        assert sorted(nodes["edge"]["types"]["sds"]["names"]) == sorted(
            [SERVER_CERT_SECRET, SVID_SECRET, TRUST_BUNDLE_SECRET]
        )
        assert all(n["error"] is None for n in mesh.status()["nodes"])
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        mesh.stop()
        upstream.stop()
