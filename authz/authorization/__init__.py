"""Authorization phase: what an identity may do (RBAC on the compiled policy)."""

from authz.authorization.rbac import RbacIndex, RuleMatch

__all__ = ["RbacIndex", "RuleMatch"]
