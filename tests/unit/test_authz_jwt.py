"""JWT identity method: every acceptance rule, with real RS256/ES256 keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest
from cryptography.hazmat.primitives import serialization
from joserfc import jwt

from authz import reasons
from authz.identity.base import AuthenticationError, Identity
from authz.identity.jwt import JwtMethod
from authz.request import AuthzRequest
from meshward.policy.model import Issuer
from tests import authz_helpers as testing

NOW = 1_800_000_000.0


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
    bad_groups = testing.claims("bob", now=NOW)
    bad_groups["groups"] = "staff"
    assert rejected(method, rsa.sign(bad_groups)) == reasons.INVALID_TOKEN


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
