"""Identity phase: one module per credential kind, all behind :class:`IdentityMethod`."""

from authz.identity.base import AuthenticationError, Identity, IdentityMethod

__all__ = ["AuthenticationError", "Identity", "IdentityMethod"]
