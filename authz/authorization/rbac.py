"""RBAC: the policy's roles and bindings compiled once into an index.

A binding grants its role to *user* principals (JWT subjects and groups) and/or
*workload* principals (SPIFFE ID patterns matched against the mTLS peer). A binding
that names both kinds requires both: the request must carry a user identity whose
subject is listed or one of whose groups is listed, *and* come from a workload
matching one of the patterns. One that names one kind requires only that kind (an
extra identity of the other kind does not hurt).

Workload patterns (syntax checked by the loader, ``spiffe_pattern_problem``): an exact
SPIFFE ID; ``*`` as a whole path segment for exactly one segment; a trailing ``/*``
for one or more segments. The trust domain is compared literally, so a pattern of
another trust domain never matches. ``*`` never matches part of a segment.

Compilation turns every binding into grants (binding, role, permission):

- user-only bindings are indexed by subject and by group (as before workloads existed:
  a request without a workload identity looks at nothing else);
- user-and-workload bindings are indexed by subject and group too, in their own index,
  and a grant there counts only when the request's workload matches the binding;
- workload patterns of every binding are compiled once: exact IDs in a dict, the others
  as split segments. What one workload ID matches (which bindings, and the grants of
  workload-only bindings) is computed on first sight and cached per ID, so a repeat
  costs a dict lookup.

Default deny: no matching grant, no access. The first matching grant in policy order
(binding order, then permission order) is reported.

A permission matches a request when its method is listed (empty = any), its path
matches one pattern — exact (``/orders``), prefix (``/orders/*`` matches
``/orders/`` and below) or ``*`` (any path) — and its service is listed (empty =
any). Paths are compared as Envoy saw them, undecoded. A path with a dot segment
(``.``/``..``, also percent-encoded, or behind a backslash) never matches a prefix
pattern: an upstream that resolves it could land outside the prefix.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from authz.identity.base import Identities, Identity
from authz.request import AuthzRequest
from meshward.policy.model import Permission, Policy

SPIFFE_SCHEME = "spiffe://"


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


@dataclass(frozen=True, slots=True)
class _WorkloadPattern:
    """A SPIFFE ID pattern with a ``*``, split at ``/`` after ``spiffe://``.

    ``parts[0]`` is the trust domain (compared literally); ``*`` elsewhere matches one
    segment; with ``trailing`` the last ``*`` (not in ``parts``) matches one or more.
    """

    parts: tuple[str, ...]
    trailing: bool

    @classmethod
    def of(cls, pattern: str) -> _WorkloadPattern:
        parts = tuple(pattern[len(SPIFFE_SCHEME) :].split("/"))
        if len(parts) > 1 and parts[-1] == "*":
            return cls(parts[:-1], True)
        return cls(parts, False)

    def matches(self, parts: list[str]) -> bool:
        count = len(self.parts)
        if self.trailing:
            if len(parts) <= count:  # the trailing "*" needs at least one segment
                return False
        elif len(parts) != count:
            return False
        if parts[0] != self.parts[0]:
            return False
        for wanted, got in zip(self.parts[1:], parts[1:count], strict=True):
            if wanted not in ("*", got):
                return False
        return True


@dataclass(frozen=True, slots=True)
class _WorkloadMatch:
    """What one workload ID matches: bindings (by order), grants of workload-only ones."""

    bindings: frozenset[int]
    grants: tuple[_Grant, ...]


_NO_WORKLOAD_MATCH = _WorkloadMatch(frozenset(), ())


def workload_pattern_matches(pattern: str, spiffe_id: str) -> bool:
    """Whether a binding's workload ``pattern`` matches ``spiffe_id`` (uncompiled)."""
    if "*" not in pattern.split("/"):
        return pattern == spiffe_id
    if not spiffe_id.startswith(SPIFFE_SCHEME):
        return False
    return _WorkloadPattern.of(pattern).matches(spiffe_id[len(SPIFFE_SCHEME) :].split("/"))


class RbacIndex:
    """Compiled roles and bindings of one policy; immutable and thread-safe.

    (The per-workload-ID cache is filled lazily; reads take no lock, writers do.)
    """

    def __init__(self, policy: Policy, *, workload_cache_size: int = 1024) -> None:
        roles = {role.name: role for role in policy.roles}
        by_subject: dict[str, list[_Grant]] = {}
        by_group: dict[str, list[_Grant]] = {}
        both_by_subject: dict[str, list[_Grant]] = {}
        both_by_group: dict[str, list[_Grant]] = {}
        exact: dict[str, list[int]] = {}
        wildcards: dict[_WorkloadPattern, list[int]] = {}
        grants_of: dict[int, tuple[_Grant, ...]] = {}
        workload_only: set[int] = set()
        for order, binding in enumerate(policy.bindings):
            role = roles.get(binding.role)
            if role is None:
                continue  # the loader rejects this; an unknown role grants nothing
            grants = tuple(
                _Grant(order, RuleMatch(binding.name, role.name, i), _CompiledPermission.of(p))
                for i, p in enumerate(role.permissions)
            )
            grants_of[order] = grants
            users = bool(binding.subjects or binding.groups)
            subjects, groups = (both_by_subject, both_by_group) if binding.workloads else (
                by_subject, by_group
            )  # fmt: skip
            for subject in binding.subjects:
                subjects.setdefault(subject, []).extend(grants)
            for group in binding.groups:
                groups.setdefault(group, []).extend(grants)
            for pattern in binding.workloads:
                if not pattern.startswith(SPIFFE_SCHEME):
                    continue  # the loader rejects this; it can match nothing
                if "*" in pattern.split("/"):
                    wildcards.setdefault(_WorkloadPattern.of(pattern), []).append(order)
                else:
                    exact.setdefault(pattern, []).append(order)
            if binding.workloads and not users:
                workload_only.add(order)
        self._by_subject = _frozen(by_subject)
        self._by_group = _frozen(by_group)
        self._both_by_subject = _frozen(both_by_subject)
        self._both_by_group = _frozen(both_by_group)
        self._exact_workloads = {k: tuple(v) for k, v in exact.items()}
        self._wildcard_workloads = tuple((p, tuple(v)) for p, v in wildcards.items())
        self._grants_of = grants_of
        self._workload_only = frozenset(workload_only)
        self._workload_cache: dict[str, _WorkloadMatch] = {}
        self._workload_cache_size = workload_cache_size
        self._lock = threading.Lock()

    def authorize(self, identities: Identities, request: AuthzRequest) -> RuleMatch | None:
        """The first rule (in policy order) allowing ``request``, None to deny."""
        return self.match(identities, request.method, request.path, request.service)

    def match(
        self, identities: Identities, method: str, path: str, service: str
    ) -> RuleMatch | None:
        """:meth:`authorize` on the request's method, path and (routed-to) service."""
        plain = is_plain_path(path)
        best: _Grant | None = None
        user = identities.user
        if user is not None:  # user-only bindings: the common case, inlined
            for grants in _user_grants(user, self._by_subject, self._by_group):
                for grant in grants:
                    if best is not None and grant.order >= best.order:
                        break  # grants are in policy order: nothing better in this list
                    if grant.permission.matches(method, path, service, plain):
                        best = grant
                        break
        workload = identities.workload
        if workload is not None:
            query = (method, path, service, plain)
            matched = self.workload_match(workload.subject)
            if matched.grants:
                best = _first((matched.grants,), query, best)
            if user is not None and matched.bindings:
                lists = _user_grants(user, self._both_by_subject, self._both_by_group)
                best = _first(lists, query, best, matched.bindings)
        return best.match if best is not None else None

    def workload_match(self, spiffe_id: str) -> _WorkloadMatch:
        """The bindings whose workload patterns match ``spiffe_id`` (cached per ID)."""
        found = self._workload_cache.get(spiffe_id)
        if found is not None:
            return found
        orders = set(self._exact_workloads.get(spiffe_id, ()))
        if self._wildcard_workloads and spiffe_id.startswith(SPIFFE_SCHEME):
            parts = spiffe_id[len(SPIFFE_SCHEME) :].split("/")
            for pattern, pattern_orders in self._wildcard_workloads:
                if pattern.matches(parts):
                    orders.update(pattern_orders)
        if orders:
            grants = tuple(
                grant
                for order in sorted(orders & self._workload_only)
                for grant in self._grants_of[order]
            )
            found = _WorkloadMatch(frozenset(orders), grants)
        else:
            found = _NO_WORKLOAD_MATCH
        if len(self._workload_cache) < self._workload_cache_size:
            with self._lock:
                self._workload_cache[spiffe_id] = found
        return found


def _frozen(index: dict[str, list[_Grant]]) -> dict[str, tuple[_Grant, ...]]:
    return {k: tuple(v) for k, v in index.items()}


def _user_grants(
    user: Identity,
    by_subject: dict[str, tuple[_Grant, ...]],
    by_group: dict[str, tuple[_Grant, ...]],
) -> Iterable[tuple[_Grant, ...]]:
    found = by_subject.get(user.subject)
    if found:
        yield found
    for group in user.groups:
        found = by_group.get(group)
        if found:
            yield found


def _first(
    lists: Iterable[tuple[_Grant, ...]],
    query: tuple[str, str, str, bool],
    best: _Grant | None,
    bindings: frozenset[int] | None = None,
) -> _Grant | None:
    """The earliest (policy order) matching grant of ``lists`` and ``best``.

    ``query`` is (method, path, service, plain path?). Each list is in policy order.
    With ``bindings``, only grants of those bindings count.
    """
    method, path, service, plain = query
    for grants in lists:
        for grant in grants:
            if best is not None and grant.order >= best.order:
                break  # grants are in policy order: nothing better in this list
            if bindings is not None and grant.order not in bindings:
                continue
            if grant.permission.matches(method, path, service, plain):
                best = grant
                break
    return best


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
