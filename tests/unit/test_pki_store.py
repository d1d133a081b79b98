"""CredentialStore: caching, half-life rotation and generations, driven by an injected clock."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from meshward.pki import CertificateAuthority, CredentialStore, PkiError, identities_in, utc_now
from meshward.policy.model import Endpoint, Gateway, Mesh, Policy, Service, Sidecar

TD = "example.org"
WEB = f"spiffe://{TD}/ns/shop/sa/web"
API = f"spiffe://{TD}/ns/shop/sa/api"


class FakeClock:
    def __init__(self) -> None:
        self.now = utc_now()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(TD)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(ca: CertificateAuthority, clock: FakeClock) -> CredentialStore:
    return CredentialStore(ca, clock=clock)


def test_svid_is_cached_until_half_life_then_reissued(
    store: CredentialStore, clock: FakeClock
) -> None:
    assert store.next_renewal() is None and not store.rotate_due()
    empty_generation = store.generation()

    first = store.svid(WEB)
    assert store.svid(WEB) is first
    assert store.generation() != empty_generation
    generation = store.generation()
    assert store.next_renewal() == first.renew_at()
    # Issued relative to the injected clock: back-dated 60 s, one hour of lifetime.
    assert first.not_before == clock.now.replace(microsecond=0) - timedelta(seconds=60)
    assert first.not_after == clock.now.replace(microsecond=0) + timedelta(hours=1)

    clock.now = first.renew_at() - timedelta(seconds=1)
    assert store.svid(WEB) is first
    assert not store.rotate_due()
    assert store.generation() == generation

    clock.now = first.renew_at()
    assert store.rotate_due()
    second = store.svid(WEB)
    assert second.serial != first.serial
    assert second.key_pem != first.key_pem
    assert second.uris == (WEB,)
    assert second.not_before == clock.now.replace(microsecond=0) - timedelta(seconds=60)
    assert not store.rotate_due()
    assert store.generation() != generation
    assert store.next_renewal() == second.renew_at()


def test_each_identity_has_its_own_svid(store: CredentialStore, ca: CertificateAuthority) -> None:
    web, api = store.svid(WEB), store.svid(API)
    assert web.serial != api.serial
    verifier = PolicyBuilder().store(Store([ca.certificate])).build_client_verifier()
    for issued, spiffe_id in ((web, WEB), (api, API)):
        subjects = verifier.verify(x509.load_pem_x509_certificate(issued.cert_pem), []).subjects
        assert subjects == [x509.UniformResourceIdentifier(spiffe_id)]


def test_rotation_of_one_credential_is_enough_for_rotate_due(
    ca: CertificateAuthority, clock: FakeClock
) -> None:
    store = CredentialStore(ca, svid_lifetime=timedelta(minutes=10), clock=clock)
    web = store.svid(WEB)
    gw = store.server_cert("edge", ["gw.example.test"])
    assert store.next_renewal() == web.renew_at() < gw.renew_at()
    clock.now = web.renew_at()
    assert store.rotate_due()
    store.svid(WEB)
    assert not store.rotate_due()
    assert store.server_cert("edge", ["gw.example.test"]) is gw


def test_server_cert_is_cached_per_gateway_and_names(
    store: CredentialStore, clock: FakeClock
) -> None:
    first = store.server_cert("edge", ["gw.example.test"])
    assert store.server_cert("edge", ("gw.example.test",)) is first
    assert first.dns_names == ("gw.example.test",)
    assert first.not_after - first.not_before == timedelta(hours=24, seconds=60)
    generation = store.generation()

    renamed = store.server_cert("edge", ["gw.example.test", "api.example.test"])
    assert renamed.serial != first.serial
    assert renamed.dns_names == ("gw.example.test", "api.example.test")
    assert store.generation() != generation

    other = store.server_cert("admin", ["admin.example.test"])
    assert other.serial != renamed.serial
    generation = store.generation()

    clock.now = renamed.renew_at()
    rotated = store.server_cert("edge", ["gw.example.test", "api.example.test"])
    assert rotated.serial != renamed.serial
    assert store.generation() != generation


def test_forget_unused_drops_identities_not_kept(store: CredentialStore) -> None:
    web = store.svid(WEB)
    store.svid(API)
    store.server_cert("edge", ["gw.example.test"])
    generation = store.generation()

    store.forget_unused([WEB])
    assert store.generation() != generation
    assert store.svid(WEB) is web  # kept
    assert store.next_renewal() == web.renew_at()  # api and edge are gone


def test_identities_in_a_policy(store: CredentialStore) -> None:
    policy = Policy.build(
        services=(
            Service("api", (Endpoint("127.0.0.1", 9000),), sidecar=Sidecar(port=9100)),
            Service("legacy", (Endpoint("127.0.0.1", 9001),)),
        ),
        gateways=(Gateway("edge", 8443, routes=()),),
        mesh=Mesh(trust_domain=TD, namespace="shop"),
    )
    keep = identities_in(policy)
    assert keep == {API, f"spiffe://{TD}/ns/shop/sa/edge", "edge"}

    api = store.svid(API)
    edge = store.server_cert("edge", ["gw.example.test"])
    store.svid(WEB)
    store.forget_unused(keep)
    assert store.svid(API) is api
    assert store.server_cert("edge", ["gw.example.test"]) is edge


def test_generation_is_stable_and_short(store: CredentialStore) -> None:
    store.svid(WEB)
    assert store.generation() == store.generation()
    assert len(store.generation()) == 12


@pytest.mark.parametrize(
    "kwargs",
    [
        {"svid_lifetime": timedelta(seconds=30)},
        {"svid_lifetime": timedelta(hours=25)},
        {"server_lifetime": timedelta(days=91)},
    ],
)
def test_lifetimes_are_checked_up_front(
    ca: CertificateAuthority, kwargs: dict[str, timedelta]
) -> None:
    svid_lifetime = kwargs.get("svid_lifetime", timedelta(hours=1))
    server_lifetime = kwargs.get("server_lifetime", timedelta(hours=24))
    with pytest.raises(PkiError, match="out of range"):
        CredentialStore(ca, svid_lifetime, server_lifetime)


def test_store_rejects_foreign_identities(store: CredentialStore) -> None:
    with pytest.raises(PkiError, match="this CA serves"):
        store.svid("spiffe://other.org/ns/shop/sa/web")
    assert store.next_renewal() is None
