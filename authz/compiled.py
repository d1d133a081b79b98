"""A :class:`Policy` compiled for decisions: identity methods and the RBAC index.

Compiled once per policy version, immutable afterwards, shared by every worker thread.
A reload compiles a new one and swaps the reference; in-flight checks keep the one
they started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from authz.authorization.mfa import CompiledMfa
from authz.authorization.rbac import RbacIndex
from authz.identity.api_key import ApiKeyMethod
from authz.identity.base import IdentityMethod
from authz.identity.jwks_remote import JwksRegistry
from authz.identity.jwt import JwtMethod, TokenCacheStats
from authz.identity.mtls import MtlsMethod
from meshward.policy.model import Policy, Responses


@dataclass(frozen=True)
class CompiledPolicy:
    """What :func:`authz.decision.decide` needs from a policy."""

    version: str
    #: Methods establishing the *user* identity, tried in order; the first to find its
    #: kind of credential decides it (a bad one is a 401).
    user_methods: tuple[IdentityMethod, ...]
    rbac: RbacIndex
    #: Methods establishing the *workload* identity (the mTLS peer), tried in order the
    #: same way (a bad one is a 403 ``untrusted_workload``).
    workload_methods: tuple[IdentityMethod, ...] = ()
    #: Route name → its step-up demand (routes without one are absent).
    mfa: dict[str, CompiledMfa] = field(default_factory=dict)
    #: What allowed requests carry upstream.
    responses: Responses = field(default_factory=Responses)


def compile_policy(
    policy: Policy,
    *,
    jwks: JwksRegistry | None = None,
    token_cache_stats: TokenCacheStats | None = None,
) -> CompiledPolicy:
    """Compile ``policy``. New identity methods are added to a tuple here.

    ``jwks`` provides the keys of issuers with a ``jwks_uri`` (authz passes its one
    process-wide registry, so a reload keeps fetchers and keys; CLIs pass one they
    filled with :meth:`JwksRegistry.fetch_once`). Such an issuer without a registry, a
    non-``https://`` URL or an unusable CA bundle raises
    :class:`~authz.identity.jwks_remote.JwksConfigError` (a ``ValueError``): no private
    registry is made here, since its threads would outlive the compiled policy unowned.
    ``token_cache_stats`` counts the verified-token cache's hits and misses.
    """
    user_methods: list[IdentityMethod] = []
    if policy.api_keys:
        # First: it also rejects a request carrying both an API key and a bearer token.
        user_methods.append(ApiKeyMethod(policy.api_keys))
    if policy.issuers:
        user_methods.append(JwtMethod(policy.issuers, jwks=jwks, cache_stats=token_cache_stats))
    return CompiledPolicy(
        version=policy.version,
        user_methods=tuple(user_methods),
        rbac=RbacIndex(policy),
        workload_methods=(MtlsMethod(policy.mesh.trust_domain),),
        mfa={
            route.name: CompiledMfa.of(route.mfa, policy.issuers)
            for route in policy.routes()
            if route.mfa is not None
        },
        responses=policy.responses,
    )
