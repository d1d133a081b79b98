"""RBAC: the policy's roles and bindings compiled once into rule indexes.

A *rule* is one binding with its role's permissions. It applies to a request when

1. its **principals** match: user principals are subjects (``*``: any user identity)
   and groups of the JWT/API-key identity; workload principals are SPIFFE ID patterns
   matched against the mTLS peer. A rule naming both kinds needs both; one naming one
   kind needs that kind (an extra identity of the other kind does not hurt); a deny
   rule naming none applies to every request;
2. its **conditions** hold: the client IP is in ``source_ips`` (if any) and in none of
   ``not_source_ips``; every claim condition holds for the user's verified token (no
   token claims, no match);
3. one of its role's **permissions** matches: method, path pattern, host, port,
   required headers and service, each empty = any (see
   :mod:`meshward.policy.matching` for pattern meaning).

What authz cannot see fails closed both ways: an unknown client address (or one that
does not parse), an unknown listener port or host, and a path with dot segments make
an allow's limit on them fail and a deny's limit on them hold — so a deny "from
outside" or "on /admin/*" applies, and an allow "from inside" does not.

Rules are grouped by ``(effect, mode)``: enforced denies, enforced allows, audited
denies, audited allows. :meth:`RbacIndex.evaluate` finds the first applying rule (in
policy order) of each group; :mod:`authz.decision` lets an enforced deny win over any
allow, and reports audited rules without enforcing them.

Indexing (per group), so a policy of hundreds of bindings costs a few dict lookups:
user-only rules by subject and by group, plus the ``*`` rules; user-and-workload rules
the same way in their own index, counted only when the request's workload matches the
rule; workload patterns compiled once (exact IDs in a dict, others as split segments)
with what one SPIFFE ID matches cached per ID. Within each candidate list rules are in
policy order, so a scan stops at the first rule later than the best found.

Workload patterns: an exact SPIFFE ID; ``*`` as a whole path segment for exactly one
segment; a trailing ``/*`` for one or more. The trust domain is compared literally.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from authz.identity.base import Identities, Identity
from authz.request import AuthzRequest
from meshward.policy.matching import (
    CidrSet,
    HostSet,
    PathSet,
    claim_at,
    claim_matches,
    header_value_matches,
    is_plain_path,
    request_host,
)
from meshward.policy.model import Binding, Permission, Policy

__all__ = [
    "Evaluation",
    "RbacIndex",
    "RuleMatch",
    "is_plain_path",
    "workload_pattern_matches",
]

SPIFFE_SCHEME = "spiffe://"


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """Which rule applied: the binding, its role, the permission's index, its effect."""

    binding: str
    role: str
    permission: int
    effect: str = "allow"
    mode: str = "enforce"

    def __str__(self) -> str:
        return f"{self.binding}/{self.role}#{self.permission}"


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The first applying rule of each group (None: none applies)."""

    deny: RuleMatch | None = None
    allow: RuleMatch | None = None
    audit_deny: RuleMatch | None = None
    audit_allow: RuleMatch | None = None


@dataclass(frozen=True, slots=True)
class _Query:
    """The request as rules see it, computed once per evaluation."""

    method: str
    path: str
    plain: bool
    host: str
    port: int
    service: str
    headers: Mapping[str, str]
    source_ip: str
    #: The path's first segment, for :attr:`_Rule.path_heads`; None when the path is
    #: not plain (a deny's wildcard matches it whatever its head) or not absolute.
    head: str | None

    @classmethod
    def of(cls, request: AuthzRequest) -> _Query:
        path = request.path
        plain = is_plain_path(path)
        return cls(
            request.method,
            path,
            plain,
            request_host(request.host) if request.host else "",
            request.destination_port,
            request.service,
            request.headers,
            request.source_ip,
            path[1:].partition("/")[0] if plain and path.startswith("/") else None,
        )


@dataclass(frozen=True, slots=True)
class _CompiledPermission:
    methods: frozenset[str]
    paths: PathSet
    services: frozenset[str]
    hosts: HostSet
    ports: frozenset[int]
    headers: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, permission: Permission) -> _CompiledPermission:
        return cls(
            methods=frozenset(m.upper() for m in permission.methods),
            paths=PathSet(permission.paths),
            services=frozenset(permission.services),
            hosts=HostSet(permission.hosts),
            ports=frozenset(permission.ports),
            headers=tuple((h.name, h.value) for h in permission.headers),
        )

    def matches(self, q: _Query, deny: bool) -> bool:
        """Whether ``q`` matches. An unknown port or host (0, empty) or a path that is
        not plain fails an allow's limit on it and meets a deny's (``deny``): both ways
        the request is not let through on something authz could not see."""
        if self.methods and q.method not in self.methods:
            return False
        if self.services and q.service not in self.services:
            return False
        if self.ports and (q.port not in self.ports if q.port else not deny):
            return False
        if not self.hosts.any and (not self.hosts.matches(q.host) if q.host else not deny):
            return False
        if not self.paths.matches(q.path, q.plain, unplain_matches=deny):
            return False
        headers = q.headers
        return all(header_value_matches(want, headers.get(name)) for name, want in self.headers)

    def problems(self, q: _Query, permission: Permission) -> list[str]:
        """What of this permission does not match ``q`` (empty: it matches)."""
        out: list[str] = []
        if self.methods and q.method not in self.methods:
            out.append(f"method not allowed ({q.method} not in {_listing(permission.methods)})")
        if not self.paths.matches(q.path, q.plain):
            note = "" if q.plain else "; a path with a dot segment matches only '*' or exactly"
            out.append(f"path does not match ({q.path} not in {_listing(permission.paths)}{note})")
        if not self.hosts.any and not self.hosts.matches(q.host):
            out.append(
                f"host not allowed ({q.host or '(none)'} not in {_listing(permission.hosts)})"
            )
        if self.ports and q.port not in self.ports:
            ports = [str(p) for p in permission.ports]
            out.append(f"port not allowed ({q.port or '(unknown)'} not in {_listing(ports)})")
        for name, want in self.headers:
            got = q.headers.get(name)
            if not header_value_matches(want, got):
                shown = "missing" if got is None else "has another value"
                out.append(f"header {name} {shown} (needs {want})")
        if self.services and q.service not in self.services:
            out.append(
                f"service not allowed ({q.service or '(none)'} not in "
                f"{_listing(permission.services)})"
            )
        return out


@dataclass(frozen=True, slots=True)
class _Rule:
    """One binding, compiled."""

    order: int  # the binding's position in the policy: the first in policy order wins
    binding: Binding
    #: ``effect: deny``: unknown facts (client address, port, host, a path that is not
    #: plain) make it apply rather than not (fail closed).
    deny: bool
    permissions: tuple[_CompiledPermission, ...]
    source_ips: CidrSet | None
    not_source_ips: CidrSet | None
    claims: tuple[tuple[str, frozenset[str]], ...]
    matches: tuple[RuleMatch, ...] = field(default=())
    #: First path segments every path the rule's permissions match starts with (None:
    #: some pattern matches paths of any first segment): a cheap reject before
    #: :meth:`applies` (see :func:`_path_heads`).
    path_heads: frozenset[str] | None = None

    def applies(self, q: _Query, user: Identity | None) -> RuleMatch | None:
        """The matching permission's :class:`RuleMatch` if conditions hold, else None."""
        if self.source_ips is not None:
            inside = self.source_ips.contains(q.source_ip)
            if not inside if inside is not None else not self.deny:
                return None
        if self.not_source_ips is not None:
            inside = self.not_source_ips.contains(q.source_ip)
            if inside if inside is not None else not self.deny:
                return None
        if self.claims and not _claims_hold(self.claims, user):
            return None
        deny = self.deny
        for i, permission in enumerate(self.permissions):
            if permission.matches(q, deny):
                return self.matches[i]
        return None


def _path_heads(patterns: Iterable[tuple[str, ...]]) -> frozenset[str] | None:
    """The first segments of every plain path that one of the permissions' ``patterns``
    can match, or None when one can match any first segment.

    Exact ``/a/b`` and templates ``/a/{*}`` fix the head (``a``); a prefix does when
    its literal part ends the head with ``/`` (``/a/*``, not ``/a*``); ``*``, suffix
    patterns and a template or prefix starting at the first segment do not.
    """
    heads: set[str] = set()
    for paths in patterns:
        for pattern in paths:
            if not pattern.startswith("/"):
                return None  # "*" and "*suffix"
            literal = pattern[:-1] if pattern.endswith("*") and "{" not in pattern else pattern
            head, slash, _ = literal[1:].partition("/")
            if "{" in head or (literal is not pattern and not slash):
                return None  # "/{**}", "/{*}/x", "/*", "/a*"
            heads.add(head)
    return frozenset(heads)


def _claims_hold(conditions: tuple[tuple[str, frozenset[str]], ...], user: Identity | None) -> bool:
    claims = user.claims if user is not None else None
    if claims is None:
        return False
    return all(claim_matches(claim_at(claims, path), wanted) for path, wanted in conditions)


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


def workload_pattern_matches(pattern: str, spiffe_id: str) -> bool:
    """Whether a binding's workload ``pattern`` matches ``spiffe_id`` (uncompiled)."""
    if "*" not in pattern.split("/"):
        return pattern == spiffe_id
    if not spiffe_id.startswith(SPIFFE_SCHEME):
        return False
    return _WorkloadPattern.of(pattern).matches(spiffe_id[len(SPIFFE_SCHEME) :].split("/"))


@dataclass(frozen=True, slots=True)
class _WorkloadMatch:
    """What one workload ID matches: rule orders, and the workload-only rules."""

    orders: frozenset[int]
    rules: tuple[_Rule, ...]


_NO_WORKLOAD_MATCH = _WorkloadMatch(frozenset(), ())
_Index = dict[str, tuple[_Rule, ...]]


class _RuleGroup:
    """The rules of one ``(effect, mode)``, indexed by principal (see module docstring)."""

    def __init__(self, rules: list[_Rule], workload_cache_size: int) -> None:
        by_subject: dict[str, list[_Rule]] = {}
        by_group: dict[str, list[_Rule]] = {}
        both_by_subject: dict[str, list[_Rule]] = {}
        both_by_group: dict[str, list[_Rule]] = {}
        any_user: list[_Rule] = []
        both_any_user: list[_Rule] = []
        everyone: list[_Rule] = []
        exact: dict[str, list[int]] = {}
        wildcards: dict[_WorkloadPattern, list[int]] = {}
        workload_only: dict[int, _Rule] = {}
        for rule in rules:
            b = rule.binding
            users = bool(b.subjects or b.groups)
            if b.workloads:
                subjects, groups, star = both_by_subject, both_by_group, both_any_user
            else:
                subjects, groups, star = by_subject, by_group, any_user
            for subject in b.subjects:
                if subject == "*":
                    star.append(rule)
                else:
                    subjects.setdefault(subject, []).append(rule)
            for group in b.groups:
                groups.setdefault(group, []).append(rule)
            for pattern in b.workloads:
                if not pattern.startswith(SPIFFE_SCHEME):
                    continue  # the loader rejects this; it can match nothing
                if "*" in pattern.split("/"):
                    wildcards.setdefault(_WorkloadPattern.of(pattern), []).append(rule.order)
                else:
                    exact.setdefault(pattern, []).append(rule.order)
            if b.workloads and not users:
                workload_only[rule.order] = rule
            if not users and not b.workloads and b.effect == "deny":
                # Only a deny naming nobody applies to everyone; an allow naming nobody
                # (which the loader rejects) grants nobody.
                everyone.append(rule)
        self.empty = not rules
        self._by_subject = _frozen(by_subject)
        self._by_group = _frozen(by_group)
        self._any_user = tuple(any_user)
        self._both_by_subject = _frozen(both_by_subject)
        self._both_by_group = _frozen(both_by_group)
        self._both_any_user = tuple(both_any_user)
        self._everyone = tuple(everyone)
        self._exact_workloads = {k: tuple(dict.fromkeys(v)) for k, v in exact.items()}
        self._wildcard_workloads = tuple((p, tuple(v)) for p, v in wildcards.items())
        self._workload_only = workload_only
        self._workload_cache: dict[str, _WorkloadMatch] = {}
        self._workload_cache_size = workload_cache_size
        self._lock = threading.Lock()

    def first(self, q: _Query, identities: Identities) -> RuleMatch | None:
        """The first applying rule, in policy order."""
        best: tuple[int, RuleMatch] | None = None
        user = identities.user
        if user is not None:
            for rules in _user_rules(user, self._by_subject, self._by_group, self._any_user):
                best = _scan(rules, q, user, best)
        workload = identities.workload
        if workload is not None:
            matched = self.workload_match(workload.subject)
            if matched.rules:
                best = _scan(matched.rules, q, user, best)
            if user is not None and matched.orders:
                lists = _user_rules(
                    user, self._both_by_subject, self._both_by_group, self._both_any_user
                )
                for rules in lists:
                    best = _scan(rules, q, user, best, matched.orders)
        if self._everyone:
            best = _scan(self._everyone, q, user, best)
        return best[1] if best is not None else None

    def workload_match(self, spiffe_id: str) -> _WorkloadMatch:
        """The rules whose workload patterns match ``spiffe_id`` (cached per ID)."""
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
            rules = tuple(
                self._workload_only[o] for o in sorted(orders) if o in self._workload_only
            )
            found = _WorkloadMatch(frozenset(orders), rules)
        else:
            found = _NO_WORKLOAD_MATCH
        if len(self._workload_cache) < self._workload_cache_size:
            with self._lock:
                self._workload_cache[spiffe_id] = found
        return found


class RbacIndex:
    """Compiled rules of one policy; immutable and thread-safe.

    (Per-workload-ID caches are filled lazily; reads take no lock, writers do.)
    """

    def __init__(self, policy: Policy, *, workload_cache_size: int = 1024) -> None:
        roles = {role.name: role for role in policy.roles}
        groups: dict[tuple[str, str], list[_Rule]] = {
            ("deny", "enforce"): [],
            ("allow", "enforce"): [],
            ("deny", "audit"): [],
            ("allow", "audit"): [],
        }
        self._policy = policy
        self._rules: dict[str, _Rule] = {}
        for order, binding in enumerate(policy.bindings):
            role = roles.get(binding.role)
            if role is None:
                continue  # the loader rejects this; an unknown role grants nothing
            rule = _Rule(
                order=order,
                binding=binding,
                deny=binding.effect == "deny",
                permissions=tuple(_CompiledPermission.of(p) for p in role.permissions),
                source_ips=CidrSet(binding.source_ips) if binding.source_ips else None,
                not_source_ips=CidrSet(binding.not_source_ips) if binding.not_source_ips else None,
                claims=tuple((c.path, frozenset(c.values)) for c in binding.claims),
                matches=tuple(
                    RuleMatch(binding.name, role.name, i, binding.effect, binding.mode)
                    for i in range(len(role.permissions))
                ),
                path_heads=_path_heads(p.paths for p in role.permissions),
            )
            groups[(binding.effect, binding.mode)].append(rule)
            self._rules[binding.name] = rule
        self._deny = _RuleGroup(groups[("deny", "enforce")], workload_cache_size)
        self._allow = _RuleGroup(groups[("allow", "enforce")], workload_cache_size)
        self._audit_deny = _RuleGroup(groups[("deny", "audit")], workload_cache_size)
        self._audit_allow = _RuleGroup(groups[("allow", "audit")], workload_cache_size)
        self.has_audit = not (self._audit_deny.empty and self._audit_allow.empty)

    def evaluate(self, identities: Identities, request: AuthzRequest) -> Evaluation:
        """The first applying rule of each group for ``request``.

        ``allow`` is only looked for when no enforced deny applies (it would not count).
        """
        q = _Query.of(request)
        deny = self._deny.first(q, identities) if not self._deny.empty else None
        allow = self._allow.first(q, identities) if deny is None else None
        if not self.has_audit:
            return Evaluation(deny, allow)
        return Evaluation(
            deny,
            allow,
            self._audit_deny.first(q, identities) if not self._audit_deny.empty else None,
            self._audit_allow.first(q, identities) if not self._audit_allow.empty else None,
        )

    def authorize(self, identities: Identities, request: AuthzRequest) -> RuleMatch | None:
        """The enforced allow rule granting ``request``, None when denied (by a deny
        rule or by default)."""
        return self.evaluate(identities, request).allow

    def match(
        self, identities: Identities, method: str, path: str, service: str
    ) -> RuleMatch | None:
        """:meth:`authorize` for a request of only a method, path and service."""
        return self.authorize(identities, AuthzRequest.of(method, path, service=service))

    def workload_match(self, spiffe_id: str) -> _WorkloadMatch:
        """What ``spiffe_id`` matches among the enforced allow rules (cached per ID)."""
        return self._allow.workload_match(spiffe_id)

    def rule_problems(
        self, binding: str, identities: Identities, request: AuthzRequest
    ) -> list[str]:
        """Why ``binding`` does not apply to ``request`` (empty: it applies).

        For explanations: each failed principal, condition and, when every permission
        fails, the closest permission's failed aspects.
        """
        rule = self._rules.get(binding)
        if rule is None:
            return [f"binding {binding} does not exist"]
        b = rule.binding
        q = _Query.of(request)
        user, workload = identities.user, identities.workload
        problems: list[str] = []
        if b.subjects or b.groups:
            problems.extend(_user_problems(b, user))
        if b.workloads:
            if workload is None:
                problems.append(
                    f"workload does not match (no workload identity; needs {_listing(b.workloads)})"
                )
            elif not any(workload_pattern_matches(p, workload.subject) for p in b.workloads):
                problems.append(
                    f"workload does not match ({workload.subject} not in {_listing(b.workloads)})"
                )
        if rule.source_ips is not None and not rule.source_ips.contains(q.source_ip):
            problems.append(
                f"source IP not allowed ({q.source_ip or '(unknown)'} not in "
                f"{_listing(b.source_ips)})"
            )
        if rule.not_source_ips is not None:
            inside = rule.not_source_ips.contains(q.source_ip)
            if inside is None:
                problems.append("source IP unknown (not_source_ips needs a known address)")
            elif inside:
                problems.append(
                    f"source IP excluded ({q.source_ip} in not_source_ips "
                    f"{_listing(b.not_source_ips)})"
                )
        for condition in b.claims:
            claims = user.claims if user is not None else None
            if claims is None:
                problems.append(f"claim {condition.path}: no token claims (needs a JWT)")
            elif not claim_matches(claim_at(claims, condition.path), frozenset(condition.values)):
                problems.append(
                    f"claim {condition.path} does not match (needs one of "
                    f"{_listing(condition.values)})"
                )
        role = self._policy.role(b.role)
        per_permission = [
            cp.problems(q, p) for cp, p in zip(rule.permissions, role.permissions, strict=True)
        ]
        if per_permission and all(per_permission):
            fewest = min(per_permission, key=len)
            if len(per_permission) > 1:
                problems.append("no permission matches; closest: " + "; ".join(fewest))
            else:
                problems.extend(fewest)
        return problems


def _user_problems(b: Binding, user: Identity | None) -> list[str]:
    if user is None:
        return ["no user identity (the binding names users)"]
    if "*" in b.subjects or user.subject in b.subjects or set(user.groups) & set(b.groups):
        return []
    parts = []
    if b.subjects:
        parts.append(f"subject not in subjects ({user.subject} not in {_listing(b.subjects)})")
    if b.groups:
        have = ", ".join(user.groups) if user.groups else "none"
        parts.append(f"no group in groups {_listing(b.groups)} (identity groups: {have})")
    return [" and ".join(parts)]


def _listing(values: Iterable[str]) -> str:
    return "[" + ", ".join(values) + "]"


def _frozen(index: dict[str, list[_Rule]]) -> _Index:
    return {k: tuple(dict.fromkeys(v)) for k, v in index.items()}


def _user_rules(
    user: Identity, by_subject: _Index, by_group: _Index, any_user: tuple[_Rule, ...]
) -> Iterable[tuple[_Rule, ...]]:
    found = by_subject.get(user.subject)
    if found:
        yield found
    for group in user.groups:
        found = by_group.get(group)
        if found:
            yield found
    if any_user:
        yield any_user


def _scan(
    rules: tuple[_Rule, ...],
    q: _Query,
    user: Identity | None,
    best: tuple[int, RuleMatch] | None,
    orders: frozenset[int] | None = None,
) -> tuple[int, RuleMatch] | None:
    """The earlier (policy order) of ``best`` and the first applying rule of ``rules``.

    ``rules`` is in policy order; with ``orders``, only rules of those orders count.
    """
    for rule in rules:
        if best is not None and rule.order >= best[0]:
            break  # in policy order: nothing better in this list
        if orders is not None and rule.order not in orders:
            continue
        heads = rule.path_heads
        if heads is not None and q.head is not None and q.head not in heads:
            continue  # no permission of the rule matches a path under this head
        found = rule.applies(q, user)
        if found is not None:
            return rule.order, found
    return best
