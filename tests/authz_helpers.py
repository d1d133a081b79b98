"""Helpers for authz tests and benchmarks: signing keys, JWTs, CheckRequests, a demo policy.

Never imported by the service itself. Keys are generated in memory on every run; none
is ever written to disk.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from meshward import route_context
from meshward.policy.model import (
    Binding,
    Endpoint,
    Gateway,
    Issuer,
    Mesh,
    Permission,
    Policy,
    Role,
    Route,
    RouteMatch,
    Service,
)

DEMO_ISSUER = "https://demo.meshward.local"
DEMO_AUDIENCE = "meshward-demo"
DEMO_TRUST_DOMAIN = "meshward.local"


def spiffe(name: str, namespace: str = "default", trust_domain: str = DEMO_TRUST_DOMAIN) -> str:
    """A workload's SPIFFE ID, as ``Policy.spiffe_id`` makes it."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{name}"


@dataclass(frozen=True)
class SigningKey:
    """A private key with its ``kid`` and JWS algorithm."""

    key: RSAKey | ECKey
    kid: str
    alg: str

    def public_jwk(self) -> dict[str, Any]:
        return {**self.key.as_dict(private=False), "kid": self.kid, "use": "sig"}

    def sign(self, claims: Mapping[str, Any], header: Mapping[str, Any] | None = None) -> str:
        """A JWS compact token over ``claims`` (``header`` entries override the default)."""
        return jwt.encode(
            {"alg": self.alg, "kid": self.kid, **(header or {})},
            dict(claims),
            self.key,
            algorithms=[self.alg],
        )


def rsa_key(kid: str = "rsa-1") -> SigningKey:
    return SigningKey(RSAKey.generate_key(2048, parameters={"kid": kid}), kid, "RS256")


def ec_key(kid: str = "ec-1") -> SigningKey:
    return SigningKey(ECKey.generate_key("P-256", parameters={"kid": kid}), kid, "ES256")


def jwks(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [k.public_jwk() for k in keys]}


def claims(
    subject: str = "alice",
    groups: tuple[str, ...] | list[str] | None = None,
    *,
    issuer: str = DEMO_ISSUER,
    audience: str | list[str] = DEMO_AUDIENCE,
    ttl: float = 3600,
    now: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Typical claims: ``exp`` = now + ttl, ``nbf``/``iat`` = now."""
    issued = int(now if now is not None else time.time())
    out: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": issued,
        "nbf": issued,
        "exp": int(issued + ttl),
    }
    if groups is not None:
        out["groups"] = list(groups)
    out.update(extra)
    return out


def unsigned_token(
    header: Mapping[str, Any], payload: Mapping[str, Any], signature: str = ""
) -> str:
    """A compact token with arbitrary header and payload (for ``alg: none`` and tampering)."""

    def part(value: Mapping[str, Any]) -> str:
        raw = json.dumps(dict(value), separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part(header)}.{part(payload)}.{signature}"


def check_request(
    method: str = "GET",
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    *,
    route: str | None = "orders-api",
    service: str = "orders",
    gateway: str = "edge",
    policy_version: str = "",
    host: str = "edge.local",
    principal: str = "",
) -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy sends it for a request that matched ``route``."""
    message = external_auth_pb2.CheckRequest()
    attributes = message.attributes
    http = attributes.request.http
    http.method = method
    http.path = path
    http.host = host
    http.protocol = "HTTP/1.1"
    for key, value in (headers or {}).items():
        http.headers[key.lower()] = value
    attributes.source.principal = principal
    if route is not None:
        extensions = attributes.context_extensions
        extensions[route_context.ROUTE] = route
        extensions[route_context.SERVICE] = service
        extensions[route_context.GATEWAY] = gateway
        if policy_version:
            extensions[route_context.POLICY_VERSION] = policy_version
    return message


def demo_policy(jwks_document: dict[str, Any]) -> Policy:
    """The demo mesh of ``policies/mesh.yaml``, built in memory with the given JWKS."""
    return Policy.build(
        services=(
            Service("orders", (Endpoint("127.0.0.1", 10101),)),
            Service("catalog", (Endpoint("127.0.0.1", 10102),)),
        ),
        gateways=(
            Gateway(
                "edge",
                10000,
                (
                    Route(
                        "orders-api",
                        RouteMatch(prefix="/orders", methods=("GET", "POST", "DELETE")),
                        "orders",
                    ),
                    Route("catalog-api", RouteMatch(prefix="/catalog"), "catalog"),
                ),
            ),
        ),
        issuers=(
            Issuer(
                name="demo",
                issuer=DEMO_ISSUER,
                audiences=(DEMO_AUDIENCE,),
                jwks=jwks_document,
                algorithms=("RS256", "ES256"),
            ),
        ),
        roles=(
            Role("catalog-reader", (Permission(("GET",), ("/catalog", "/catalog/*")),)),
            Role("orders-reader", (Permission(("GET",), ("/orders", "/orders/*")),)),
            Role(
                "orders-admin",
                (Permission(("GET", "POST", "DELETE"), ("/orders", "/orders/*")),),
            ),
        ),
        bindings=(
            Binding("everyone-reads-catalog", "catalog-reader", groups=("customers", "staff")),
            Binding("staff-read-orders", "orders-reader", groups=("staff",)),
            Binding("alice-runs-orders", "orders-admin", subjects=("alice",)),
        ),
    )


def rebuilt(policy: Policy, **changes: Any) -> Policy:
    """``policy`` with some fields replaced, re-versioned (``Policy.build``)."""
    fields: dict[str, Any] = {
        "services": policy.services,
        "gateways": policy.gateways,
        "issuers": policy.issuers,
        "roles": policy.roles,
        "bindings": policy.bindings,
        "default_action": policy.default_action,
        "mesh": policy.mesh,
    }
    fields.update(changes)
    return Policy.build(**fields)


#: Bindings of :func:`workload_policy` beyond the demo's user bindings.
WORKLOAD_BINDINGS = (
    # workloads only: the orders service may read the catalog
    Binding("orders-reads-catalog", "catalog-reader", workloads=(spiffe("orders"),)),
    # workloads only, trailing wildcard: any workload of namespace "batch" reads orders
    Binding(
        "batch-reads-orders", "orders-reader", workloads=("spiffe://meshward.local/ns/batch/*",)
    ),
    # users *and* workloads: group "ops", but only through the "console" workload
    Binding("ops-via-console", "orders-admin", groups=("ops",), workloads=(spiffe("console"),)),
)


def workload_policy(jwks_document: dict[str, Any]) -> Policy:
    """:func:`demo_policy` plus :data:`WORKLOAD_BINDINGS` (trust domain ``meshward.local``)."""
    base = demo_policy(jwks_document)
    return rebuilt(
        base,
        bindings=(*base.bindings, *WORKLOAD_BINDINGS),
        mesh=Mesh(trust_domain=DEMO_TRUST_DOMAIN),
    )


#: The keys every decision-log line carries (the audit trail's contract).
DECISION_LOG_KEYS = {
    "decision_id",
    "ts",
    "subject",
    "auth_method",
    "route",
    "decision",
    "matched_rule",
    "reason",
    "policy_version",
    "trace_id",
    "audit",
    "audit_outcome",
}


def demo_policy_dir(directory: Path, key: SigningKey) -> Path:
    """The repository's demo policy copied into ``directory``, its JWKS holding ``key``
    (so tests sign tokens the policy accepts)."""
    (directory / "keys").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parents[1] / "policies" / "mesh.yaml", directory)
    (directory / "keys" / "demo-jwks.json").write_text(json.dumps(jwks(key)))
    return directory
