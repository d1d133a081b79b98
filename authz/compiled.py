"""A :class:`Policy` compiled for decisions: identity methods and the RBAC index.

Compiled once per policy version, immutable afterwards, shared by every worker thread.
A reload compiles a new one and swaps the reference; in-flight checks keep the one
they started with.
"""

from __future__ import annotations

from dataclasses import dataclass

from authz.authorization.rbac import RbacIndex
from authz.identity.base import IdentityMethod
from authz.identity.jwt import JwtMethod
from meshward.policy.model import Policy


@dataclass(frozen=True)
class CompiledPolicy:
    """What :func:`authz.decision.decide` needs from a policy."""

    version: str
    #: Tried in order; the first to find its kind of credential decides the identity.
    identity_methods: tuple[IdentityMethod, ...]
    rbac: RbacIndex


def compile_policy(policy: Policy) -> CompiledPolicy:
    """Compile ``policy``. New identity methods are added to the tuple here."""
    methods: list[IdentityMethod] = []
    if policy.issuers:
        methods.append(JwtMethod(policy.issuers))
    return CompiledPolicy(
        version=policy.version, identity_methods=tuple(methods), rbac=RbacIndex(policy)
    )
