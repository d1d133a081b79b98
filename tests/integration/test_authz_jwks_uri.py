"""The real authz gRPC server with an issuer whose keys come from an HTTPS JWKS URL.

A real TLS JWKS server (certificate from meshward's PKI) and real gRPC Checks: tokens
verify once the keys are fetched, and a key rotation at the IdP is followed without a
restart (the first Check with the new kid is denied at once, the next ones pass).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from authz import reasons
from authz.server import AuthzService
from meshward.policy.model import Binding
from tests import authz_helpers as testing
from tests.jwks_helpers import (
    ISSUER,
    JwksServer,
    Tls,
    make_tls,
    remote_issuer,
    remote_policy,
    token,
    until,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("jwks-tls"))


@pytest.fixture
def idp(tls: Tls) -> Iterator[JwksServer]:
    server = JwksServer(tls.cert_file, tls.key_file)
    yield server
    server.stop()


def check(stub: external_auth_pb2_grpc.AuthorizationStub, jwt: str) -> tuple[int, str]:
    """(gRPC status code of the Check, reason) for DELETE /orders/1 as ``jwt``'s subject."""
    message = testing.check_request("DELETE", "/orders/1", {"authorization": f"Bearer {jwt}"})
    response = stub.Check(message, timeout=5)
    if response.status.code == 0:
        return 0, reasons.ALLOWED
    return response.status.code, json.loads(response.denied_response.body)["reason"]


def test_keys_from_jwks_uri_and_rotation_without_restart(
    idp: JwksServer, tls: Tls, authz_engine: str
) -> None:
    k1, k2 = testing.rsa_key("idp-1"), testing.ec_key("idp-2")
    idp.serve(k1)
    issuer = remote_issuer(idp.url, tls.ca_pem, min_refresh=1)
    assert issuer.issuer == ISSUER
    policy = remote_policy(issuer)
    provider = TracerProvider()
    service = AuthzService(
        policy,
        provider.get_tracer("test"),
        workers=2,
        registry=CollectorRegistry(),
        engine=authz_engine,
    )
    port = service.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    try:
        (fetcher,) = service.jwks.fetchers()
        assert fetcher.wait_ready(5)
        assert check(stub, token(k1, "alice")) == (0, reasons.ALLOWED)
        assert check(stub, token(k1, "mallory")) == (7, reasons.FORBIDDEN)

        idp.serve(k2)  # rotation at the IdP: k1 withdrawn, k2 published
        assert check(stub, token(k2, "alice")) == (16, reasons.UNKNOWN_KEY)
        until(lambda: check(stub, token(k2, "alice"))[0] == 0, "the new key to be trusted")
        assert check(stub, token(k1, "alice")) == (16, reasons.UNKNOWN_KEY)
        # Denials while the refresh ran may have asked for one more, due 1 s after it
        # (min_refresh): let it happen, then the count must stay put.
        time.sleep(1.1)
        fetched = idp.count
        assert 2 <= fetched <= 3
        successes = service.registry.get_sample_value(
            "meshward_authz_jwks_fetches_total", {"jwks_uri": idp.url, "outcome": "success"}
        )
        assert successes == fetched

        # A reload keeping the issuer keeps its fetcher and keys: no fetch, no gap.
        grant = Binding("mallory-runs-orders", "orders-admin", subjects=("mallory",))
        service.set_policy(remote_policy(issuer, grant))
        assert service.jwks.fetchers() == [fetcher]
        assert check(stub, token(k2, "mallory")) == (0, reasons.ALLOWED)
        assert idp.count == fetched

        # An IdP outage: the last good keys keep serving, the failure is counted.
        idp.stop()
        fetcher.request_refresh()
        until(lambda: fetcher.error_count == 1, "the refresh to fail")
        assert check(stub, token(k2, "alice")) == (0, reasons.ALLOWED)
        errors = service.registry.get_sample_value(
            "meshward_authz_jwks_fetches_total", {"jwks_uri": idp.url, "outcome": "error"}
        )
        assert errors == 1

        # A policy without the remote issuer stops its fetcher.
        service.set_policy(testing.demo_policy(testing.jwks(k1)))
        assert service.jwks.fetchers() == []
        assert fetcher.stopped
    finally:
        channel.close()
        service.stop(1)
        provider.shutdown()
