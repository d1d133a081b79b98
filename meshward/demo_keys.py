"""The demo signing key: created on first run, kept out of git, used to mint demo JWTs.

The private key (a JWK, RS256) lives in the state directory (``.meshward/`` by default,
written 0600); its public JWKS is written where the demo policy's issuer points
(``policies/keys/demo-jwks.json``). Both paths are git-ignored: no key is ever
committed, and every checkout gets its own.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.jwk import RSAKey

#: Issuer and audience of the demo policy's ``demo`` issuer.
DEMO_ISSUER = "https://demo.meshward.local"
DEMO_AUDIENCE = "meshward-demo"
DEFAULT_STATE_DIR = Path(".meshward")
DEFAULT_JWKS = Path("policies/keys/demo-jwks.json")


@dataclass(frozen=True)
class DemoKey:
    """The demo private key and where its files are."""

    key: RSAKey
    key_path: Path
    jwks_path: Path

    @property
    def kid(self) -> str:
        return str(self.key.kid)

    def mint(
        self,
        subject: str,
        groups: list[str] | tuple[str, ...] = (),
        *,
        ttl: int = 3600,
        issuer: str = DEMO_ISSUER,
        audience: str = DEMO_AUDIENCE,
        extra: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> str:
        """A signed RS256 JWT for ``subject``; a negative ``ttl`` mints an expired token."""
        issued = int(now if now is not None else time.time())
        claims: dict[str, Any] = {
            "iss": issuer,
            "aud": audience,
            "sub": subject,
            "iat": issued,
            "nbf": issued - 5 if ttl > 0 else issued + ttl - 5,
            "exp": issued + ttl,
        }
        if groups:
            claims["groups"] = list(groups)
        claims.update(extra or {})
        return jwt.encode({"alg": "RS256", "typ": "JWT", "kid": self.kid}, claims, self.key)


def ensure_demo_key(state_dir: Path = DEFAULT_STATE_DIR, jwks_path: Path = DEFAULT_JWKS) -> DemoKey:
    """Load the demo key, creating it (and its public JWKS) on first use.

    The JWKS is rewritten from the private key whenever it is missing or stale, so a
    deleted ``policies/keys/`` heals itself.
    """
    key_path = state_dir / "demo-signing-key.jwk.json"
    if key_path.exists():
        key = RSAKey.import_key(json.loads(key_path.read_text()))
    else:
        key = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"}, auto_kid=True)
        state_dir.mkdir(parents=True, exist_ok=True)
        _write_private(key_path, json.dumps(key.as_dict(private=True)))
    public = {"keys": [key.as_dict(private=False)]}
    text = json.dumps(public, indent=2) + "\n"
    if not jwks_path.exists() or jwks_path.read_text() != text:
        jwks_path.parent.mkdir(parents=True, exist_ok=True)
        jwks_path.write_text(text)
    return DemoKey(key, key_path, jwks_path)


def _write_private(path: Path, text: str) -> None:
    """Write a secret file created 0600 from the start (no window where it is readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
