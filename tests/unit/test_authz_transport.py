"""authz's mTLS material: validation, SPIFFE IDs of peers, certificate swaps."""

from __future__ import annotations

import pytest

from authz.transport import ServerTls, TlsMaterial, TlsMaterialError, peer_spiffe_ids
from meshward.pki import CertificateAuthority

AUTHZ_ID = "spiffe://example.org/ns/shop/sa/meshward-authz"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate("example.org")


def test_material_is_validated_and_knows_its_spiffe_id(ca: CertificateAuthority) -> None:
    svid = ca.issue_svid(AUTHZ_ID)
    material = TlsMaterial.parse(svid.chain_pem, svid.key_pem, ca.bundle_pem)
    assert material.spiffe_id == AUTHZ_ID
    assert material.trust_domain == "example.org"
    assert int(material.serial, 16) == svid.serial
    assert "KEY" not in repr(material)
    other = ca.issue_svid(AUTHZ_ID)
    with pytest.raises(TlsMaterialError, match="does not match"):
        TlsMaterial.parse(svid.chain_pem, other.key_pem, ca.bundle_pem)
    with pytest.raises(TlsMaterialError, match="CA bundle"):
        TlsMaterial.parse(svid.chain_pem, svid.key_pem, b"not pem")
    with pytest.raises(TlsMaterialError, match="private key"):
        TlsMaterial.parse(svid.chain_pem, b"junk", ca.bundle_pem)


def test_fetch_returns_a_new_configuration_only_after_a_change(ca: CertificateAuthority) -> None:
    tls = ServerTls()
    assert not tls.ready and tls.fetch() is None  # nothing to serve yet: keep failing
    tls.server_credentials()
    svid = ca.issue_svid(AUTHZ_ID)
    material = TlsMaterial.parse(svid.chain_pem, svid.key_pem, ca.bundle_pem)
    tls.set(material)
    assert tls.ready and tls.fetch() is not None
    assert tls.fetch() is None  # unchanged: grpcio keeps the current one
    tls.set(material)
    assert tls.fetch() is None
    rotated = ca.issue_svid(AUTHZ_ID)
    tls.set(TlsMaterial.parse(rotated.chain_pem, rotated.key_pem, ca.bundle_pem))
    assert tls.fetch() is not None


def test_peer_spiffe_ids_come_from_the_uri_sans() -> None:
    context = {
        "x509_subject_alternative_name": [b"spiffe://example.org/ns/shop/sa/edge", b"a.test"],
        "peer_uri": [b"spiffe://example.org/ns/shop/sa/edge"],
        "transport_security_type": [b"ssl"],
    }
    assert peer_spiffe_ids(context) == ["spiffe://example.org/ns/shop/sa/edge"]
    assert peer_spiffe_ids({}) == []
    assert peer_spiffe_ids({"x509_subject_alternative_name": [b"a.test"]}) == []
