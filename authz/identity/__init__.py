"""Identity phase: one module per credential kind, all behind :class:`IdentityMethod`."""

from authz.identity.base import AuthenticationError, Identities, Identity, IdentityMethod

__all__ = ["AuthenticationError", "Identities", "Identity", "IdentityMethod"]
