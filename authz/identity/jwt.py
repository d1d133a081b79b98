"""JWT bearer tokens (RFC 7519 / RFC 6750) verified against the policy's issuers.

``Authorization: Bearer <JWS compact>``. The steps, in order, and why:

1. Peek at the *unverified* header and payload only to choose the issuer (``iss``) and
   the key (``kid``). Nothing peeked is trusted: claims are read again from the
   payload that the signature covered.
2. Unknown ``iss`` → ``unknown_issuer``. ``alg`` must be one the issuer allows;
   ``none`` and HMAC algorithms are never allowed (only RSA and EC public keys are
   imported, so a public key can never double as an HMAC secret).
3. ``kid`` must name a key of the issuer's JWKS whose type (and curve) fits ``alg``
   and whose ``use``/``alg`` parameters, when present, allow it; without ``kid``
   every fitting key is tried, as Envoy's jwt_authn does.
4. Signature (joserfc), then ``iss``, ``exp`` (required), ``nbf``, ``aud`` (must
   intersect the issuer's audiences), with ``leeway`` seconds of clock skew.
5. Subject from ``subject_claim`` (non-empty string), groups from ``groups_claim``
   (absent, or a list of strings).

Verified tokens are cached by their exact string until ``exp``, so a repeat costs a
dict lookup instead of a signature check (RS256 ~30 µs, ES256 ~85 µs). The cache
belongs to one compiled policy: a policy reload starts a new one, so a key removed
from a JWKS stops being trusted at once.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import import_key
from joserfc.jws import JWSRegistry

from authz import reasons
from authz.identity.base import AuthenticationError, Identity
from authz.request import AuthzRequest
from meshward.policy.model import Issuer

_log = logging.getLogger("meshward.authz.jwt")

#: JWS algorithm → (JWK ``kty``, ``crv`` or None). Only asymmetric algorithms exist
#: here, so ``none`` and ``HS*`` have no key and can never verify.
_KEY_TYPES: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
}

#: Longer tokens are rejected before any parsing (and never fill the cache).
MAX_TOKEN_LENGTH = 8192


@dataclass(frozen=True, slots=True)
class _IssuerKeys:
    """One issuer, compiled: its keys by algorithm and kid, and a joserfc registry."""

    issuer: Issuer
    audiences: frozenset[str]
    algorithms: frozenset[str]
    #: alg → kid → keys (normally one key per kid).
    by_kid: dict[str, dict[str, tuple[Any, ...]]]
    #: alg → every key fitting it (tried in turn for tokens without ``kid``).
    by_alg: dict[str, tuple[Any, ...]]
    registry: JWSRegistry


class JwtMethod:
    """The ``jwt`` identity method for a set of issuers (see the module docstring)."""

    name = "jwt"

    def __init__(
        self, issuers: Iterable[Issuer], *, leeway: float = 30.0, cache_size: int = 4096
    ) -> None:
        self._issuers = {i.issuer: _compile_issuer(i) for i in issuers}
        self._leeway = leeway
        self._cache = _TokenCache(cache_size)

    def authenticate(self, request: AuthzRequest, now: float) -> Identity | None:
        header = request.headers.get("authorization")
        if header is None:
            return None
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None  # another scheme (Basic, an API key …): not ours
        token = token.strip()
        if not token:
            raise AuthenticationError(reasons.INVALID_TOKEN, "empty bearer token")
        identity = self._cache.get(token, now)
        if identity is not None:
            return identity
        identity, expires = self.verify(token, now)
        self._cache.put(token, identity, expires)
        return identity

    def verify(self, token: str, now: float) -> tuple[Identity, float]:
        """Verify ``token`` at ``now``; the identity and its ``exp``. No cache."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthenticationError(reasons.INVALID_TOKEN, "token too long")
        parts = token.split(".")
        if len(parts) != 3:
            raise AuthenticationError(reasons.INVALID_TOKEN, "not a JWS compact token")
        header = _b64_json(parts[0])
        peeked = _b64_json(parts[1])
        if header is None or peeked is None:
            raise AuthenticationError(reasons.INVALID_TOKEN, "malformed token")

        iss = peeked.get("iss")
        compiled = self._issuers.get(iss) if isinstance(iss, str) else None
        if compiled is None:
            raise AuthenticationError(reasons.UNKNOWN_ISSUER, "unknown issuer")

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in compiled.algorithms:
            raise AuthenticationError(reasons.UNSUPPORTED_ALGORITHM, "algorithm not allowed")

        kid = header.get("kid")
        if kid is None:
            keys = compiled.by_alg.get(alg, ())
        elif isinstance(kid, str):
            keys = compiled.by_kid.get(alg, {}).get(kid, ())
        else:
            raise AuthenticationError(reasons.INVALID_TOKEN, "malformed token")
        if not keys:
            raise AuthenticationError(reasons.UNKNOWN_KEY, "unknown signing key")

        payload = _verified_payload(token, keys, compiled.registry)
        return _identity(payload, compiled, now, self._leeway)


def _compile_issuer(issuer: Issuer) -> _IssuerKeys:
    algorithms = frozenset(a for a in issuer.algorithms if a in _KEY_TYPES)
    by_kid: dict[str, dict[str, tuple[Any, ...]]] = {a: {} for a in algorithms}
    by_alg: dict[str, tuple[Any, ...]] = {a: () for a in algorithms}
    entries = issuer.jwks.get("keys", []) if isinstance(issuer.jwks, dict) else []
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        ops = entry.get("key_ops")
        if ops is not None and "verify" not in ops:
            continue
        fitting = [
            alg for alg in algorithms if (entry.get("kty"), entry.get("crv")) == _KEY_TYPES[alg]
        ]
        if "alg" in entry:
            fitting = [a for a in fitting if a == entry["alg"]]
        if not fitting:
            continue
        try:
            key = import_key(entry)
        except (JoseError, ValueError, TypeError, KeyError) as error:
            _log.warning(
                "skipping unusable JWKS key",
                extra={"issuer": issuer.name, "key_index": index, "error": type(error).__name__},
            )
            continue
        kid = entry.get("kid")
        for alg in fitting:
            by_alg[alg] = (*by_alg[alg], key)
            if isinstance(kid, str):
                by_kid[alg][kid] = (*by_kid[alg].get(kid, ()), key)
    return _IssuerKeys(
        issuer=issuer,
        audiences=frozenset(issuer.audiences),
        algorithms=algorithms,
        by_kid=by_kid,
        by_alg=by_alg,
        registry=JWSRegistry(algorithms=sorted(algorithms), strict_check_header=False),
    )


def _b64_json(segment: str) -> dict[str, Any] | None:
    """A base64url JSON object segment, or None when it is not one."""
    try:
        raw = base64.urlsafe_b64decode(segment.encode("ascii") + b"=" * (-len(segment) % 4))
        value = json.loads(raw)
    except ValueError:  # binascii.Error, UnicodeError and JSONDecodeError are ValueErrors
        return None
    return value if isinstance(value, dict) else None


def _verified_payload(token: str, keys: tuple[Any, ...], registry: JWSRegistry) -> dict[str, Any]:
    """The payload the signature covers, trying each candidate key in turn."""
    for key in keys:
        try:
            verified = jws.deserialize_compact(token, key, registry=registry)
        except BadSignatureError:
            continue
        except (JoseError, ValueError, TypeError, KeyError) as error:
            raise AuthenticationError(reasons.INVALID_TOKEN, "malformed token") from error
        try:
            payload = json.loads(verified.payload or b"")
        except ValueError as error:
            raise AuthenticationError(reasons.INVALID_TOKEN, "malformed token") from error
        if not isinstance(payload, dict):
            raise AuthenticationError(reasons.INVALID_TOKEN, "malformed token")
        return payload
    raise AuthenticationError(reasons.BAD_SIGNATURE, "signature does not verify")


def _number(value: Any) -> float | None:
    """A finite JSON number (json.loads accepts NaN and Infinity, which compare oddly)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number):
            return number
    return None


def _identity(
    claims: dict[str, Any], compiled: _IssuerKeys, now: float, leeway: float
) -> tuple[Identity, float]:
    issuer = compiled.issuer
    if claims.get("iss") != issuer.issuer:
        raise AuthenticationError(reasons.UNKNOWN_ISSUER, "unknown issuer")

    exp = _number(claims.get("exp"))
    if exp is None:
        raise AuthenticationError(reasons.INVALID_TOKEN, "token has no valid exp claim")
    if now >= exp + leeway:
        raise AuthenticationError(reasons.TOKEN_EXPIRED, "token expired")
    if "nbf" in claims:
        nbf = _number(claims["nbf"])
        if nbf is None:
            raise AuthenticationError(reasons.INVALID_TOKEN, "token has an invalid nbf claim")
        if nbf > now + leeway:
            raise AuthenticationError(reasons.TOKEN_NOT_YET_VALID, "token not yet valid")

    aud = claims.get("aud")
    audiences = (aud,) if isinstance(aud, str) else aud if isinstance(aud, list) else ()
    if not any(isinstance(a, str) and a in compiled.audiences for a in audiences):
        raise AuthenticationError(reasons.BAD_AUDIENCE, "token audience not accepted")

    subject = claims.get(issuer.subject_claim)
    if not isinstance(subject, str) or not subject or not subject.isprintable():
        # isprintable(): the subject goes upstream in a header, so no CR/LF or controls
        raise AuthenticationError(reasons.INVALID_TOKEN, "token has no valid subject")
    groups = claims.get(issuer.groups_claim)
    if groups is None:
        groups = []
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise AuthenticationError(reasons.INVALID_TOKEN, "token groups claim is not a list")
    return Identity(subject, tuple(groups), JwtMethod.name, issuer.issuer), exp


class _TokenCache:
    """Verified tokens → identity, until their ``exp``; bounded, oldest evicted first.

    Reads take no lock (a dict lookup is atomic under the GIL); writers serialize so
    eviction never iterates a dict another writer is changing.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: dict[str, tuple[Identity, float]] = {}
        self._lock = threading.Lock()

    def get(self, token: str, now: float) -> Identity | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        if now < entry[1]:
            return entry[0]
        with self._lock:
            self._entries.pop(token, None)
        return None

    def put(self, token: str, identity: Identity, expires: float) -> None:
        if self._size <= 0:
            return
        with self._lock:
            while len(self._entries) >= self._size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[token] = (identity, expires)

    def __len__(self) -> int:
        return len(self._entries)
