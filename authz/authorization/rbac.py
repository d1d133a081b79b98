"""RBAC: the policy's roles and bindings compiled once into an index.

Compilation turns every binding into grants (binding, role, permission) indexed by
subject and by group, so a decision looks at only the grants of the identity's
subject and groups. Default deny: no matching grant, no access.

A permission matches a request when its method is listed (empty = any), its path
matches one pattern — exact (``/orders``), prefix (``/orders/*`` matches
``/orders/`` and below) or ``*`` (any path) — and its service is listed (empty =
any). Paths are compared as Envoy saw them, undecoded. A path with a dot segment
(``.``/``..``, also percent-encoded, or behind a backslash) never matches a prefix
pattern: an upstream that resolves it could land outside the prefix.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from authz.identity.base import Identity
from authz.request import AuthzRequest
from meshward.policy.model import Permission, Policy


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """Which rule allowed a request: the binding, its role, the permission's index."""

    binding: str
    role: str
    permission: int

    def __str__(self) -> str:
        return f"{self.binding}/{self.role}#{self.permission}"


@dataclass(frozen=True, slots=True)
class _CompiledPermission:
    methods: frozenset[str]
    any_path: bool
    exact: frozenset[str]
    prefixes: tuple[str, ...]
    services: frozenset[str]

    @classmethod
    def of(cls, permission: Permission) -> _CompiledPermission:
        return cls(
            methods=frozenset(m.upper() for m in permission.methods),
            any_path="*" in permission.paths,
            exact=frozenset(p for p in permission.paths if not p.endswith("*")),
            prefixes=tuple(p[:-1] for p in permission.paths if p.endswith("*") and p != "*"),
            services=frozenset(permission.services),
        )

    def matches(self, method: str, path: str, service: str, plain_path: bool) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.services and service not in self.services:
            return False
        if self.any_path or path in self.exact:
            return True
        return plain_path and any(path.startswith(p) for p in self.prefixes)


@dataclass(frozen=True, slots=True)
class _Grant:
    order: int  # binding position in the policy: the first match in policy order wins
    match: RuleMatch
    permission: _CompiledPermission


class RbacIndex:
    """Compiled roles and bindings of one policy; immutable and thread-safe."""

    def __init__(self, policy: Policy) -> None:
        roles = {role.name: role for role in policy.roles}
        by_subject: dict[str, list[_Grant]] = {}
        by_group: dict[str, list[_Grant]] = {}
        for order, binding in enumerate(policy.bindings):
            role = roles.get(binding.role)
            if role is None:
                continue  # the loader rejects this; an unknown role grants nothing
            grants = [
                _Grant(order, RuleMatch(binding.name, role.name, i), _CompiledPermission.of(p))
                for i, p in enumerate(role.permissions)
            ]
            for subject in binding.subjects:
                by_subject.setdefault(subject, []).extend(grants)
            for group in binding.groups:
                by_group.setdefault(group, []).extend(grants)
        self._by_subject = {k: tuple(v) for k, v in by_subject.items()}
        self._by_group = {k: tuple(v) for k, v in by_group.items()}

    def authorize(self, identity: Identity, request: AuthzRequest) -> RuleMatch | None:
        """The first rule (in policy order) allowing ``request``, None to deny."""
        return self.match(identity, request.method, request.path, request.service)

    def match(self, identity: Identity, method: str, path: str, service: str) -> RuleMatch | None:
        """:meth:`authorize` on the request's method, path and (routed-to) service."""
        plain = is_plain_path(path)
        best: _Grant | None = None
        for grants in self._grants(identity):
            for grant in grants:
                if best is not None and grant.order >= best.order:
                    break  # grants are in policy order: nothing better in this list
                if grant.permission.matches(method, path, service, plain):
                    best = grant
                    break
        return best.match if best is not None else None

    def _grants(self, identity: Identity) -> Iterable[tuple[_Grant, ...]]:
        found = self._by_subject.get(identity.subject)
        if found:
            yield found
        for group in identity.groups:
            found = self._by_group.get(group)
            if found:
                yield found


def is_plain_path(path: str) -> bool:
    """False when ``path`` has a ``.``/``..`` segment, literally or percent-encoded, or
    a backslash or encoded slash/backslash that an upstream might turn into one."""
    if "." not in path and "%" not in path and "\\" not in path:
        return True  # the common case, without allocating
    lowered = path.lower()
    if "\\" in lowered or "%2f" in lowered or "%5c" in lowered:
        return False
    lowered = lowered.replace("%2e", ".")
    return not any(segment in (".", "..") for segment in lowered.split("/"))
