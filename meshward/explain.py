"""``meshward explain``: one request, decided by the real decision code, explained.

The request is built as Envoy would send it: a real ``CheckRequest`` whose route
context (``meshward.route``/``service``/``gateway``) is the route the policy's
gateways would match, found by :func:`match_route`, a small mirror of the
translator's virtual hosts and routes. It is then parsed and decided exactly like
authz does (:meth:`AuthzRequest.from_check_request`, :func:`authz.decision.decide`
on :func:`authz.compiled.compile_policy`). The explanation (which rule allowed it,
or, for a deny, what each binding lacked) is computed afterwards from the policy
model and never changes the decision.

:mod:`meshward.policy_tests` runs test cases through the same functions.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from envoy.service.auth.v3 import external_auth_pb2

from authz import reasons
from authz.authorization.rbac import is_plain_path, workload_pattern_matches
from authz.compiled import CompiledPolicy, compile_policy
from authz.decision import Decision, decide
from authz.identity.base import AuthenticationError, Identity
from authz.request import AuthzRequest
from meshward import route_context
from meshward.demo_keys import DEMO_AUDIENCE, DEMO_ISSUER, DemoKey, ensure_demo_key
from meshward.policy.model import Binding, Permission, Policy, Route

#: Exit codes of ``meshward explain``.
EXIT_ALLOW = 0
EXIT_DENY = 1
EXIT_INPUT = 2


class InputError(Exception):
    """A mistake in the command line or a test case: one clear message, exit 2."""


@dataclass(frozen=True)
class RouteContext:
    """What the translator writes into a route's ``context_extensions``."""

    route: str
    service: str
    gateway: str


# --- route matching (mirrors xds_server.translator._route_configuration) -------------


def _route_hosts(route: Route) -> tuple[str, ...]:
    hosts = tuple(dict.fromkeys(h.lower() for h in route.match.hosts))
    return () if "*" in hosts else hosts


def _domain_matches(domain: str, host: str) -> bool:
    if domain.startswith("*"):
        return host.endswith(domain[1:]) and len(host) > len(domain) - 1
    return domain == host


def _route_matches(route: Route, method: str, path: str) -> bool:
    match = route.match
    if match.methods and method not in match.methods:
        return False
    if match.path is not None:
        return path == match.path
    return path.startswith(match.prefix if match.prefix is not None else "/")


def match_route(policy: Policy, method: str, path: str, host: str = "") -> RouteContext | None:
    """The route Envoy would pick for the request, ``None`` when none matches.

    Per gateway (in policy order), like the translator's route configuration: the
    virtual host is the one whose domain is the host exactly, else the longest
    ``*.suffix`` domain matching it, else ``*`` (routes without hosts); inside it the
    first route (gateway order) whose path (prefix or exact), and methods match. The
    host's port is ignored; path matching ignores the query string.
    """
    method = method.upper()
    path = _strip_query(path)
    host = host.lower()
    if host.startswith("["):  # [v6]:port
        host = host.split("]", 1)[0] + "]"
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    for gateway in policy.gateways:
        domains: list[str] = []
        for route in gateway.routes:
            for domain in _route_hosts(route):
                if domain not in domains:
                    domains.append(domain)
        chosen: str | None = None
        if host in domains:
            chosen = host
        else:
            wildcards = [d for d in domains if d.startswith("*") and _domain_matches(d, host)]
            if wildcards:
                chosen = max(wildcards, key=len)
        for route in gateway.routes:
            hosts = _route_hosts(route)
            in_vhost = (not hosts or chosen in hosts) if chosen is not None else not hosts
            if in_vhost and _route_matches(route, method, path):
                return RouteContext(route.name, route.service, gateway.name)
    return None


def route_by_name(policy: Policy, name: str) -> RouteContext | None:
    """The context of the route named ``name`` (gateway routes and sidecar routes)."""
    from xds_server.translator import inbound_route_name

    for gateway in policy.gateways:
        for route in gateway.routes:
            if route.name == name:
                return RouteContext(route.name, route.service, gateway.name)
    for service in policy.services:
        if service.sidecar is not None and inbound_route_name(service.name) == name:
            return RouteContext(name, service.name, policy.sidecar_group(service.name))
    return None


def _strip_query(path: str) -> str:
    for mark in ("?", "#"):
        cut = path.find(mark)
        if cut >= 0:
            path = path[:cut]
    return path


# --- the request ---------------------------------------------------------------------


def check_request(
    method: str,
    path: str,
    *,
    host: str = "",
    context: RouteContext | None = None,
    token: str = "",
    principal: str = "",
    policy_version: str = "",
) -> external_auth_pb2.CheckRequest:
    """A ``CheckRequest`` as Envoy's ext_authz filter sends it."""
    message = external_auth_pb2.CheckRequest()
    attributes = message.attributes
    http = attributes.request.http
    http.method = method.upper()
    http.path = path
    http.host = host
    http.protocol = "HTTP/1.1"
    if token:
        http.headers["authorization"] = f"Bearer {token}"
    attributes.source.principal = principal
    if context is not None:
        extensions = attributes.context_extensions
        extensions[route_context.ROUTE] = context.route
        extensions[route_context.SERVICE] = context.service
        extensions[route_context.GATEWAY] = context.gateway
        if policy_version:
            extensions[route_context.POLICY_VERSION] = policy_version
    return message


@dataclass(frozen=True)
class Outcome:
    """A decided request: what authz saw and what it decided."""

    request: AuthzRequest
    decision: Decision
    context: RouteContext | None


def run(
    policy: Policy,
    compiled: CompiledPolicy,
    *,
    method: str,
    path: str,
    host: str = "",
    route: str | None = None,
    token: str = "",
    principal: str = "",
    now: float | None = None,
) -> Outcome:
    """Build the request, find its route and decide it (the same code as authz)."""
    if not method.strip() or not method.isascii() or not method.isalpha():
        raise InputError(f"method '{method}' is not an HTTP method (for example GET)")
    if not path.startswith("/"):
        raise InputError(f"path '{path}' must start with '/'")
    if route:
        context = route_by_name(policy, route)
        if context is None:
            names = ", ".join(r.name for r in policy.routes()) or "none"
            raise InputError(f"no route named '{route}' in the policy (routes: {names})")
    else:
        context = match_route(policy, method, path, host)
    message = check_request(
        method, path, host=host, context=context, token=token, principal=principal
    )
    request = AuthzRequest.from_check_request(message)
    decision = decide(request, compiled, time.time() if now is None else now)
    return Outcome(request, decision, context)


# --- demo tokens -----------------------------------------------------------------------


def demo_issuer_trusted(policy: Policy) -> bool:
    return any(i.issuer == DEMO_ISSUER and DEMO_AUDIENCE in i.audiences for i in policy.issuers)


def demo_jwks_path(policy: Policy, policy_path: Path) -> Path:
    """Where the demo issuer's JWKS lives (its ``jwks_file``), else ``keys/demo-jwks.json``."""
    for issuer in policy.issuers:
        if issuer.issuer == DEMO_ISSUER and issuer.jwks_file:
            return Path(issuer.jwks_file)
    base = policy_path if policy_path.is_dir() else policy_path.parent
    return base / "keys" / "demo-jwks.json"


def demo_key_for(policy: Policy, policy_path: Path, state_dir: Path) -> DemoKey:
    """The local demo key, when the policy trusts the demo issuer (else InputError)."""
    if not demo_issuer_trusted(policy):
        raise InputError(
            f"the policy does not trust the demo issuer {DEMO_ISSUER} (audience "
            f"{DEMO_AUDIENCE}), so a subject/groups token cannot be minted locally; "
            "pass a real token instead (--token in explain, 'token:' in a test case)"
        )
    return ensure_demo_key(state_dir, demo_jwks_path(policy, policy_path))


def demo_key_is_current(policy: Policy, key: DemoKey) -> bool:
    """Whether the loaded policy already holds ``key`` (else the JWKS was just written)."""
    for issuer in policy.issuers:
        if issuer.issuer == DEMO_ISSUER:
            kids = {k.get("kid") for k in issuer.jwks.get("keys", []) if isinstance(k, dict)}
            if key.kid in kids:
                return True
    return False


# --- the explanation ---------------------------------------------------------------------


def _listing(values: Sequence[str]) -> str:
    return "[" + ", ".join(values) + "]"


def permission_problems(permission: Permission, method: str, path: str, service: str) -> list[str]:
    """What of ``permission`` does not match the request (empty: it matches)."""
    problems: list[str] = []
    methods = [m.upper() for m in permission.methods]
    if methods and method not in methods:
        problems.append(f"method not allowed ({method} not in {_listing(methods)})")
    plain = is_plain_path(path)
    path_ok = any(
        pattern in ("*", path)
        or (pattern.endswith("*") and plain and path.startswith(pattern[:-1]))
        for pattern in permission.paths
    )
    if not path_ok:
        note = "" if plain else "; a path with a dot segment never matches a prefix"
        problems.append(
            f"path does not match ({path} not in {_listing(list(permission.paths))}{note})"
        )
    if permission.services and service not in permission.services:
        shown = service or "(none)"
        problems.append(
            f"service not allowed ({shown} not in {_listing(list(permission.services))})"
        )
    return problems


def binding_problems(
    binding: Binding,
    policy: Policy,
    request: AuthzRequest,
    user: Identity | None,
    workload: Identity | None,
) -> list[str]:
    """What ``binding`` needs that the request does not have (empty: it grants)."""
    problems: list[str] = []
    if binding.subjects or binding.groups:
        if user is None:
            problems.append("no user token (the binding names users)")
        elif user.subject not in binding.subjects and not set(user.groups) & set(binding.groups):
            parts = []
            if binding.subjects:
                parts.append(f"subject not in subjects ({user.subject} not in "
                             f"{_listing(binding.subjects)})")  # fmt: skip
            if binding.groups:
                have = ", ".join(user.groups) if user.groups else "none"
                parts.append(
                    f"no group in groups {_listing(binding.groups)} (token groups: {have})"
                )
            problems.append(" and ".join(parts))
    if binding.workloads:
        if workload is None:
            problems.append(
                f"workload does not match (no workload identity; needs "
                f"{_listing(binding.workloads)})"
            )
        elif not any(workload_pattern_matches(p, workload.subject) for p in binding.workloads):
            problems.append(
                f"workload does not match ({workload.subject} not in {_listing(binding.workloads)})"
            )
    role = next((r for r in policy.roles if r.name == binding.role), None)
    if role is None:
        problems.append(f"role {binding.role} does not exist")
        return problems
    per_permission = [
        permission_problems(p, request.method, request.path, request.service)
        for p in role.permissions
    ]
    if per_permission and all(per_permission):
        fewest = min(per_permission, key=len)
        if len(per_permission) > 1:
            problems.append("no permission matches; closest: " + "; ".join(fewest))
        else:
            problems.extend(fewest)
    return problems


def identities(
    compiled: CompiledPolicy, request: AuthzRequest, now: float
) -> tuple[Identity | None, Identity | None]:
    """(workload, user) as the identity phase sees them; errors → None (for display)."""
    workload = user = None
    for method in compiled.workload_methods:
        try:
            workload = method.authenticate(request, now)
        except AuthenticationError:
            break
        if workload is not None:
            break
    for method in compiled.user_methods:
        try:
            user = method.authenticate(request, now)
        except AuthenticationError:
            break
        if user is not None:
            break
    return workload, user


def explain_lines(
    policy: Policy, compiled: CompiledPolicy, outcome: Outcome, now: float | None = None
) -> list[str]:
    """The human-readable explanation of ``outcome``."""
    decision, request = outcome.decision, outcome.request
    verdict = "ALLOW" if decision.allowed else "DENY"
    lines = [f"decision: {verdict} {decision.http_status} {decision.reason}"]
    context = outcome.context
    if context is None:
        lines.append(
            f"route: none (no route of the policy matches {request.method} "
            f"{request.host or '*'}{request.path})"
        )
    else:
        lines.append(
            f"route: {context.route} (service {context.service}, gateway {context.gateway})"
        )
    if decision.reason == reasons.NO_ROUTE:
        lines.append("rule: none (a request that matches no route is denied before identity)")
        return lines
    workload, user = identities(compiled, request, time.time() if now is None else now)
    user_text = "none"
    if user is not None:
        groups = ", ".join(user.groups) if user.groups else "no groups"
        user_text = f"{user.subject} ({groups}) via {user.method}"
    lines.append(f"identity: user {user_text}; workload {workload.subject if workload else 'none'}")
    if decision.allowed:
        granted = decision.matched_rule.split("/", 1)[0]
        lines.append(f"rule: {decision.matched_rule} (binding {granted} granted it)")
        return lines
    if decision.reason in reasons.INVALID_CREDENTIAL:
        lines.append(f"rule: none (the token was rejected: {decision.reason}; RBAC not reached)")
        return lines
    if decision.reason == reasons.UNTRUSTED_WORKLOAD:
        problem = ""
        for method in compiled.workload_methods:
            try:
                method.authenticate(request, 0)
            except AuthenticationError as error:
                problem = error.description
        lines.append(f"rule: none (untrusted workload: {problem}; RBAC not reached)")
        return lines
    lines.append("rule: none (default deny: no binding grants this request)")
    if decision.reason == reasons.MISSING_TOKEN:
        lines.append("  no user token was sent; a binding naming users needs one")
    for binding in policy.bindings:
        problems = binding_problems(binding, policy, request, user, workload)
        if problems:
            lines.append(f"  binding {binding.name} ({binding.role}): " + "; ".join(problems))
    return lines


# --- the command ---------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "explain",
        help="decide one request with the policy and explain why (exit 0 allow, 1 deny)",
    )
    parser.add_argument("--policy", type=Path, default=Path("policies"), help="policy dir or file")
    parser.add_argument("--method", default="GET", help="HTTP method (default: GET)")
    parser.add_argument("--path", required=True, help="request path, e.g. /orders/1")
    parser.add_argument("--host", default="", help="Host header (default: none)")
    parser.add_argument("--route", default=None, help="use this route instead of matching one")
    parser.add_argument("--token", default=None, help="a bearer token (JWT)")
    parser.add_argument("--sub", default=None, help="mint a demo token for this subject")
    parser.add_argument("--groups", default="", help="comma-separated groups for --sub")
    parser.add_argument("--spiffe", default="", help="the mTLS peer's SPIFFE ID")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".meshward"),
        help="where the demo private key lives (default: .meshward)",
    )
    parser.set_defaults(func=cmd_explain)


def load(path: Path) -> Policy:
    """Load the policy, or InputError with every ``file:line`` issue."""
    from meshward.policy.errors import PolicyError
    from meshward.policy.loader import load_policy

    try:
        return load_policy(path)
    except PolicyError as exc:
        raise InputError(
            "\n".join(str(i) for i in exc.issues) + f"\n{path}: the policy was not accepted"
        ) from None


def minted(policy: Policy, path: Path, state_dir: Path, subject: str, groups: list[str]) -> tuple[
    Policy, str
]:  # fmt: skip
    """A demo token for ``subject``/``groups``, and the policy (reloaded if the key is new)."""
    key = demo_key_for(policy, path, state_dir)
    if not demo_key_is_current(policy, key):
        policy = load(path)
    return policy, key.mint(subject, groups)


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        policy = load(args.policy)
        token = args.token or ""
        if args.groups and args.sub is None:
            raise InputError("--groups needs --sub (the subject of the demo token)")
        if args.sub is not None:
            if args.token:
                raise InputError("pass either --token or --sub/--groups, not both")
            groups = [g.strip() for g in args.groups.split(",") if g.strip()]
            policy, token = minted(policy, args.policy, args.state_dir, args.sub, groups)
        compiled = compile_policy(policy)
        outcome = run(
            policy,
            compiled,
            method=args.method,
            path=args.path,
            host=args.host,
            route=args.route,
            token=token,
            principal=args.spiffe,
        )
    except InputError as exc:
        print(f"meshward explain: {exc}", file=sys.stderr)
        return EXIT_INPUT
    for line in explain_lines(policy, compiled, outcome):
        print(line)
    return EXIT_ALLOW if outcome.decision.allowed else EXIT_DENY
