"""JWT identity method: every acceptance rule, with real RS256/ES256/EdDSA keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.hashes import SHA256
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.jwk import OKPKey

from authz import reasons
from authz.identity.base import AuthenticationError, Identity
from authz.identity.jwt import MAX_TOKEN_LENGTH, JwtMethod
from authz.request import AuthzRequest
from meshward.policy.errors import PolicyError
from meshward.policy.loader import load_policy
from meshward.policy.model import Issuer
from tests import authz_helpers as testing

NOW = 1_800_000_000.0

# joserfc warns on every EdDSA use (RFC 9864); authz silences it, but pytest resets
# warning filters per test.
pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")


@pytest.fixture(scope="module")
def rsa() -> testing.SigningKey:
    return testing.rsa_key("rsa-1")


@pytest.fixture(scope="module")
def ec() -> testing.SigningKey:
    return testing.ec_key("ec-1")


@pytest.fixture(scope="module")
def stranger() -> testing.SigningKey:
    """A key the issuer does not publish, under the same kid as the real one."""
    return testing.rsa_key("rsa-1")


def issuer(*keys: testing.SigningKey, **overrides: object) -> Issuer:
    fields: dict[str, object] = {
        "name": "demo",
        "issuer": testing.DEMO_ISSUER,
        "audiences": (testing.DEMO_AUDIENCE, "other-aud"),
        "jwks": testing.jwks(*keys),
        "algorithms": ("RS256", "ES256"),
    }
    fields.update(overrides)
    return Issuer(**fields)  # type: ignore[arg-type]


def request(authorization: str | None) -> AuthzRequest:
    headers = {} if authorization is None else {"authorization": authorization}
    return AuthzRequest.from_check_request(testing.check_request(headers=headers))


def authenticate(method: JwtMethod, token: str, now: float = NOW) -> Identity | None:
    return method.authenticate(request(f"Bearer {token}"), now)


def rejected(method: JwtMethod, token: str, now: float = NOW) -> str:
    with pytest.raises(AuthenticationError) as caught:
        authenticate(method, token, now)
    return caught.value.reason


@pytest.fixture(scope="module")
def method(rsa: testing.SigningKey, ec: testing.SigningKey) -> JwtMethod:
    return JwtMethod([issuer(rsa, ec)])


def test_valid_rs256_gives_subject_groups_method_issuer(
    method: JwtMethod, rsa: testing.SigningKey
) -> None:
    token = rsa.sign(testing.claims("alice", ["staff", "ops"], now=NOW))
    assert authenticate(method, token) == Identity(
        "alice", ("staff", "ops"), "jwt", testing.DEMO_ISSUER
    )


def test_valid_es256(method: JwtMethod, ec: testing.SigningKey) -> None:
    identity = authenticate(method, ec.sign(testing.claims("bob", ["customers"], now=NOW)))
    assert identity is not None
    assert (identity.subject, identity.groups) == ("bob", ("customers",))


def test_audience_list_intersecting_is_accepted(method: JwtMethod, rsa: testing.SigningKey) -> None:
    token = rsa.sign(testing.claims(audience=["nobody", "other-aud"], now=NOW))
    assert authenticate(method, token) is not None


def test_no_authorization_header_is_no_credential(method: JwtMethod) -> None:
    assert method.authenticate(request(None), NOW) is None


def test_other_scheme_is_not_a_jwt_credential(method: JwtMethod) -> None:
    assert method.authenticate(request("Basic YWxpY2U6cHc="), NOW) is None


def test_scheme_is_case_insensitive(method: JwtMethod, rsa: testing.SigningKey) -> None:
    token = rsa.sign(testing.claims(now=NOW))
    assert method.authenticate(request(f"bearer {token}"), NOW) is not None


def test_empty_bearer_is_invalid(method: JwtMethod) -> None:
    with pytest.raises(AuthenticationError) as caught:
        method.authenticate(request("Bearer "), NOW)
    assert caught.value.reason == reasons.INVALID_TOKEN


def test_expired(method: JwtMethod, rsa: testing.SigningKey) -> None:
    token = rsa.sign(testing.claims(now=NOW - 7200, ttl=3600))
    assert rejected(method, token) == reasons.TOKEN_EXPIRED


def test_expiry_has_leeway_then_expires(rsa: testing.SigningKey) -> None:
    method = JwtMethod([issuer(rsa)], leeway=30)
    token = rsa.sign(testing.claims(now=NOW - 100, ttl=90))  # exp = NOW - 10
    assert authenticate(method, token) is not None
    assert rejected(JwtMethod([issuer(rsa)], leeway=5), token) == reasons.TOKEN_EXPIRED


def test_nbf_in_future(method: JwtMethod, rsa: testing.SigningKey) -> None:
    token = rsa.sign(testing.claims(now=NOW, nbf=int(NOW + 600)))
    assert rejected(method, token) == reasons.TOKEN_NOT_YET_VALID


@pytest.mark.parametrize("claim", ["exp", "nbf"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1800000000", True])
def test_non_numeric_or_non_finite_times_are_invalid(
    method: JwtMethod, rsa: testing.SigningKey, claim: str, value: object
) -> None:
    claims = testing.claims(now=NOW)
    claims[claim] = value
    assert rejected(method, rsa.sign(claims)) == reasons.INVALID_TOKEN


def test_missing_exp_is_invalid(method: JwtMethod, rsa: testing.SigningKey) -> None:
    claims = testing.claims(now=NOW)
    del claims["exp"]
    assert rejected(method, rsa.sign(claims)) == reasons.INVALID_TOKEN


def test_wrong_issuer(method: JwtMethod, rsa: testing.SigningKey) -> None:
    token = rsa.sign(testing.claims(issuer="https://evil.example", now=NOW))
    assert rejected(method, token) == reasons.UNKNOWN_ISSUER


def test_missing_issuer(method: JwtMethod, rsa: testing.SigningKey) -> None:
    claims = testing.claims(now=NOW)
    del claims["iss"]
    assert rejected(method, rsa.sign(claims)) == reasons.UNKNOWN_ISSUER


def test_wrong_audience(method: JwtMethod, rsa: testing.SigningKey) -> None:
    token = rsa.sign(testing.claims(audience="someone-else", now=NOW))
    assert rejected(method, token) == reasons.BAD_AUDIENCE


def test_missing_audience(method: JwtMethod, rsa: testing.SigningKey) -> None:
    claims = testing.claims(now=NOW)
    del claims["aud"]
    assert rejected(method, rsa.sign(claims)) == reasons.BAD_AUDIENCE


def test_signed_by_another_key_with_the_same_kid(
    method: JwtMethod, stranger: testing.SigningKey
) -> None:
    assert rejected(method, stranger.sign(testing.claims(now=NOW))) == reasons.BAD_SIGNATURE


def test_unknown_kid(method: JwtMethod, rsa: testing.SigningKey) -> None:
    token = rsa.sign(testing.claims(now=NOW), {"kid": "not-in-jwks"})
    assert rejected(method, token) == reasons.UNKNOWN_KEY


def test_kid_of_a_key_of_the_wrong_type(method: JwtMethod, rsa: testing.SigningKey) -> None:
    token = rsa.sign(testing.claims(now=NOW), {"kid": "ec-1"})  # RS256 header, EC kid
    assert rejected(method, token) == reasons.UNKNOWN_KEY


def test_no_kid_tries_every_fitting_key(rsa: testing.SigningKey, ec: testing.SigningKey) -> None:
    method = JwtMethod([issuer(testing.rsa_key("rsa-2"), rsa, ec)])
    unkeyed = jwt.encode({"alg": "RS256"}, testing.claims(now=NOW), rsa.key, algorithms=["RS256"])
    assert "kid" not in json.loads(_b64(unkeyed.split(".")[0]))
    assert authenticate(method, unkeyed) is not None


def test_alg_none_is_rejected(method: JwtMethod) -> None:
    token = testing.unsigned_token(
        {"alg": "none", "kid": "rsa-1"}, testing.claims(now=NOW), signature=""
    )
    assert rejected(method, token) == reasons.UNSUPPORTED_ALGORITHM


def test_alg_not_allowed_for_issuer(rsa: testing.SigningKey, ec: testing.SigningKey) -> None:
    only_es = JwtMethod([issuer(rsa, ec, algorithms=("ES256",))])
    assert rejected(only_es, rsa.sign(testing.claims(now=NOW))) == reasons.UNSUPPORTED_ALGORITHM
    assert authenticate(only_es, ec.sign(testing.claims(now=NOW))) is not None


def test_hs256_with_the_public_key_as_secret(method: JwtMethod, rsa: testing.SigningKey) -> None:
    """The classic algorithm-confusion attack: HMAC keyed with the published key.

    Built by hand: joserfc itself refuses to use a public key as an HMAC secret.
    """
    public_pem = rsa.key.public_key.public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for secret in (public_pem, json.dumps(rsa.public_jwk()).encode()):
        unsigned = testing.unsigned_token(
            {"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}, testing.claims(now=NOW)
        )
        signing_input = unsigned.rstrip(".").encode()
        mac = hmac.new(secret, signing_input, hashlib.sha256).digest()
        token = unsigned + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        assert rejected(method, token) == reasons.UNSUPPORTED_ALGORITHM


def test_tampered_payload(method: JwtMethod, rsa: testing.SigningKey) -> None:
    token = rsa.sign(testing.claims("bob", ["customers"], now=NOW))
    header, _, signature = token.split(".")
    forged = testing.unsigned_token({"x": 1}, testing.claims("bob", ["staff"], now=NOW)).split(".")[
        1
    ]
    assert rejected(method, f"{header}.{forged}.{signature}") == reasons.BAD_SIGNATURE


def test_tampered_signature(method: JwtMethod, rsa: testing.SigningKey) -> None:
    token = rsa.sign(testing.claims(now=NOW))
    flipped = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert rejected(method, flipped) == reasons.BAD_SIGNATURE


@pytest.mark.parametrize(
    "garbage",
    [
        "garbage",
        "a.b",
        "a.b.c",
        "!!!.???.***",
        "e30.e30.e30",  # {}.{}.{}: no alg, no iss
        "W10.W10.",  # [] and []: not objects
        "x" * 9000,
        "ünïcödé.ü.ü",
    ],
)
def test_garbage(method: JwtMethod, garbage: str) -> None:
    assert rejected(method, garbage) in reasons.INVALID_CREDENTIAL


def test_malformed_payload_with_valid_issuer_peek(
    method: JwtMethod, rsa: testing.SigningKey
) -> None:
    """Header and payload decode, issuer is known, but the signature part is garbage."""
    token = rsa.sign(testing.claims(now=NOW))
    header, payload, _ = token.split(".")
    assert rejected(method, f"{header}.{payload}.%%%") in {
        reasons.INVALID_TOKEN,
        reasons.BAD_SIGNATURE,
    }


def test_missing_subject_and_bad_groups(method: JwtMethod, rsa: testing.SigningKey) -> None:
    no_sub = testing.claims(now=NOW)
    del no_sub["sub"]
    assert rejected(method, rsa.sign(no_sub)) == reasons.INVALID_TOKEN
    bad_sub = testing.claims("evil\r\nx-meshward-subject: admin", now=NOW)
    assert rejected(method, rsa.sign(bad_sub)) == reasons.INVALID_TOKEN


def test_custom_subject_and_groups_claims(rsa: testing.SigningKey) -> None:
    method = JwtMethod([issuer(rsa, subject_claim="email", groups_claim="roles")])
    token = rsa.sign(testing.claims("ignored", now=NOW, email="a@x.io", roles=["staff"]))
    assert authenticate(method, token) == Identity("a@x.io", ("staff",), "jwt", testing.DEMO_ISSUER)


def test_issuer_chosen_by_iss(rsa: testing.SigningKey, ec: testing.SigningKey) -> None:
    """Two issuers: a token verifies only with the keys of the issuer it names."""
    method = JwtMethod(
        [
            issuer(rsa, name="a", issuer="https://a.example"),
            issuer(ec, name="b", issuer="https://b.example"),
        ]
    )
    good = ec.sign(testing.claims(issuer="https://b.example", now=NOW))
    identity = authenticate(method, good)
    assert identity is not None and identity.issuer == "https://b.example"
    crossed = ec.sign(testing.claims(issuer="https://a.example", now=NOW), {"kid": "rsa-1"})
    assert rejected(method, crossed) in {reasons.UNSUPPORTED_ALGORITHM, reasons.UNKNOWN_KEY}


def test_jwks_key_marked_for_encryption_is_not_used(rsa: testing.SigningKey) -> None:
    document = {"keys": [{**rsa.public_jwk(), "use": "enc"}]}
    method = JwtMethod([issuer(rsa, jwks=document)])
    assert rejected(method, rsa.sign(testing.claims(now=NOW))) == reasons.UNKNOWN_KEY


def test_verified_tokens_are_cached_until_exp(rsa: testing.SigningKey) -> None:
    method = JwtMethod([issuer(rsa)], leeway=0)
    calls = 0
    real_verify = method.verify

    def counting_verify(token: str, now: float) -> tuple[Identity, float]:
        nonlocal calls
        calls += 1
        return real_verify(token, now)

    method.verify = counting_verify  # type: ignore[method-assign]
    token = rsa.sign(testing.claims(now=NOW, ttl=60))
    for _ in range(5):
        assert authenticate(method, token, NOW + 1) is not None
    assert calls == 1
    assert rejected(method, token, NOW + 61) == reasons.TOKEN_EXPIRED
    assert calls == 2


def test_cache_is_bounded(rsa: testing.SigningKey) -> None:
    method = JwtMethod([issuer(rsa)], cache_size=3)
    for i in range(10):
        assert authenticate(method, rsa.sign(testing.claims(f"user{i}", now=NOW))) is not None
    assert len(method._cache) == 3


def test_failed_tokens_are_not_cached(method: JwtMethod, rsa: testing.SigningKey) -> None:
    token = rsa.sign(testing.claims(audience="someone-else", now=NOW))
    for _ in range(2):
        assert rejected(method, token) == reasons.BAD_AUDIENCE


def test_descriptions_never_echo_token_contents(method: JwtMethod, rsa: testing.SigningKey) -> None:
    token = rsa.sign(testing.claims(issuer='https://evil"\\.example', now=NOW))
    with pytest.raises(AuthenticationError) as caught:
        authenticate(method, token)
    assert "evil" not in caught.value.description


def test_real_clock_token(rsa: testing.SigningKey) -> None:
    method = JwtMethod([issuer(rsa)])
    assert authenticate(method, rsa.sign(testing.claims()), time.time()) is not None


def _b64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


# ---- claim paths and groups ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "groups"),
    [
        (["staff", "ops"], ("staff", "ops")),
        ("staff", ("staff",)),  # a single string is one group
        ("", ()),
        ([], ()),
        (["staff", 1], ()),  # anything else: no groups, not an error
        ({"staff": True}, ()),
        (42, ()),
        (None, ()),
    ],
)
def test_groups_shapes(
    method: JwtMethod, rsa: testing.SigningKey, value: object, groups: tuple[str, ...]
) -> None:
    claims = testing.claims("bob", now=NOW)
    claims["groups"] = value
    identity = authenticate(method, rsa.sign(claims))
    assert identity is not None and identity.groups == groups


def test_dotted_claim_paths(rsa: testing.SigningKey) -> None:
    method = JwtMethod(
        [issuer(rsa, subject_claim="user.profile.id", groups_claim="realm_access.roles")]
    )
    token = rsa.sign(
        testing.claims(
            "ignored",
            now=NOW,
            user={"profile": {"id": "u-42"}},
            realm_access={"roles": ["staff", "ops"]},
        )
    )
    assert authenticate(method, token) == Identity(
        "u-42", ("staff", "ops"), "jwt", testing.DEMO_ISSUER
    )
    single = rsa.sign(
        testing.claims(now=NOW, user={"profile": {"id": "u-1"}}, realm_access={"roles": "ops"})
    )
    identity = authenticate(method, single)
    assert identity is not None and identity.groups == ("ops",)


def test_dotted_path_missing_or_through_non_object(rsa: testing.SigningKey) -> None:
    method = JwtMethod([issuer(rsa, subject_claim="user.id", groups_claim="realm_access.roles")])
    no_roles = rsa.sign(testing.claims(now=NOW, user={"id": "u"}, realm_access="roles"))
    identity = authenticate(method, no_roles)
    assert identity is not None and identity.groups == ()
    no_subject = rsa.sign(testing.claims(now=NOW, user=["id"]))
    assert rejected(method, no_subject) == reasons.INVALID_TOKEN


def test_claim_named_with_dots_wins_over_the_path(rsa: testing.SigningKey) -> None:
    method = JwtMethod([issuer(rsa, groups_claim="https://example.com/groups.v1")])
    claims = testing.claims(now=NOW)
    claims["https://example.com/groups.v1"] = ["staff"]
    identity = authenticate(method, rsa.sign(claims))
    assert identity is not None and identity.groups == ("staff",)


# ---- clock skew ------------------------------------------------------------------------


def test_iat_in_the_future(method: JwtMethod, rsa: testing.SigningKey) -> None:
    token = rsa.sign(testing.claims(now=NOW, iat=int(NOW + 600)))
    assert rejected(method, token) == reasons.TOKEN_NOT_YET_VALID


def test_iat_within_skew_is_accepted(method: JwtMethod, rsa: testing.SigningKey) -> None:
    token = rsa.sign(testing.claims(now=NOW, iat=int(NOW + 20), nbf=int(NOW + 20)))
    assert authenticate(method, token) is not None


@pytest.mark.parametrize("value", [float("nan"), "1800000000", True, 10**400])
def test_invalid_iat(method: JwtMethod, rsa: testing.SigningKey, value: object) -> None:
    claims = testing.claims(now=NOW)
    claims["iat"] = value
    assert rejected(method, rsa.sign(claims)) == reasons.INVALID_TOKEN


def test_clock_skew_is_per_issuer(rsa: testing.SigningKey) -> None:
    token = rsa.sign(testing.claims(now=NOW + 100))  # iat = nbf = NOW + 100
    strict = JwtMethod([issuer(rsa, clock_skew_seconds=0)])
    assert rejected(strict, token) == reasons.TOKEN_NOT_YET_VALID
    lenient = JwtMethod([issuer(rsa, clock_skew_seconds=300)])
    assert authenticate(lenient, token) is not None
    expired = rsa.sign(testing.claims(now=NOW - 100, ttl=90))  # exp = NOW - 10
    assert rejected(strict, expired) == reasons.TOKEN_EXPIRED
    assert authenticate(lenient, expired) is not None


# ---- EdDSA -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ed() -> OKPKey:
    return OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"})


def ed_jwk(key: OKPKey, kid: str = "ed-1") -> dict[str, Any]:
    return {**key.as_dict(private=False), "kid": kid, "use": "sig"}


def ed_sign(key: OKPKey, claims: dict[str, Any], kid: str = "ed-1") -> str:
    return jwt.encode({"alg": "EdDSA", "kid": kid}, claims, key, algorithms=["EdDSA"])


def test_valid_eddsa_is_accepted(rsa: testing.SigningKey, ed: OKPKey) -> None:
    method = JwtMethod(
        [issuer(rsa, jwks={"keys": [rsa.public_jwk(), ed_jwk(ed)]}, algorithms=("EdDSA",))]
    )
    token = ed_sign(ed, testing.claims("carol", ["staff"], now=NOW))
    assert authenticate(method, token) == Identity("carol", ("staff",), "jwt", testing.DEMO_ISSUER)
    # the RSA key of the same JWKS does not fit EdDSA, and RS256 is not allowed
    assert rejected(method, rsa.sign(testing.claims(now=NOW))) == reasons.UNSUPPORTED_ALGORITHM


def test_eddsa_needs_to_be_allowed(rsa: testing.SigningKey, ed: OKPKey) -> None:
    method = JwtMethod([issuer(rsa, jwks={"keys": [ed_jwk(ed)]})])  # RS256, ES256 only
    token = ed_sign(ed, testing.claims(now=NOW))
    assert rejected(method, token) == reasons.UNSUPPORTED_ALGORITHM


def test_eddsa_signed_by_another_key(rsa: testing.SigningKey, ed: OKPKey) -> None:
    method = JwtMethod([issuer(rsa, jwks={"keys": [ed_jwk(ed)]}, algorithms=("EdDSA",))])
    other = OKPKey.generate_key("Ed25519")
    assert rejected(method, ed_sign(other, testing.claims(now=NOW))) == reasons.BAD_SIGNATURE


# ---- attack suite: every case is a 401 reason ------------------------------------------


def _signed_with_header(rsa: testing.SigningKey, extra: dict[str, Any]) -> str:
    """A correctly RS256-signed token whose protected header carries ``extra``.

    Signed by hand: joserfc refuses to serialize some of these headers itself.
    """
    unsigned = testing.unsigned_token(
        {"alg": "RS256", "kid": rsa.kid, **extra}, testing.claims(now=NOW)
    )
    private = rsa.key.private_key
    assert isinstance(private, RSAPrivateKey)
    signature = private.sign(unsigned.rstrip(".").encode(), PKCS1v15(), SHA256())
    return unsigned + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


def test_hand_signed_tokens_are_accepted_without_forbidden_headers(
    method: JwtMethod, rsa: testing.SigningKey
) -> None:
    assert authenticate(method, _signed_with_header(rsa, {"typ": "JWT"})) is not None


def test_attack_alg_none_even_if_listed(rsa: testing.SigningKey) -> None:
    method = JwtMethod([issuer(rsa, algorithms=("RS256", "none", "HS256"))])
    for alg in ("none", "None", "NONE", "HS256", "HS384", "HS512"):
        token = testing.unsigned_token({"alg": alg, "kid": rsa.kid}, testing.claims(now=NOW))
        assert rejected(method, token) == reasons.UNSUPPORTED_ALGORITHM
        assert rejected(method, token + "c2ln") == reasons.UNSUPPORTED_ALGORITHM


def test_attack_alg_confusion_hs256_with_pem_even_if_listed(rsa: testing.SigningKey) -> None:
    method = JwtMethod([issuer(rsa, algorithms=("RS256", "HS256"))])
    public_pem = rsa.key.public_key.public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    unsigned = testing.unsigned_token({"alg": "HS256", "kid": rsa.kid}, testing.claims(now=NOW))
    mac = hmac.new(public_pem, unsigned.rstrip(".").encode(), hashlib.sha256).digest()
    token = unsigned + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    assert rejected(method, token) == reasons.UNSUPPORTED_ALGORITHM


def test_attack_expired_not_yet_valid_issued_in_future(
    method: JwtMethod, rsa: testing.SigningKey
) -> None:
    expired = rsa.sign(testing.claims(now=NOW - 3600, ttl=60))
    assert rejected(method, expired) == reasons.TOKEN_EXPIRED
    early = rsa.sign(testing.claims(now=NOW, nbf=int(NOW + 120)))
    assert rejected(method, early) == reasons.TOKEN_NOT_YET_VALID
    issued_later = rsa.sign(testing.claims(now=NOW, iat=int(NOW + 120)))
    assert rejected(method, issued_later) == reasons.TOKEN_NOT_YET_VALID


def test_attack_wrong_issuer_audience_kid(method: JwtMethod, rsa: testing.SigningKey) -> None:
    assert (
        rejected(method, rsa.sign(testing.claims(issuer="https://idp.evil", now=NOW)))
        == reasons.UNKNOWN_ISSUER
    )
    assert (
        rejected(method, rsa.sign(testing.claims(audience="not-us", now=NOW)))
        == reasons.BAD_AUDIENCE
    )
    assert (
        rejected(method, rsa.sign(testing.claims(now=NOW), {"kid": "rsa-9"})) == reasons.UNKNOWN_KEY
    )


def test_attack_tampered_payload_and_signature(method: JwtMethod, rsa: testing.SigningKey) -> None:
    token = rsa.sign(testing.claims("bob", now=NOW))
    header, payload, signature = token.split(".")
    forged = testing.unsigned_token({}, testing.claims("alice", ["admin"], now=NOW))
    assert rejected(method, f"{header}.{forged.split('.')[1]}.{signature}") == (
        reasons.BAD_SIGNATURE
    )
    raw = bytearray(_b64(signature))
    raw[0] ^= 0x01
    flipped = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    assert rejected(method, f"{header}.{payload}.{flipped}") == reasons.BAD_SIGNATURE


@pytest.mark.parametrize("segment", [0, 1, 2])
@pytest.mark.parametrize("garbage", ["!!!!", "a", "a=b=", "YQ=x", "ü"])
def test_attack_malformed_base64(
    method: JwtMethod, rsa: testing.SigningKey, segment: int, garbage: str
) -> None:
    parts = rsa.sign(testing.claims(now=NOW)).split(".")
    parts[segment] = garbage
    assert rejected(method, ".".join(parts)) in reasons.INVALID_CREDENTIAL


def test_attack_oversized_token_rejected_before_parsing(
    rsa: testing.SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    from authz.identity import jwt as jwt_module

    method = JwtMethod([issuer(rsa)])

    def no_parsing(segment: str) -> None:
        raise AssertionError("parsed an oversized token")

    monkeypatch.setattr(jwt_module, "_b64_json", no_parsing)
    token = rsa.sign(testing.claims(now=NOW, padding="x" * MAX_TOKEN_LENGTH))
    assert len(token) > MAX_TOKEN_LENGTH == 8192
    assert rejected(method, token) == reasons.INVALID_TOKEN
    assert len(method._cache) == 0


@pytest.mark.parametrize(
    "extra",
    [
        {"crit": ["exp"], "exp": 1},
        {"crit": []},
        {"jku": "https://evil.example/jwks.json"},
        {"x5u": "https://evil.example/cert.pem"},
        {"x5c": ["MIIB"]},
        {"b64": False, "crit": ["b64"]},
    ],
)
def test_attack_forbidden_headers(
    method: JwtMethod, rsa: testing.SigningKey, extra: dict[str, Any]
) -> None:
    assert rejected(method, _signed_with_header(rsa, extra)) == reasons.INVALID_TOKEN


def test_attack_embedded_jwk_header(method: JwtMethod) -> None:
    """A token signed by the attacker's own key, which it carries in ``jwk``."""
    attacker = testing.rsa_key("rsa-1")
    token = _signed_with_header(attacker, {"jwk": attacker.public_jwk()})
    assert rejected(method, token) == reasons.INVALID_TOKEN


@pytest.mark.parametrize("cty", ["JWT", "jwt", "application/jwt", 7])
def test_attack_nested_jwt(method: JwtMethod, rsa: testing.SigningKey, cty: object) -> None:
    assert rejected(method, _signed_with_header(rsa, {"cty": cty})) == reasons.INVALID_TOKEN


_SEGMENT = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=", max_size=60
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=400).map(lambda b: b.decode("latin-1")),
        st.lists(_SEGMENT, min_size=1, max_size=5).map(".".join),
        st.lists(
            st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3).map(
                lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")
            ),
            min_size=3,
            max_size=3,
        ).map(".".join),
    )
)
def test_property_random_tokens_never_raise_never_authenticate(token: str) -> None:
    method = _PROPERTY_METHOD
    try:
        identity = method.authenticate(request(f"Bearer {token}"), NOW)
    except AuthenticationError as error:
        assert error.reason in reasons.INVALID_CREDENTIAL
    else:
        assert identity is None  # only an empty token after "Bearer" (no credential)
    try:
        method.verify(token, NOW)
    except AuthenticationError as error:
        assert error.reason in reasons.INVALID_CREDENTIAL
    else:
        raise AssertionError("a random token authenticated")


_PROPERTY_METHOD = JwtMethod(
    [
        issuer(
            testing.ec_key("ec-1"),
            jwks={"keys": [testing.ec_key("ec-1").public_jwk()]},
            algorithms=("ES256", "EdDSA"),
        )
    ]
)


# ---- policy files: clock_skew_seconds and EdDSA ----------------------------------------


def _load_issuer(tmp_path: Path, extra: str) -> Issuer:
    from tests.policy_files import VALID_POLICY, write_policy

    text = VALID_POLICY.replace(
        "    jwks_file: keys/jwks.json\n", f"    jwks_file: keys/jwks.json\n{extra}", 1
    )
    assert text != VALID_POLICY or not extra
    return load_policy(write_policy(tmp_path, text=text)).issuers[0]


def test_loader_clock_skew_default_and_value(tmp_path: Path) -> None:
    assert _load_issuer(tmp_path / "a", "").clock_skew_seconds == 30
    loaded = _load_issuer(tmp_path / "b", "    clock_skew_seconds: 0\n")
    assert loaded.clock_skew_seconds == 0
    loaded = _load_issuer(
        tmp_path / "c", "    clock_skew_seconds: 300\n    algorithms: [EdDSA, RS256]\n"
    )
    assert (loaded.clock_skew_seconds, loaded.algorithms) == (300, ("EdDSA", "RS256"))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("301", "issuers[0].clock_skew_seconds: 301 is out of range; use 0..300"),
        ("-1", "issuers[0].clock_skew_seconds: -1 is out of range; use 0..300"),
        ("thirty", "issuers[0].clock_skew_seconds: expected an integer"),
        ("1.5", "issuers[0].clock_skew_seconds: expected an integer"),
    ],
)
def test_loader_rejects_bad_clock_skew_with_file_line(
    tmp_path: Path, value: str, message: str
) -> None:
    with pytest.raises(PolicyError) as info:
        _load_issuer(tmp_path, f"    clock_skew_seconds: {value}\n")
    (issue,) = [str(i) for i in info.value.issues]
    assert message in issue
    assert "mesh.yaml:" in issue


@pytest.mark.parametrize("alg", ["HS256", "none"])
def test_loader_rejects_hmac_and_none(tmp_path: Path, alg: str) -> None:
    with pytest.raises(PolicyError) as info:
        _load_issuer(tmp_path, f"    algorithms: [RS256, {alg}]\n")
    assert f"'{alg}' is not supported" in str(info.value.issues[0])


def test_loader_accepts_an_ed25519_jwks(tmp_path: Path, ed: OKPKey) -> None:
    from tests.policy_files import VALID_POLICY, write_policy

    line = "    jwks_file: keys/jwks.json\n"
    text = VALID_POLICY.replace(line, f"{line}    algorithms: [EdDSA]\n")
    directory = write_policy(tmp_path, text=text)
    (directory / "keys" / "jwks.json").write_text(json.dumps({"keys": [ed_jwk(ed)]}))
    loaded = load_policy(directory).issuers[0]
    method = JwtMethod([loaded])
    token = ed_sign(ed, testing.claims(issuer=loaded.issuer, audience="meshward-test", now=NOW))
    identity = authenticate(method, token)
    assert identity is not None and identity.subject == "alice"
