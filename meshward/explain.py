"""``meshward explain``: one request, decided by the real decision code, explained.

The request is built as Envoy would send it: a real ``CheckRequest`` whose route
context (``meshward.route``/``service``/``gateway``) is the route the policy's
gateways would match, found by :func:`match_route`, a small mirror of the
translator's virtual hosts and routes. It is then parsed and decided exactly like
authz does (:meth:`AuthzRequest.from_check_request`, :func:`authz.decision.decide`
on :func:`authz.compiled.compile_policy`). The explanation (which rule allowed or denied
it, or, for a default deny, what each allow binding lacked — from the RBAC index's own
:meth:`~authz.authorization.rbac.RbacIndex.rule_problems`, so it cannot disagree with
the decision) is computed afterwards and never changes the decision.

:mod:`meshward.policy_tests` runs test cases through the same functions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from envoy.service.auth.v3 import external_auth_pb2

from authz import reasons
from authz.compiled import CompiledPolicy, compile_policy
from authz.decision import Decision, decide
from authz.identity.base import AuthenticationError, Identities, Identity
from authz.identity.jwks_remote import JwksConfigError, JwksFetchError, JwksRegistry
from authz.request import AuthzRequest
from meshward import route_context
from meshward.demo_keys import DEMO_AUDIENCE, DEMO_ISSUER, DemoKey, ensure_demo_key
from meshward.policy.matching import address_problem
from meshward.policy.model import Policy, Route

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


@dataclass(frozen=True)
class Client:
    """What a request carries besides method and path: credentials, headers, where
    it comes from (``source_ip`` empty: unknown) and the listener port it arrived on
    (0: the route's gateway port, or unknown without a route)."""

    token: str = ""
    api_key: str = ""
    principal: str = ""
    source_ip: str = ""
    port: int = 0
    headers: tuple[tuple[str, str], ...] = ()


def check_request(
    method: str,
    path: str,
    *,
    host: str = "",
    context: RouteContext | None = None,
    client: Client = Client(),
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
    for name, value in client.headers:
        http.headers[name.lower()] = value
    if client.token:
        http.headers["authorization"] = f"Bearer {client.token}"
    if client.api_key:
        http.headers["x-api-key"] = client.api_key
    attributes.source.principal = client.principal
    if client.source_ip:
        attributes.source.address.socket_address.address = client.source_ip
    if client.port:
        attributes.destination.address.socket_address.port_value = client.port
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
    client: Client = Client(),
    now: float | None = None,
) -> Outcome:
    """Build the request, find its route and decide it (the same code as authz)."""
    if not method.strip() or not method.isascii() or not method.isalpha():
        raise InputError(f"method '{method}' is not an HTTP method (for example GET)")
    if not path.startswith("/"):
        raise InputError(f"path '{path}' must start with '/'")
    problem = address_problem(client.source_ip) if client.source_ip else None
    if problem is not None:
        raise InputError(f"source IP '{client.source_ip}' {problem}")
    if route:
        context = route_by_name(policy, route)
        if context is None:
            names = ", ".join(r.name for r in policy.routes()) or "none"
            raise InputError(f"no route named '{route}' in the policy (routes: {names})")
    else:
        context = match_route(policy, method, path, host)
    if context is not None and not client.port:
        client = replace(client, port=_listener_port(policy, context))
    message = check_request(method, path, host=host, context=context, client=client)
    request = AuthzRequest.from_check_request(message)
    decision = decide(request, compiled, time.time() if now is None else now)
    return Outcome(request, decision, context)


def _listener_port(policy: Policy, context: RouteContext) -> int:
    """The port of the listener serving ``context``'s route (gateway or sidecar)."""
    for gateway in policy.gateways:
        if gateway.name == context.gateway:
            return gateway.port
    for service in policy.services:
        if service.sidecar is not None and policy.sidecar_group(service.name) == context.gateway:
            return service.sidecar.port
    return 0


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
    lines.extend(_rule_lines(policy, compiled, outcome, Identities(workload, user)))
    for entry in decision.audit:
        effect, rule = entry.split(":", 1)
        lines.append(f"audit: {rule} ({effect} rule in mode: audit applies; not enforced)")
    if decision.audit_outcome:
        lines.append(
            f"audit outcome: {decision.audit_outcome} (if the audited rules were enforced)"
        )
    return lines


def _rule_lines(
    policy: Policy, compiled: CompiledPolicy, outcome: Outcome, seen: Identities
) -> list[str]:
    """The ``rule:`` line and, for a default deny, why each allow binding does not apply."""
    decision, request = outcome.decision, outcome.request
    binding = decision.matched_rule.split("/", 1)[0]
    if decision.allowed:
        return [f"rule: {decision.matched_rule} (binding {binding} granted it)"]
    if decision.reason == reasons.DENIED_BY_RULE:
        return [
            f"rule: {decision.matched_rule} (deny binding {binding} applies; deny rules are "
            "evaluated before any allow)"
        ]
    if decision.reason == reasons.INSUFFICIENT_USER_AUTHENTICATION:
        problem = decision.www_authenticate.partition('error_description="')[2].split('"')[0]
        return [
            f"rule: {decision.matched_rule} (binding {binding} allows it, but the route "
            f"demands step-up authentication: {problem})"
        ]
    if decision.reason in reasons.INVALID_CREDENTIAL or decision.reason in (
        reasons.INVALID_API_KEY,
        reasons.AMBIGUOUS_CREDENTIALS,
    ):
        return [f"rule: none (the credential was rejected: {decision.reason}; RBAC not reached)"]
    if decision.reason == reasons.UNTRUSTED_WORKLOAD:
        problem = ""
        for method in compiled.workload_methods:
            try:
                method.authenticate(request, 0)
            except AuthenticationError as error:
                problem = error.description
        return [f"rule: none (untrusted workload: {problem}; RBAC not reached)"]
    lines = ["rule: none (default deny: no binding grants this request)"]
    if decision.reason == reasons.MISSING_TOKEN:
        lines.append("  no user credential was sent; a binding naming users needs one")
    for b in policy.bindings:
        if b.effect != "allow" or b.mode != "enforce":
            continue
        problems = compiled.rbac.rule_problems(b.name, seen, request)
        if problems:
            lines.append(f"  binding {b.name} ({b.role}): " + "; ".join(problems))
        elif decision.reason == reasons.MISSING_TOKEN:
            lines.append(f"  binding {b.name} ({b.role}): the route demands a user token (mfa)")
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
    parser.add_argument("--api-key", default="", help="an API key (sent as x-api-key)")
    parser.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="an extra claim for the --sub demo token, e.g. amr='[\"mfa\"]' or acr=high "
        "(repeatable; a value that is not JSON is a string)",
    )
    parser.add_argument(
        "--source-ip", default="", help="the client address (default: unknown, which fails "
        "source_ips conditions closed)"
    )  # fmt: skip
    parser.add_argument(
        "--port", type=int, default=0, help="the listener port (default: the route's)"
    )
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="a request header (repeatable)",
    )
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


def compile_with_keys(policy: Policy, jwks: JwksRegistry | None = None) -> CompiledPolicy:
    """:func:`compile_policy`, with the keys of ``jwks_uri`` issuers fetched first, once
    and synchronously (a CLI decides once: no background refresh). ``jwks`` is reused
    across calls when given. InputError naming the issuer, URL and fix if a fetch fails.
    """
    if not any(issuer.jwks_uri for issuer in policy.issuers):
        return compile_policy(policy)
    registry = jwks if jwks is not None else JwksRegistry(background=False)
    try:
        registry.fetch_once(policy.issuers)
        return compile_policy(policy, jwks=registry)
    except (JwksFetchError, JwksConfigError) as exc:
        raise InputError(str(exc)) from None


def minted(
    policy: Policy,
    path: Path,
    state_dir: Path,
    subject: str,
    groups: list[str],
    *,
    claims: dict[str, object] | None = None,
) -> tuple[Policy, str]:
    """A demo token for ``subject``/``groups`` (plus ``claims``), and the policy
    (reloaded if the key is new)."""
    key = demo_key_for(policy, path, state_dir)
    if not demo_key_is_current(policy, key):
        policy = load(path)
    return policy, key.mint(subject, groups, extra=claims)


def parse_claims(values: list[str]) -> dict[str, object]:
    """``NAME=JSON`` pairs (a value that is not JSON is a string)."""
    out: dict[str, object] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise InputError(f"--claim '{item}' is not NAME=VALUE (e.g. acr=high)")
        try:
            out[name] = json.loads(raw)
        except ValueError:
            out[name] = raw
    return out


def parse_headers(values: list[str]) -> tuple[tuple[str, str], ...]:
    """``NAME:VALUE`` pairs."""
    out = []
    for item in values:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise InputError(f"--header '{item}' is not NAME:VALUE (e.g. x-tenant:acme)")
        out.append((name.strip().lower(), value.strip()))
    return tuple(out)


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        policy = load(args.policy)
        token = args.token or ""
        if (args.groups or args.claim) and args.sub is None:
            raise InputError("--groups and --claim need --sub (the subject of the demo token)")
        if args.sub is not None:
            if args.token:
                raise InputError("pass either --token or --sub/--groups, not both")
            groups = [g.strip() for g in args.groups.split(",") if g.strip()]
            claims = parse_claims(args.claim)
            policy, token = minted(
                policy, args.policy, args.state_dir, args.sub, groups, claims=claims
            )
        if not 0 <= args.port <= 65535:
            raise InputError(f"--port {args.port} is not a port (1-65535)")
        client = Client(
            token=token,
            api_key=args.api_key,
            principal=args.spiffe,
            source_ip=args.source_ip,
            port=args.port,
            headers=parse_headers(args.header),
        )
        compiled = compile_with_keys(policy)
        outcome = run(
            policy,
            compiled,
            method=args.method,
            path=args.path,
            host=args.host,
            route=args.route,
            client=client,
        )
    except InputError as exc:
        print(f"meshward explain: {exc}", file=sys.stderr)
        return EXIT_INPUT
    for line in explain_lines(policy, compiled, outcome):
        print(line)
    return EXIT_ALLOW if outcome.decision.allowed else EXIT_DENY
