"""Step-up authentication: does the user's token meet a route's MFA demand (RFC 9470)?

A route's :class:`~meshward.policy.model.MfaRequirement` is checked only for requests
RBAC already allows: a user who may not use the route at all learns nothing from a
step-up challenge. The token's ``amr`` (a list of method names, RFC 8176) must contain
one of the demanded methods; its ``acr`` must be ``min_acr`` or a level above it in the
``acr_levels`` of the issuer that signed it (a level is only comparable within one
issuer's list); with ``max_age_seconds`` its ``auth_time`` must be that recent.
Identities without token claims (API keys) never meet a demand.

The 401 challenge follows RFC 9470 §3: ``error="insufficient_user_authentication"``
with ``acr_values`` (the acceptable levels, space separated) and ``max_age`` when the
route demands them, so a client knows what to ask its authorization server for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from authz.identity.base import Identity
from meshward.policy.model import Issuer, MfaRequirement


@dataclass(frozen=True, slots=True)
class CompiledMfa:
    """One route's demand, with the acceptable ``acr`` values per issuer resolved."""

    amr: frozenset[str]
    #: issuer URL → the acr values at or above ``min_acr`` (absent: no acr demand).
    acceptable_acr: dict[str, frozenset[str]] | None
    max_age_seconds: int
    #: ``acr_values`` for the challenge (empty: no acr demand).
    acr_values: str

    @classmethod
    def of(cls, demand: MfaRequirement, issuers: tuple[Issuer, ...]) -> CompiledMfa:
        acceptable: dict[str, frozenset[str]] | None = None
        values: list[str] = []
        if demand.min_acr:
            acceptable = {}
            for issuer in issuers:
                if demand.min_acr in issuer.acr_levels:
                    levels = issuer.acr_levels[issuer.acr_levels.index(demand.min_acr) :]
                    acceptable[issuer.issuer] = frozenset(levels)
                    values.extend(v for v in levels if v not in values)
        return cls(frozenset(demand.amr), acceptable, demand.max_age_seconds, " ".join(values))

    def problem(self, user: Identity, now: float) -> str | None:
        """Why ``user``'s authentication is not enough (a phrase safe to show), or None."""
        claims = user.claims
        if claims is None:
            return "this route requires a token from multi-factor sign-in"
        if self.amr:
            amr = claims.get("amr")
            if not isinstance(amr, list) or not any(
                m in self.amr for m in amr if isinstance(m, str)
            ):
                return "this route requires multi-factor authentication"
        if self.acceptable_acr is not None:
            acr = claims.get("acr")
            if not isinstance(acr, str) or acr not in self.acceptable_acr.get(user.issuer, ()):
                return "this route requires a higher authentication level"
        if self.max_age_seconds:
            auth_time = claims.get("auth_time")
            if (
                not isinstance(auth_time, int | float)
                or isinstance(auth_time, bool)
                or not math.isfinite(auth_time)
                or now - auth_time > self.max_age_seconds
            ):
                return "this route requires a more recent sign-in"
        return None

    def challenge(self, realm: str, description: str) -> str:
        """The RFC 9470 ``WWW-Authenticate`` value."""
        value = (
            f'Bearer realm="{realm}", error="insufficient_user_authentication", '
            f'error_description="{description}"'
        )
        if self.acr_values:
            value += f', acr_values="{self.acr_values}"'
        if self.max_age_seconds:
            value += f', max_age="{self.max_age_seconds}"'
        return value
