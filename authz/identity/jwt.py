"""JWT bearer tokens (RFC 7519 / RFC 6750) verified against the policy's issuers.

``Authorization: Bearer <JWS compact>``. The steps, in order, and why:

0. A token longer than :data:`MAX_TOKEN_LENGTH` is rejected before any parsing.
1. Peek at the *unverified* header and payload only to choose the issuer (``iss``) and
   the key (``kid``). Nothing peeked is trusted: claims are read again from the
   payload that the signature covered.
2. Header parameters that would bring keys or semantics from elsewhere are refused
   outright: ``crit`` (no extension is understood), ``jku``/``x5u``/``jwk``/``x5c``
   (keys come only from the policy's JWKS), ``b64`` (RFC 7797 unencoded payloads) and
   ``cty: JWT`` (nested tokens are never unwrapped).
3. Unknown ``iss`` → ``unknown_issuer``. ``alg`` must be one the issuer allows;
   ``none`` and HMAC algorithms are never allowed, even if listed (only RSA, EC and
   Ed25519 public keys are imported, so a public key can never double as an HMAC
   secret).
4. ``kid`` must name a key of the issuer's JWKS whose type (and curve) fits ``alg``
   and whose ``use``/``alg`` parameters, when present, allow it; without ``kid``
   every fitting key is tried, as Envoy's jwt_authn does.
5. Signature (joserfc), then ``iss``, ``exp`` (required), ``nbf`` and ``iat`` (when
   present, not in the future), ``aud`` (must intersect the issuer's audiences), with
   the issuer's ``clock_skew_seconds`` of clock skew.
6. Subject from ``subject_claim`` (non-empty printable string), groups from
   ``groups_claim`` (a list of strings, or one string → one group; anything else →
   no groups). Both may be dotted paths into nested claims (``realm_access.roles``);
   a claim whose name itself contains the dots wins over the path.

Keys come from the issuer's inline ``jwks`` or, for an issuer with ``jwks_uri``, from
its :class:`~authz.identity.jwks_remote.JwksFetcher` (one per URL, in the
:class:`~authz.identity.jwks_remote.JwksRegistry` given to :class:`JwtMethod`). A
remote issuer's current snapshot is read on every verification and compiled into the
per-algorithm/per-kid maps once per snapshot. A token whose ``kid`` (or algorithm) has
no key in it is denied ``unknown_key`` at once and asks the fetcher for a refresh
(rate limited there); the Check never waits for the network. Before the first
successful fetch every token of that issuer is ``unknown_key`` ("issuer keys not
available yet").

Verified tokens are cached by their exact string until ``exp``, so a repeat costs a
dict lookup instead of a signature check (RS256 ~30 µs, ES256 ~85 µs). The cache
belongs to one compiled policy: a policy reload starts a new one, so a key removed
from a JWKS stops being trusted at once. An entry verified with a remote key set is
only good while that snapshot is current: a fetch that changes the keys makes every
such token verify again.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.errors import BadSignatureError, JoseError, SecurityWarning
from joserfc.jwk import import_key
from joserfc.jws import JWSRegistry

from authz import reasons
from authz.identity.base import AuthenticationError, Identity
from authz.identity.jwks_remote import JwksConfigError, JwksFetcher, JwksRegistry, JwksSnapshot
from authz.request import AuthzRequest
from meshward.policy.matching import claim_at
from meshward.policy.model import Issuer

_log = logging.getLogger("meshward.authz.jwt")

# joserfc warns on every EdDSA use (RFC 9864 prefers the name "Ed25519"); EdDSA with
# Ed25519 keys is what issuers publish today and what the policy allows by name.
warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)

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
    "EdDSA": ("OKP", "Ed25519"),
}

#: Never accepted, whatever an issuer lists (belt and braces: they have no key type).
_NEVER_ALGORITHMS = frozenset({"none", "HS256", "HS384", "HS512"})

#: Header parameters that make a token unacceptable: keys or certificates named by the
#: token itself (keys come only from the policy's JWKS), critical extensions (none is
#: understood) and RFC 7797 unencoded payloads.
_FORBIDDEN_HEADERS = frozenset({"crit", "jku", "x5u", "jwk", "x5c", "b64"})

#: Tokens longer than this (8 KiB) are rejected before any parsing (and never fill the
#: cache).
MAX_TOKEN_LENGTH = 8192


@dataclass(frozen=True, slots=True)
class _IssuerKeys:
    """One issuer, compiled: its keys by algorithm and kid, and a joserfc registry."""

    issuer: Issuer
    audiences: frozenset[str]
    algorithms: frozenset[str]
    #: Seconds of clock skew for ``exp``/``nbf``/``iat``.
    leeway: float
    #: alg → kid → keys (normally one key per kid).
    by_kid: dict[str, dict[str, tuple[Any, ...]]]
    #: alg → every key fitting it (tried in turn for tokens without ``kid``).
    by_alg: dict[str, tuple[Any, ...]]
    registry: JWSRegistry


#: Where a verified token's key came from: None for inline keys, else the fetcher and
#: its snapshot when verification began (the cache entry lives only while it is current).
_KeySource = tuple[JwksFetcher, JwksSnapshot | None] | None


class _RemoteIssuer:
    """An issuer whose keys come from a fetcher: compiled once per snapshot."""

    __slots__ = ("_compiled", "_empty", "fetcher", "issuer", "leeway")

    def __init__(self, issuer: Issuer, fetcher: JwksFetcher, leeway: float | None) -> None:
        self.issuer = issuer
        self.fetcher = fetcher
        self.leeway = leeway
        #: Stands in while no keys were fetched: algorithms and claims rules, no key.
        self._empty = _compile_issuer(issuer, leeway, {})
        #: (snapshot, its compilation), replaced as one reference (races only compile
        #: the same snapshot twice).
        self._compiled: tuple[JwksSnapshot, _IssuerKeys] | None = None

    def current(self) -> tuple[_IssuerKeys, JwksSnapshot | None]:
        snapshot = self.fetcher.snapshot
        if snapshot is None:
            return self._empty, None
        compiled = self._compiled
        if compiled is None or compiled[0] is not snapshot:
            compiled = (snapshot, _compile_issuer(self.issuer, self.leeway, snapshot.jwks))
            self._compiled = compiled
        return compiled[1], snapshot


class JwtMethod:
    """The ``jwt`` identity method for a set of issuers (see the module docstring)."""

    name = "jwt"

    def __init__(
        self,
        issuers: Iterable[Issuer],
        *,
        jwks: JwksRegistry | None = None,
        leeway: float | None = None,
        cache_size: int = 4096,
        cache_stats: TokenCacheStats | None = None,
    ) -> None:
        """``leeway``, when given, overrides every issuer's ``clock_skew_seconds``;
        ``cache_stats`` counts this method's cache hits and misses (shared across
        reloads by the serving process).

        Issuers with a ``jwks_uri`` get their fetcher from ``jwks``; without a registry
        they raise :class:`~authz.identity.jwks_remote.JwksConfigError`.
        """
        self._issuers: dict[str, _IssuerKeys] = {}
        self._remote: dict[str, _RemoteIssuer] = {}
        for issuer in issuers:
            if not issuer.jwks_uri:
                self._issuers[issuer.issuer] = _compile_issuer(issuer, leeway)
            elif jwks is None:
                raise JwksConfigError(
                    f"issuer {issuer.name}: its keys come from {issuer.jwks_uri}, but no "
                    "JwksRegistry was given to fetch them (compile_policy(policy, jwks=...))"
                )
            else:
                self._remote[issuer.issuer] = _RemoteIssuer(issuer, jwks.fetcher(issuer), leeway)
        self._cache = _TokenCache(cache_size, cache_stats)

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
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthenticationError(reasons.INVALID_TOKEN, "token too long")
        identity = self._cache.get(token, now)
        if identity is not None:
            return identity
        # Read before verifying: an entry is keyed to the key set current *before* the
        # verification, so a swap during it can only make the entry miss, never outlive
        # the keys it was verified with.
        before = {i: r.fetcher.snapshot for i, r in self._remote.items()} if self._remote else {}
        identity, expires = self.verify(token, now)
        remote = self._remote.get(identity.issuer) if before else None
        source = (remote.fetcher, before[identity.issuer]) if remote is not None else None
        self._cache.put(token, identity, expires, source)
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
        if not _FORBIDDEN_HEADERS.isdisjoint(header):
            raise AuthenticationError(reasons.INVALID_TOKEN, "token header not accepted")
        cty = header.get("cty")
        if cty is not None and (
            not isinstance(cty, str) or cty.lower() in ("jwt", "application/jwt")
        ):
            raise AuthenticationError(reasons.INVALID_TOKEN, "nested tokens not accepted")

        iss = peeked.get("iss")
        if not isinstance(iss, str):
            raise AuthenticationError(reasons.UNKNOWN_ISSUER, "unknown issuer")
        remote = None
        snapshot = None
        compiled = self._issuers.get(iss)
        if compiled is None:
            remote = self._remote.get(iss)
            if remote is None:
                raise AuthenticationError(reasons.UNKNOWN_ISSUER, "unknown issuer")
            compiled, snapshot = remote.current()

        alg = header.get("alg")
        if not isinstance(alg, str) or alg in _NEVER_ALGORITHMS or alg not in compiled.algorithms:
            raise AuthenticationError(reasons.UNSUPPORTED_ALGORITHM, "algorithm not allowed")

        kid = header.get("kid")
        if kid is None:
            keys = compiled.by_alg.get(alg, ())
        elif isinstance(kid, str):
            keys = compiled.by_kid.get(alg, {}).get(kid, ())
        else:
            raise AuthenticationError(reasons.INVALID_TOKEN, "malformed token")
        if not keys:
            if remote is not None:
                # A key the issuer may have published since the last fetch: ask for a
                # refresh (rate limited by the fetcher) and deny now, without waiting.
                remote.fetcher.request_refresh()
                if snapshot is None:
                    raise AuthenticationError(reasons.UNKNOWN_KEY, "issuer keys not available yet")
            raise AuthenticationError(reasons.UNKNOWN_KEY, "unknown signing key")

        payload = _verified_payload(token, keys, compiled.registry)
        return _identity(payload, compiled, now)


def _compile_issuer(
    issuer: Issuer, leeway: float | None = None, jwks: dict[str, Any] | None = None
) -> _IssuerKeys:
    """Compile ``issuer`` with its inline JWKS, or with ``jwks`` (a fetched key set)."""
    algorithms = frozenset(
        a for a in issuer.algorithms if a in _KEY_TYPES and a not in _NEVER_ALGORITHMS
    )
    by_kid: dict[str, dict[str, tuple[Any, ...]]] = {a: {} for a in algorithms}
    by_alg: dict[str, tuple[Any, ...]] = {a: () for a in algorithms}
    document = issuer.jwks if jwks is None else jwks
    entries = document.get("keys", []) if isinstance(document, dict) else []
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
        leeway=float(issuer.clock_skew_seconds if leeway is None else leeway),
        by_kid=by_kid,
        by_alg=by_alg,
        registry=JWSRegistry(algorithms=sorted(algorithms), strict_check_header=False),
    )


def _b64_json(segment: str) -> dict[str, Any] | None:
    """A base64url JSON object segment, or None when it is not one."""
    try:
        raw = base64.urlsafe_b64decode(segment.encode("ascii") + b"=" * (-len(segment) % 4))
        value = json.loads(raw)
    except (ValueError, RecursionError):  # binascii, Unicode and JSON errors are ValueErrors
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
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            return None
        if math.isfinite(number):
            return number
    return None


def _groups(value: Any) -> tuple[str, ...]:
    """A list of strings, or one string (one group); anything else is no groups."""
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(g, str) for g in value):
        return tuple(value)
    return ()


def _identity(claims: dict[str, Any], compiled: _IssuerKeys, now: float) -> tuple[Identity, float]:
    issuer = compiled.issuer
    leeway = compiled.leeway
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
    if "iat" in claims:
        iat = _number(claims["iat"])
        if iat is None:
            raise AuthenticationError(reasons.INVALID_TOKEN, "token has an invalid iat claim")
        if iat > now + leeway:
            raise AuthenticationError(reasons.TOKEN_NOT_YET_VALID, "token issued in the future")

    aud = claims.get("aud")
    audiences = (aud,) if isinstance(aud, str) else aud if isinstance(aud, list) else ()
    if not any(isinstance(a, str) and a in compiled.audiences for a in audiences):
        raise AuthenticationError(reasons.BAD_AUDIENCE, "token audience not accepted")

    subject = claim_at(claims, issuer.subject_claim)
    if not isinstance(subject, str) or not subject or not subject.isprintable():
        # isprintable(): the subject goes upstream in a header, so no CR/LF or controls
        raise AuthenticationError(reasons.INVALID_TOKEN, "token has no valid subject")
    groups = _groups(claim_at(claims, issuer.groups_claim))
    return Identity(subject, groups, JwtMethod.name, issuer.issuer, claims), exp


class TokenCacheStats:
    """Hits and misses of every token cache in a process (caches are rebuilt with each
    policy; the counts live on, so they stay monotonic for Prometheus). A miss is a
    lookup that needed a signature check: unknown, expired or from a replaced key set."""

    __slots__ = ("_lock", "hits", "misses")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def hit(self) -> None:
        with self._lock:
            self.hits += 1

    def miss(self) -> None:
        with self._lock:
            self.misses += 1


class _TokenCache:
    """Verified tokens → identity, until their ``exp``; bounded, oldest evicted first.

    An entry verified with a fetched key set is only good while that snapshot is its
    fetcher's current one. Reads take no lock (a dict lookup is atomic under the GIL);
    writers serialize so eviction never iterates a dict another writer is changing.
    """

    def __init__(self, size: int, stats: TokenCacheStats | None = None) -> None:
        self._size = size
        self._entries: dict[str, tuple[Identity, float, _KeySource]] = {}
        self._lock = threading.Lock()
        self._stats = stats if stats is not None else TokenCacheStats()

    def get(self, token: str, now: float) -> Identity | None:
        entry = self._entries.get(token)
        if entry is None:
            self._stats.miss()
            return None
        source = entry[2]
        if now < entry[1] and (source is None or source[0].snapshot is source[1]):
            self._stats.hit()
            return entry[0]
        self._stats.miss()
        with self._lock:
            self._entries.pop(token, None)
        return None

    def put(self, token: str, identity: Identity, expires: float, source: _KeySource) -> None:
        if self._size <= 0:
            return
        with self._lock:
            while len(self._entries) >= self._size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[token] = (identity, expires, source)

    def __len__(self) -> int:
        return len(self._entries)
