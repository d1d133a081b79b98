"""The mTLS identity method: the peer's SPIFFE ID from ``source.principal``."""

from __future__ import annotations

import pytest

from authz import reasons
from authz.compiled import compile_policy
from authz.identity.base import AuthenticationError, Identity
from authz.identity.mtls import MAX_SPIFFE_ID_LENGTH, MtlsMethod
from authz.request import AuthzRequest
from meshward.policy.model import Mesh, Policy
from tests import authz_helpers as testing

TD = "meshward.local"


def peer(principal: str) -> AuthzRequest:
    return AuthzRequest.from_check_request(testing.check_request(principal=principal))


@pytest.fixture
def method() -> MtlsMethod:
    return MtlsMethod(TD)


@pytest.mark.parametrize(
    "principal",
    [
        "spiffe://meshward.local/ns/default/sa/orders",
        "spiffe://meshward.local/orders",
        "spiffe://meshward.local/ns/v1.2/sa/a-b_c",
        "spiffe://meshward.local/A/Z/0/9",
    ],
)
def test_a_spiffe_id_of_the_trust_domain_is_the_workload(
    method: MtlsMethod, principal: str
) -> None:
    assert method.authenticate(peer(principal), 0.0) == Identity(principal, (), "mtls", TD)


def test_no_principal_is_no_workload_identity(method: MtlsMethod) -> None:
    assert method.authenticate(peer(""), 0.0) is None


@pytest.mark.parametrize(
    "principal",
    [
        "spiffe://example.org/ns/default/sa/orders",  # another trust domain
        "spiffe://meshward.local.evil/ns/default/sa/orders",  # a longer one
        "spiffe://meshward.localx/ns/a",
        "spiffe://evil.meshward.local/ns/a",
        "spiffe://MESHWARD.LOCAL/ns/a",  # trust domains are lower case
    ],
)
def test_another_trust_domain_is_untrusted(method: MtlsMethod, principal: str) -> None:
    with pytest.raises(AuthenticationError) as caught:
        method.authenticate(peer(principal), 0.0)
    assert caught.value.reason == reasons.UNTRUSTED_WORKLOAD
    assert caught.value.description == "peer identity is not of this trust domain"


@pytest.mark.parametrize(
    "principal",
    [
        "orders.default.svc.cluster.local",  # a DNS SAN
        "CN=orders,O=meshward",  # a subject DN
        "https://meshward.local/ns/a",
        "SPIFFE://meshward.local/ns/a",
        "spiffe:/meshward.local/ns/a",
        "spiffe://meshward.local",  # no path
        "spiffe://meshward.local/",
        "spiffe://meshward.local/ns/a/",  # trailing slash
        "spiffe://meshward.local//ns/a",  # empty segment
        "spiffe://meshward.local/ns/./a",
        "spiffe://meshward.local/ns/../a",
        "spiffe://meshward.local/ns/a%2Fb",
        "spiffe://meshward.local/ns/a?x=1",
        "spiffe://meshward.local/ns/a#frag",
        "spiffe://meshward.local:8443/ns/a",
        "spiffe://user@meshward.local/ns/a",
        "spiffe://meshward.local/ns/a b",
        "spiffe://meshward.local/ns/a\nb",
        "spiffe://meshward.local/ns/é",
        "spiffe://meshward.local/" + "a" * MAX_SPIFFE_ID_LENGTH,
    ],
)
def test_a_malformed_principal_is_untrusted(method: MtlsMethod, principal: str) -> None:
    with pytest.raises(AuthenticationError) as caught:
        method.authenticate(peer(principal), 0.0)
    assert caught.value.reason == reasons.UNTRUSTED_WORKLOAD
    assert principal not in caught.value.description  # fixed phrases only


def test_accepted_principals_are_cached_and_rejected_ones_never(method: MtlsMethod) -> None:
    good = "spiffe://meshward.local/ns/default/sa/orders"
    first = method.authenticate(peer(good), 0.0)
    assert method.authenticate(peer(good), 0.0) is first
    bad = "spiffe://example.org/ns/default/sa/orders"
    for _ in range(2):
        with pytest.raises(AuthenticationError):
            method.authenticate(peer(bad), 0.0)


def test_a_full_cache_still_answers() -> None:
    method = MtlsMethod(TD, cache_size=1)
    for name in ("a", "b", "c"):
        principal = f"spiffe://meshward.local/ns/default/sa/{name}"
        identity = method.authenticate(peer(principal), 0.0)
        assert identity is not None and identity.subject == principal


def test_compiled_policy_uses_the_mesh_trust_domain() -> None:
    compiled = compile_policy(Policy.build(mesh=Mesh(trust_domain="example.org")))
    (method,) = compiled.workload_methods
    assert method.name == "mtls"
    ours = method.authenticate(peer("spiffe://example.org/ns/default/sa/x"), 0.0)
    assert ours is not None and ours.issuer == "example.org"
    with pytest.raises(AuthenticationError):
        method.authenticate(peer("spiffe://meshward.local/ns/default/sa/x"), 0.0)
