"""Minting test JWTs, good and deliberately bad, with real keys."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

ISSUER = "https://issuer.test"
AUDIENCE = "meshward-test"


def claims(sub: str, groups: tuple[str, ...] = (), ttl: int = 600, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "iat": now,
        "nbf": now - 5,
        "exp": now + ttl,
    }
    if groups:
        out["groups"] = list(groups)
    out.update(extra)
    return out


def sign(key: RSAKey | ECKey, body: dict[str, Any], alg: str | None = None) -> str:
    alg = alg or ("RS256" if isinstance(key, RSAKey) else "ES256")
    return jwt.encode({"alg": alg, "typ": "JWT", "kid": key.kid}, body, key)


def unsigned(body: dict[str, Any], kid: str | None = None) -> str:
    """An `alg: none` token: header.payload. with an empty signature."""
    header: dict[str, Any] = {"alg": "none", "typ": "JWT"}
    if kid:
        header["kid"] = kid

    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(body)}."
