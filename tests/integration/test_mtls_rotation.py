"""Certificate rotation under load with real Envoys: zero failed requests, new serials
in Envoy's ``/certs``, and only SDS pushed.

The xDS server runs in-process with the real clock and the PKI's shortest lifetimes
(70 s; the PKI allows 60 s to 24 h). The store renews at half of a certificate's whole
validity window, which starts 60 s back-dated for clock skew: a 70 s certificate is
valid for 130 s and renewed 5 s after it was issued, so two rotations take ~10 s
rather than the minute a plain half-life of 70 s would need. The rotation task polls
the store every second at most (``rotation_poll_seconds=1``).

Requests go gateway → sidecar on keep-alive connections (2 threads) and on a new TLS
connection per request (1 thread: new handshakes pick up the rotated server
certificate and the gateway's new client SVID).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
from tests.envoy_harness import EnvoyProcess, free_port
from tests.mesh_harness import RecordingUpstream
from tests.mtls_harness import HttpsTraffic, MtlsMesh, client_context
from tests.process_mesh import wait_until

pytestmark = pytest.mark.integration

LIFETIME = 70


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[MtlsMesh]:
    app_port, sidecar_port, edge_port = free_port(), free_port(), free_port()
    upstream = RecordingUpstream("orders", app_port).start()
    policy = Policy.build(
        mesh=Mesh(trust_domain="example.org", namespace="shop"),
        services=(Service("orders", (Endpoint("127.0.0.1", app_port),), Sidecar(sidecar_port)),),
        gateways=(
            Gateway(
                "edge",
                edge_port,
                (Route("orders-api", RouteMatch(prefix="/orders"), "orders"),),
                tls=GatewayTls(),
            ),
        ),
    )
    mesh = MtlsMesh(
        policy, tmp_path, svid_lifetime_seconds=LIFETIME, server_lifetime_seconds=LIFETIME
    )
    try:
        # The gateway on Delta ADS, the sidecar on SotW.
        mesh.start({"edge": "DELTA_GRPC", "orders-sidecar": "GRPC"})
        yield mesh
    except BaseException:
        print(mesh.logs())
        raise
    finally:
        mesh.stop()
        upstream.stop()


def _served_serials(envoy: EnvoyProcess) -> set[str]:
    _, body = envoy.admin("/certs")
    return {
        cert["serial_number"]
        for entry in json.loads(body)["certificates"]
        for cert in entry.get("cert_chain", [])
    }


def _serials(status: dict[str, Any]) -> dict[str, str]:
    creds = status["credentials"]
    out = {f"svid:{w}": c["serial"] for w, c in creds["svids"].items()}
    out.update({f"server:{g}": c["serial"] for g, c in creds["server_certs"].items()})
    return out


def _responses(status: dict[str, Any]) -> dict[str, dict[str, int]]:
    """group → type → responses sent on its stream so far."""
    return {
        n["group"]: {t: s.get("responses", 0) for t, s in n["types"].items()}
        for n in status["nodes"]
        if n["group"] in ("edge", "orders-sidecar")
    }


def test_rotation_under_load_drops_no_request(mesh: MtlsMesh) -> None:
    edge, sidecar = mesh.envoys["edge"], mesh.envoys["orders-sidecar"]
    first = mesh.status()
    policy_version = first["policy_version"]
    initial = _serials(first)
    # authz's SVID too: the Envoy → authz hop is mTLS (its stand-in serves the newest).
    assert set(initial) == {"svid:edge", "svid:orders", "server:edge", "svid:meshward-authz"}
    responses_before = _responses(first)

    port = mesh.policy.gateways[0].port
    # Each credential renews on its own schedule (they were issued a moment apart).
    history = {name: [serial] for name, serial in initial.items()}
    holder: dict[str, EnvoyProcess | None] = {
        "svid:orders": sidecar,
        "svid:edge": edge,
        "server:edge": edge,
        "svid:meshward-authz": None,  # not an Envoy: nothing to read /certs from
    }
    versions = {first["version"]}
    with HttpsTraffic(port, "/orders/x", client_context(mesh.bundle), keepalive=2, fresh=1) as load:
        # ~10 s with the PKI's current renew_at; bounded by two plain half-lives + slack
        # should the PKI ever renew at half of the requested lifetime instead.
        deadline = time.monotonic() + LIFETIME + 20
        while min(map(len, history.values())) < 3 and time.monotonic() < deadline:
            status = mesh.status()
            changed = {k: v for k, v in _serials(status).items() if v != history[k][-1]}
            if changed:
                # Same policy, new snapshot version, and the proxy serves the new serial.
                assert status["policy_version"] == policy_version
                assert status["version"] not in versions
                versions.add(status["version"])
                for name, serial in changed.items():
                    history[name].append(serial)
                    envoy = holder[name]
                    if envoy is None:
                        continue

                    def served(envoy: EnvoyProcess = envoy, serial: str = serial) -> bool:
                        return serial in _served_serials(envoy)

                    assert wait_until(served, 10), (name, serial, _served_serials(envoy))
            time.sleep(0.1)
        # Keep the load on a moment after the last rotation.
        time.sleep(1.0)
    assert all(len(serials) >= 3 for serials in history.values()), history
    assert all(len(set(serials)) == len(serials) for serials in history.values()), history

    statuses = load.statuses()
    assert load.failures() == [], load.failures()[:5]
    assert statuses.get(200, 0) > 100, statuses

    # A rotation changes only secrets: no new CDS/EDS/LDS/RDS responses, new SDS ones.
    after = _responses(mesh.status())
    for group, before in responses_before.items():
        for type_name in ("cds", "eds", "lds", "rds"):
            assert after[group][type_name] == before[type_name], (group, type_name)
        assert after[group]["sds"] >= before["sds"] + 2, (group, before, after[group])
    rotations = mesh.xds.registry.get_sample_value("meshward_xds_credential_rotations_total")
    assert rotations is not None and rotations >= 2
    # No NACK anywhere.
    assert all(n["error"] is None for n in mesh.status()["nodes"])
