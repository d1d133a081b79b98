"""Static API keys: ``x-api-key: <key>`` or ``Authorization: ApiKey <key>``.

The policy holds only each key's SHA-256 (:class:`~meshward.policy.model.ApiKey`). A
presented key is hashed, the hash looked up, and the stored hash compared with
:func:`hmac.compare_digest` (constant time; also run for unknown keys, against a dummy,
so both paths do the same work). A known key gives a *user* identity: the entry's
``subject`` and ``groups``, method ``api_key``, so the same bindings that grant JWT
users grant it.

- no API key → ``None`` (the next user method, e.g. JWT, is tried);
- an API key together with ``Authorization: Bearer`` → ``ambiguous_credentials`` (authz
  never picks one of two identities); two API keys (header and ``Authorization``) too;
- an empty, over-long or unknown key → ``invalid_api_key``.

The key itself is never logged, traced, cached or put in an error description.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from authz import reasons
from authz.identity.base import AuthenticationError, Identity
from authz.request import AuthzRequest
from meshward.policy.model import ApiKey

#: The header carrying an API key.
HEADER = "x-api-key"
#: The ``Authorization`` scheme carrying an API key (case-insensitive).
SCHEME = "apikey"
#: Longer keys are rejected without hashing.
MAX_KEY_LENGTH = 4096

_DUMMY_HASH = "0" * 64


class ApiKeyMethod:
    """The ``api_key`` identity method for a policy's keys (see the module docstring)."""

    name = "api_key"

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._by_hash: dict[str, Identity] = {}
        self._hashes: dict[str, str] = {}
        for key in keys:
            digest = key.key_sha256.lower()
            self._by_hash[digest] = Identity(key.subject, key.groups, self.name, key.name)
            self._hashes[digest] = digest

    def authenticate(self, request: AuthzRequest, now: float) -> Identity | None:
        key = request.headers.get(HEADER)
        authorization = request.headers.get("authorization")
        if authorization is not None:
            scheme, _, rest = authorization.strip().partition(" ")
            scheme = scheme.lower()
            if scheme == SCHEME:
                if key is not None:
                    raise AuthenticationError(
                        reasons.AMBIGUOUS_CREDENTIALS, "more than one API key"
                    )
                key = rest
            elif key is not None and scheme == "bearer":
                raise AuthenticationError(
                    reasons.AMBIGUOUS_CREDENTIALS, "both a bearer token and an API key"
                )
        if key is None:
            return None
        return self.identify(key.strip())

    def identify(self, key: str) -> Identity:
        """The identity of ``key``; raises ``invalid_api_key`` for an unknown key."""
        if not key:
            raise AuthenticationError(reasons.INVALID_API_KEY, "empty API key")
        if len(key) > MAX_KEY_LENGTH:
            raise AuthenticationError(reasons.INVALID_API_KEY, "API key too long")
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        stored = self._hashes.get(digest)
        if hmac.compare_digest(digest, stored or _DUMMY_HASH) and stored is not None:
            return self._by_hash[digest]
        raise AuthenticationError(reasons.INVALID_API_KEY, "unknown API key")
