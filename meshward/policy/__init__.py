"""Policy model and loader: YAML in, one immutable, versioned :class:`Policy` out."""

from meshward.policy.model import (
    Binding,
    Endpoint,
    Gateway,
    Issuer,
    Permission,
    Policy,
    Role,
    Route,
    RouteMatch,
    Service,
    Source,
)

__all__ = [
    "Binding",
    "Endpoint",
    "Gateway",
    "Issuer",
    "Permission",
    "Policy",
    "Role",
    "Route",
    "RouteMatch",
    "Service",
    "Source",
]
