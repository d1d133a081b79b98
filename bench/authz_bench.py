"""Check throughput and latency: meshward authz against a do-nothing Check server.

The workload is a generated, realistic policy, written as YAML files into a temporary
directory and loaded with :func:`meshward.policy.loader.load_policy` (the real path):
10 services (each behind a sidecar), 2 gateways with 30 routes, 3 JWT issuers (RS256,
ES256, EdDSA; JWKS files), 50 roles (several permissions each: methods, path patterns,
some limited to services), 200 bindings (subjects, groups, SPIFFE workload patterns,
users-through-a-workload) and 20 API keys (only their SHA-256 stored). The requests are
pre-built ``CheckRequest`` messages with the route context Envoy would send: ~60% Bearer
JWTs (500 distinct valid tokens across the three issuers), ~20% API keys, ~20% mTLS-only
(a SPIFFE ``source.principal`` at a sidecar), allowed and denied (the mix the real
decision gives is printed). Each call carries Envoy's ``traceparent`` in the gRPC
metadata, as a tracing Envoy sends it.

Processes (so each CPU figure is one process's own), for each serving engine
(``--engine``: ``stock``, ``fast`` or ``both``, the default; see :mod:`authz.server`):

* the **baseline** — a Check server that answers OK without looking at the request,
  built by the same function as meshward's server on that engine
  (:func:`authz.server.new_check_server` for ``stock``: same grpcio sync server,
  worker count, options, handler registration and health service;
  :func:`authz.server.new_fast_check_server` for ``fast``: same completion-queue loop,
  options and health service);
* **meshward** — :class:`authz.server.AuthzService` on that engine, with everything
  production has on:
  spans through meshward's bounded batch processor and the real OTLP/gRPC exporter
  (:func:`authz.tracing.setup_tracer_provider`, as ``meshward authz`` with
  ``OTEL_EXPORTER_OTLP_ENDPOINT``) to an OTLP sink in another process that counts the
  spans and drops them; the decision log written to a file (formatted JSON lines; via the
  ``meshward.decision`` logger to a file when this ``DecisionLog`` has no file output);
  Prometheus metrics;
* with ``--floor``, the **floor** — the baseline's engine and settings doing only what
  the issue requires of every Check whatever its decision: read the request, make the
  decision span (meshward's lean path, child of Envoy's ``traceparent``, exported as
  meshward exports) and write the decision-log line, around a constant allow. No
  identity, no RBAC, no response headers: what any authz that traces and logs every
  decision pays on this stack, so its ratio bounds meshward's;
* the **load generator** (``grpc.aio``, one HTTP/2 connection as Envoy keeps).

With 2+ CPUs the servers are pinned to CPU 0 and the load generator and OTLP sink to
CPU 1 (``--no-pin`` to let the scheduler place them): on a 2-core machine unpinned runs
vary by a factor of 2 from run to run, and pinning authz to a core is a measured lever anyway.

Two measurements, each target in turn, ``--rounds`` times (medians reported):

(a) **max throughput**: closed loop, ``--concurrency`` calls in flight → checks/s, p50,
    p99, the server's CPU µs per check;
(b) **fixed offered load**: open loop at ``--rate`` checks/s; latency counted from each
    call's *scheduled* send time, so a stalled server is not hidden by the client
    waiting for it (no coordinated omission) → p50, p99.

Prints a table and the ratios (each engine's meshward, and floor, against its own
baseline, and meshward on the fast engine against both baselines and against meshward
on stock); it asserts nothing about speed. ``busy %`` is the server's CPU per second of
the window: a closed-loop row well under 100% was limited by the load generator (one
Python process on one core), not by the server, and the bench says so — its throughput
is then a floor of the server's capacity and a throughput ratio against it flatters the
other side. ``1/CPU`` is the inverse ratio of CPU per Check at the fixed load: the two
servers' own costs compared at one load, whoever limits the closed loop.

Where meshward's CPU goes (``--breakdown``): the thread CPU inside the handler
(:meth:`authz.check.Checker.check`) during the closed-loop windows, the rest of the
process (engine, gRPC core's threads, span export and decision-log threads), and the
same handler deciding the same requests in the same process with no gRPC traffic.
On this project's 2-core VM the handler costs 1.3-2.7x more CPU while serving than
alone: the Python decision path is slowed by what runs around it, not only by its own
instructions (moving gRPC core's threads to the other core removed the preemptions
but not the slowdown, so shared caches are the likely rest).

    .venv/bin/python bench/authz_bench.py --seconds 3 --rate 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import inspect
import json
import multiprocessing
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHOD = "/envoy.service.auth.v3.Authorization/Check"
OTLP_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
TRUST_DOMAIN = "bench.meshward.local"
NAMESPACE = "shop"
AUDIENCE = "meshward-bench"
SERVICES = (
    "orders",
    "catalog",
    "payments",
    "users",
    "inventory",
    "shipping",
    "reviews",
    "search",
    "billing",
    "notify",
)
#: Groups users are drawn from (besides ``team-<service>`` and ``<service>-oncall``).
COMMON_GROUPS = ("staff", "engineering", "support", "partners", "finance", "contractors")
USERS = 300
TOKENS = 500
API_KEYS = 20


# == the policy =========================================================================


@dataclass(frozen=True)
class IssuerSpec:
    name: str
    issuer: str
    alg: str
    groups_claim: str = "groups"


ISSUERS = (
    IssuerSpec("corp-sso", "https://sso.corp.example", "RS256"),
    IssuerSpec("partner-idp", "https://idp.partner.example", "ES256", "realm_access.roles"),
    IssuerSpec("ci-tokens", "https://tokens.ci.example", "EdDSA"),
)


@dataclass
class Grantee:
    """Who is granted what, as the generator decided it (to aim requests at grants)."""

    roles: set[str] = field(default_factory=set)


@dataclass
class Workload:
    """Everything the requests are built from."""

    directory: Path
    policy: Any  # meshward.policy.model.Policy
    roles: dict[str, list[dict[str, Any]]]  # role → permissions (as written)
    users: list[tuple[str, tuple[str, ...]]]  # (subject, groups)
    tokens: list[tuple[int, str]]  # (user index, compact JWT)
    api_keys: list[tuple[str, str, tuple[str, ...]]]  # (key, subject, groups)
    callers: list[str]  # SPIFFE IDs of mTLS peers
    by_subject: dict[str, set[str]]
    by_group: dict[str, set[str]]
    by_workload: list[tuple[str, set[str]]]  # (pattern, roles)


def spiffe(name: str, namespace: str = NAMESPACE) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{name}"


def _roles() -> dict[str, list[dict[str, Any]]]:
    """50 roles: five per service, 1-3 permissions each."""
    roles: dict[str, list[dict[str, Any]]] = {}
    for svc in SERVICES:
        roles[f"{svc}-reader"] = [
            {"methods": ["GET", "HEAD"], "paths": [f"/{svc}", f"/{svc}/*"], "services": [svc]},
            {"methods": ["GET"], "paths": [f"/partner/{svc}/*"]},
        ]
        roles[f"{svc}-writer"] = [
            {"methods": ["GET"], "paths": [f"/{svc}/*"]},
            {"methods": ["POST", "PUT", "PATCH"], "paths": [f"/{svc}/items", f"/{svc}/items/*"]},
        ]
        roles[f"{svc}-admin"] = [
            {"methods": ["GET", "POST", "PUT", "PATCH", "DELETE"], "paths": [f"/{svc}/*"]},
            {"paths": [f"/admin/{svc}/*"]},
        ]
        roles[f"{svc}-auditor"] = [
            {"methods": ["GET"], "paths": [f"/{svc}/audit/*", f"/{svc}/reports/*"]},
            {"methods": ["GET"], "paths": [f"/admin/{svc}/audit"]},
        ]
        roles[f"{svc}-ops"] = [
            {"methods": ["GET", "POST"], "paths": [f"/{svc}/ops/*", f"/{svc}/health"]},
            {"methods": ["GET"], "paths": [f"/{svc}/metrics"], "services": [svc]},
            {"methods": ["POST"], "paths": [f"/admin/{svc}/ops/*"]},
        ]
    return roles


def generate_policy(directory: Path, rng: random.Random) -> Workload:
    """Write the policy YAML, JWKS and API key files into ``directory`` and load it."""
    import yaml
    from joserfc import jwt
    from joserfc.errors import SecurityWarning
    from joserfc.jwk import ECKey, OKPKey, RSAKey

    from meshward.policy.loader import load_policy

    warnings.filterwarnings("ignore", category=SecurityWarning)  # "EdDSA is deprecated"
    (directory / "keys").mkdir(parents=True)
    dump = {"sort_keys": False, "default_flow_style": None, "width": 200}

    # -- mesh, services, gateways (mesh.yaml) ------------------------------------------
    services = [
        {
            "name": svc,
            "endpoints": [{"address": "127.0.0.1", "port": 11000 + i}],
            "sidecar": {"port": 12000 + i},
        }
        for i, svc in enumerate(SERVICES)
    ]
    edge_routes: list[dict[str, Any]] = []
    for svc in SERVICES:
        edge_routes.append({"name": f"{svc}-api", "match": {"prefix": f"/{svc}"}, "service": svc})
        edge_routes.append(
            {
                "name": f"{svc}-admin",
                "match": {"prefix": f"/admin/{svc}", "methods": ["GET", "POST", "DELETE"]},
                "service": svc,
            }
        )
    partner_routes = [
        {"name": f"{svc}-partner", "match": {"prefix": f"/partner/{svc}"}, "service": svc}
        for svc in SERVICES
    ]
    mesh = {
        "mesh": {"trust_domain": TRUST_DOMAIN, "namespace": NAMESPACE},
        "services": services,
        "gateways": [
            {"name": "edge", "port": 10080, "routes": edge_routes},
            {"name": "partner", "port": 10081, "routes": partner_routes},
        ],
        "default": "deny",
    }
    (directory / "mesh.yaml").write_text(yaml.safe_dump(mesh, **dump))

    # -- issuers (issuers.yaml + keys/*.jwks.json) -------------------------------------
    signing: list[tuple[IssuerSpec, Any, str]] = []
    issuers = []
    for spec in ISSUERS:
        kid = f"{spec.name}-1"
        if spec.alg == "RS256":
            key: Any = RSAKey.generate_key(2048, parameters={"kid": kid})
        elif spec.alg == "ES256":
            key = ECKey.generate_key("P-256", parameters={"kid": kid})
        else:
            key = OKPKey.generate_key("Ed25519", parameters={"kid": kid})
        jwks = {"keys": [{**key.as_dict(private=False), "kid": kid, "use": "sig"}]}
        (directory / "keys" / f"{spec.name}.jwks.json").write_text(json.dumps(jwks))
        entry: dict[str, Any] = {
            "name": spec.name,
            "issuer": spec.issuer,
            "audiences": [AUDIENCE],
            "jwks_file": f"keys/{spec.name}.jwks.json",
            "algorithms": [spec.alg],
        }
        if spec.groups_claim != "groups":
            entry["groups_claim"] = spec.groups_claim
        issuers.append(entry)
        signing.append((spec, key, kid))
    (directory / "issuers.yaml").write_text(yaml.safe_dump({"issuers": issuers}, **dump))

    # -- users and API keys ------------------------------------------------------------
    users: list[tuple[str, tuple[str, ...]]] = []
    for i in range(USERS):
        home = SERVICES[i % len(SERVICES)]
        groups = {f"team-{home}", rng.choice(COMMON_GROUPS)}
        if rng.random() < 0.2:
            groups.add(f"{rng.choice(SERVICES)}-oncall")
        if rng.random() < 0.3:
            groups.add(rng.choice(COMMON_GROUPS))
        users.append((f"user-{i:04d}", tuple(sorted(groups))))
    api_keys: list[tuple[str, str, tuple[str, ...]]] = []
    key_entries = []
    for i in range(API_KEYS):
        plain = secrets.token_urlsafe(32)
        subject = f"bot-{SERVICES[i % len(SERVICES)]}-{i:02d}"
        groups = (f"team-{SERVICES[i % len(SERVICES)]}",) if i % 2 else ("staff",)
        api_keys.append((plain, subject, groups))
        key_entries.append(
            {
                "name": f"key-{i:02d}",
                "key_sha256": hashlib.sha256(plain.encode()).hexdigest(),
                "subject": subject,
                "groups": list(groups),
            }
        )
    (directory / "keys" / "api-keys.yaml").write_text(yaml.safe_dump(key_entries, **dump))

    # -- roles and bindings (rbac.yaml) ------------------------------------------------
    roles = _roles()
    by_subject: dict[str, set[str]] = {}
    by_group: dict[str, set[str]] = {}
    by_workload: list[tuple[str, set[str]]] = []
    bindings: list[dict[str, Any]] = []

    def bind(name: str, role: str, **who: list[str]) -> None:
        bindings.append({"name": name, "role": role, **who})
        if "workloads" in who:
            if "groups" not in who and "subjects" not in who:
                by_workload.extend((w, {role}) for w in who["workloads"])
            return
        for s in who.get("subjects", []):
            by_subject.setdefault(s, set()).add(role)
        for g in who.get("groups", []):
            by_group.setdefault(g, set()).add(role)

    subjects = [s for s, _ in users] + [s for _, s, _ in api_keys]
    for i, svc in enumerate(SERVICES):
        other = SERVICES[(i + 1) % len(SERVICES)]
        third = SERVICES[(i + 3) % len(SERVICES)]
        # 6 group bindings
        bind(f"{svc}-team-writes", f"{svc}-writer", groups=[f"team-{svc}"])
        bind(f"{svc}-oncall-ops", f"{svc}-ops", groups=[f"{svc}-oncall", f"team-{svc}"])
        bind(f"{svc}-staff-reads", f"{svc}-reader", groups=["staff", "engineering"])
        bind(f"{svc}-support-reads", f"{svc}-reader", groups=["support"])
        bind(f"{svc}-finance-audits", f"{svc}-auditor", groups=["finance"])
        bind(f"{svc}-partners-read", f"{svc}-reader", groups=["partners", f"team-{other}"])
        # 8 subject bindings
        for k in range(8):
            role = f"{svc}-{('admin', 'writer', 'reader', 'auditor', 'ops')[k % 5]}"
            chosen = rng.sample(subjects, 6)
            bind(f"{svc}-people-{k}", role, subjects=chosen)
        # 4 workload bindings: exact, one-segment wildcard, trailing wildcard, gateways
        bind(f"{svc}-from-{other}", f"{svc}-reader", workloads=[spiffe(other)])
        bind(f"{svc}-from-any-ns-{third}", f"{svc}-writer", workloads=[
            f"spiffe://{TRUST_DOMAIN}/ns/*/sa/{third}"])  # fmt: skip
        bind(f"{svc}-from-batch", f"{svc}-auditor", workloads=[
            f"spiffe://{TRUST_DOMAIN}/ns/batch/*"])  # fmt: skip
        bind(f"{svc}-from-gateways", f"{svc}-reader", workloads=[
            spiffe("edge"), spiffe("partner")])  # fmt: skip
        # 2 users-through-a-workload bindings (both must match)
        bind(f"{svc}-oncall-via-console", f"{svc}-admin",
             groups=[f"{svc}-oncall"], workloads=[spiffe("console")])  # fmt: skip
        bind(f"{svc}-ops-via-jobs", f"{svc}-ops",
             subjects=rng.sample(subjects, 4), workloads=[spiffe("runner", "jobs")])  # fmt: skip
    rbac = {
        "roles": [{"name": name, "permissions": perms} for name, perms in roles.items()],
        "bindings": bindings,
        "api_keys_file": "keys/api-keys.yaml",
    }
    # -- features the lead is adding in parallel ---------------------------------------
    # Permission hosts/ports/headers, response templates, deny bindings, audit mode and
    # claim conditions go HERE once the loader has them: add them to a share of the
    # roles and bindings above (e.g. a ``headers`` match on every writer role, a few
    # ``effect: deny`` bindings, ``claims`` conditions on the partner bindings) so the
    # bench keeps measuring what production runs.
    (directory / "rbac.yaml").write_text(yaml.safe_dump(rbac, **dump))

    policy = load_policy(directory)

    # -- tokens: 500 distinct, all valid, across the three issuers ---------------------
    now = int(time.time())
    tokens: list[tuple[int, str]] = []
    for t in range(TOKENS):
        user = t % USERS
        subject, groups = users[user]
        spec, key, kid = signing[t % len(signing)]
        claims: dict[str, Any] = {
            "iss": spec.issuer,
            "aud": AUDIENCE,
            "sub": subject,
            "iat": now - 60,
            "nbf": now - 60,
            "exp": now + 4 * 3600,
            "jti": f"bench-{t}",
            "email": f"{subject}@corp.example",
            "scope": "openid profile email",
        }
        if spec.groups_claim == "groups":
            claims["groups"] = list(groups)
        else:
            claims["realm_access"] = {"roles": list(groups)}
        header = {"alg": spec.alg, "kid": kid, "typ": "JWT"}
        tokens.append((user, jwt.encode(header, claims, key, algorithms=[spec.alg])))

    callers = [spiffe(s) for s in SERVICES] + [spiffe("edge"), spiffe("partner")]
    callers += [spiffe(f"job-{j}", "batch") for j in range(4)] + [spiffe("console")]
    callers += [spiffe("scanner", "sandbox")]  # no binding names it
    return Workload(
        directory, policy, roles, users, tokens, api_keys, callers,
        by_subject, by_group, by_workload,
    )  # fmt: skip


# == the requests =======================================================================


def _concrete(permission: dict[str, Any], rng: random.Random) -> tuple[str, str]:
    """A (method, path) the permission grants."""
    method = rng.choice(permission.get("methods") or ["GET", "POST", "DELETE"])
    pattern = rng.choice(permission["paths"])
    if pattern.endswith("/*"):
        tail = rng.choice(["items", "orders", "v1/things", "audit", "ops"])
        path = f"{pattern[:-1]}{tail}/{rng.randrange(10**6)}"
    else:
        path = pattern
    return method, path


def _route(path: str, method: str) -> tuple[str, str, str] | None:
    """(route, service, gateway) Envoy would match for ``path`` at the gateways."""
    parts = path.split("/")
    if parts[1] == "admin" and parts[2] in SERVICES and method in ("GET", "POST", "DELETE"):
        return f"{parts[2]}-admin", parts[2], "edge"
    if parts[1] == "partner" and len(parts) > 2 and parts[2] in SERVICES:
        return f"{parts[2]}-partner", parts[2], "partner"
    if parts[1] in SERVICES:
        return f"{parts[1]}-api", parts[1], "edge"
    return None


def _matches(pattern: str, principal: str) -> bool:
    """SPIFFE pattern matching as docs/policy.md defines it (exact, ``*`` segment,
    trailing ``/*``)."""
    if pattern.endswith("/*") and "/*/" not in pattern:
        return principal.startswith(pattern[:-1]) and len(principal) > len(pattern) - 1
    want, have = pattern.split("/"), principal.split("/")
    return len(want) == len(have) and all(w in ("*", h) for w, h in zip(want, have, strict=True))


def _workload_roles(work: Workload, principal: str) -> set[str]:
    roles: set[str] = set()
    for pattern, granted in work.by_workload:
        if _matches(pattern, principal):
            roles |= granted
    return roles


def build_requests(
    work: Workload, count: int, rng: random.Random
) -> list[tuple[bytes, tuple[tuple[str, str], ...]]]:
    """``count`` serialized CheckRequests with their gRPC metadata."""
    from envoy.service.auth.v3 import external_auth_pb2

    from meshward import route_context

    version = work.policy.version
    out: list[tuple[bytes, tuple[tuple[str, str], ...]]] = []
    agents = ("Mozilla/5.0 (X11; Linux x86_64) Firefox/126.0", "okhttp/4.12.0", "curl/8.5.0")
    for i in range(count):
        kind = rng.choices(("jwt", "api_key", "mtls"), weights=(60, 20, 20))[0]
        aim = rng.random() < 0.7  # aim at a grant; else a random (mostly denied) request
        headers = {
            "accept": "application/json",
            "user-agent": rng.choice(agents),
            "x-request-id": f"{rng.getrandbits(128):032x}",
            "x-forwarded-for": f"203.0.113.{rng.randrange(1, 255)}",
            "x-forwarded-proto": "https",
            "x-envoy-expected-rq-timeout-ms": "15000",
            "traceparent": f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01",
        }
        principal = ""
        roles: set[str] = set()
        if kind == "jwt":
            user, token = work.tokens[i % len(work.tokens)]
            subject, groups = work.users[user]
            headers["authorization"] = f"Bearer {token}"
            roles = set(work.by_subject.get(subject, ()))
            for g in groups:
                roles |= work.by_group.get(g, set())
        elif kind == "api_key":
            plain, subject, groups = work.api_keys[i % len(work.api_keys)]
            if i % 3:
                headers["x-api-key"] = plain
            else:
                headers["authorization"] = f"ApiKey {plain}"
            roles = set(work.by_subject.get(subject, ()))
            for g in groups:
                roles |= work.by_group.get(g, set())
        else:
            principal = rng.choice(work.callers)
            roles = _workload_roles(work, principal)
        for _ in range(20):
            if aim and roles:
                permission = rng.choice(work.roles[rng.choice(sorted(roles))])
            else:
                permission = rng.choice(work.roles[rng.choice(sorted(work.roles))])
            method, path = _concrete(permission, rng)
            if kind == "mtls":
                svc = path.split("/")[2] if path.startswith(("/admin/", "/partner/")) else (
                    path.split("/")[1])  # fmt: skip
                route: tuple[str, str, str] | None = (f"{svc}.inbound", svc, f"{svc}-sidecar")
            else:
                route = _route(path, method)
            if route is not None:
                break
        assert route is not None
        if kind == "mtls":
            headers["x-forwarded-client-cert"] = f"By={spiffe(route[1])};URI={principal}"
        message = external_auth_pb2.CheckRequest()
        attributes = message.attributes
        attributes.source.address.socket_address.address = "127.0.0.1"
        attributes.source.address.socket_address.port_value = 40000 + i % 20000
        attributes.source.principal = principal
        attributes.destination.address.socket_address.address = "127.0.0.1"
        attributes.destination.address.socket_address.port_value = 10080
        http = attributes.request.http
        http.id = str(rng.getrandbits(63))
        http.method = method
        http.path = path + ("?page=2&limit=50" if i % 4 == 0 else "")
        http.host = "api.corp.example" if route[2] != "partner" else "partner.corp.example"
        http.scheme = "https"
        http.protocol = "HTTP/1.1"
        for key, value in headers.items():
            http.headers[key] = value
        extensions = attributes.context_extensions
        extensions[route_context.ROUTE] = route[0]
        extensions[route_context.SERVICE] = route[1]
        extensions[route_context.GATEWAY] = route[2]
        extensions[route_context.POLICY_VERSION] = version
        # Envoy's CLIENT span for the ext_authz call (DESIGN.md: gRPC metadata).
        metadata = (("traceparent", f"00-{rng.getrandbits(128):032x}-{i + 1:016x}-01"),)
        out.append((message.SerializeToString(), metadata))
    return out


def decision_mix(work: Workload, requests: list[tuple[bytes, Any]]) -> Counter[str]:
    """What the real decision says for each request (decided here, once)."""
    from envoy.service.auth.v3 import external_auth_pb2

    from authz.compiled import compile_policy
    from authz.decision import decide
    from authz.request import AuthzRequest

    compiled = compile_policy(work.policy)
    now = time.time()
    mix: Counter[str] = Counter()
    for data, _ in requests:
        request = AuthzRequest.from_check_request(external_auth_pb2.CheckRequest.FromString(data))
        decision = decide(request, compiled, now)
        mix[f"{'allow' if decision.allowed else 'deny'}/{decision.reason}"] += 1
    return mix


# == processes ==========================================================================


def _pin(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_switches(pid: int) -> int:
    """Context switches (voluntary + involuntary) of every thread of process ``pid``."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(OSError):
            for line in status.read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
    return total


def _proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass(frozen=True)
class ServerSpec:
    target: str  # "baseline" or "meshward"
    engine: str  # "stock" or "fast"
    workers: int
    policy_dir: str
    otlp_endpoint: str
    decision_log: str
    cpus: set[int] | None
    #: Parts of meshward turned off for a cost breakdown (``--without``): never the default.
    without: frozenset[str] = frozenset()
    #: Meter the decision handler's own CPU (``--breakdown``; see :class:`_HandlerMeter`).
    breakdown: bool = False


class _HandlerMeter:
    """``--breakdown``: the thread CPU spent inside :meth:`authz.check.Checker.check`
    (parse result in, response out: decision, span, decision-log hand-off, metrics), so
    meshward's CPU per Check splits into its own work and the engine + gRPC around it.
    The wrapper costs ~1 µs per Check (two clock reads): a breakdown run's throughput
    is not the figure to quote."""

    def __init__(self) -> None:
        self.checks = 0
        self.cpu_ns = 0

    def install(self) -> None:
        from authz.check import Checker

        check = Checker.check
        clock = time.thread_time_ns

        def metered(checker: Any, message: Any, metadata: Any = None) -> Any:
            began = clock()
            try:
                return check(checker, message, metadata)
            finally:
                self.cpu_ns += clock() - began
                self.checks += 1

        Checker.check = metered  # type: ignore[method-assign,assignment]

    def alone(self, checker: Any, requests: list[tuple[bytes, Any]], rounds: int = 3) -> float:
        """CPU µs per Check of ``checker`` deciding ``requests`` in this thread with no
        gRPC traffic in the process (the fastest of ``rounds`` passes)."""
        from envoy.service.auth.v3 import external_auth_pb2

        parse = external_auth_pb2.CheckRequest.FromString
        best = float("inf")
        for _ in range(rounds):
            began = time.thread_time_ns()
            for data, metadata in requests:
                checker.check(parse(data), metadata)
            best = min(best, (time.thread_time_ns() - began) / 1e3 / len(requests))
        return best


def _decision_log_path(work_dir: Path, target: str) -> Path:
    """Where the server of ``target`` (``kind/engine``) writes its decision log."""
    return work_dir / f"decisions-{target.replace('/', '-')}.log"


def _ok_response() -> Any:
    """The do-nothing servers' answer: OK, nothing else."""
    from envoy.service.auth.v3 import external_auth_pb2
    from google.rpc import status_pb2

    return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))


def _serve_handler(spec: ServerSpec, conn: Connection, check: Any) -> None:
    """Serve ``check`` on ``spec.engine`` as the baseline is built (the same function as
    meshward's server on that engine, with the gRPC health service); report the port,
    serve until told to stop."""
    from grpc_health.v1 import health, health_pb2_grpc

    from authz.engine_fast import HealthStatuses
    from authz.server import new_check_server, new_fast_check_server

    if spec.engine == "fast":
        fast = new_fast_check_server(check, HealthStatuses())
        conn.send(fast.add_insecure_port("127.0.0.1:0"))
        fast.start()
        conn.recv()
        fast.stop(1)
    else:
        server = new_check_server(check, spec.workers)
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        conn.send(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        conn.recv()
        server.stop(1).wait()


def _serve(spec: ServerSpec, conn: Connection) -> None:
    """A server process: reports its port, serves until told to stop, reports counters."""
    _pin(spec.cpus)
    if spec.target == "baseline":
        ok = _ok_response()
        _serve_handler(spec, conn, lambda request, context: ok)
        conn.send({})
        return

    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = spec.otlp_endpoint
    os.environ["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
    from authz.decision_log import DecisionLog
    from authz.server import AuthzService
    from authz.tracing import setup_tracer_provider
    from meshward.policy.loader import load_policy

    policy = load_policy(spec.policy_dir)
    if "tracing" in spec.without:
        del os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"]  # spans made, exported nowhere
    provider = setup_tracer_provider("meshward-authz")
    tracer: Any = provider.get_tracer("meshward.authz")
    if "spans" in spec.without:
        from opentelemetry.trace import NoOpTracer

        tracer = NoOpTracer()
    if "log" in spec.without:
        import logging

        logging.getLogger("meshward.decision").disabled = True
        decision_log = DecisionLog(background=False)
        log_mode = "off"
    elif "destination" in inspect.signature(DecisionLog).parameters:
        decision_log = DecisionLog(destination=spec.decision_log)
        log_mode = "file"
    else:  # before file output existed: the logger, JSON-formatted, into the file
        import logging

        from meshward.logs import JsonFormatter

        sink = logging.FileHandler(spec.decision_log)
        sink.setFormatter(JsonFormatter())
        logger = logging.getLogger("meshward.decision")
        logger.addHandler(sink)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        decision_log = DecisionLog()
        log_mode = "logger"
    if spec.target == "floor":
        _serve_floor(spec, conn, tracer, decision_log)
        provider.shutdown()
        return
    meter = _HandlerMeter()
    if spec.breakdown:
        meter.install()
    service = AuthzService(
        policy, tracer, workers=spec.workers, decision_log=decision_log, engine=spec.engine
    )
    conn.send(service.start())
    breakdown: dict[str, float] = {}
    while (message := conn.recv()) != "stop":
        if message == "meter":  # the handler's counters, read at each window's edges
            conn.send((meter.checks, meter.cpu_ns))
        elif isinstance(message, tuple) and message[0] == "alone":
            breakdown["alone_us"] = meter.alone(service._checker, message[1])
            conn.send(breakdown["alone_us"])
    service.stop(1)
    provider.shutdown()  # flushes the batched spans
    registry = service.registry
    decisions = sum(
        sample.value
        for metric in registry.collect()
        if metric.name == "meshward_authz_decisions"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
    conn.send(
        {
            "decisions": decisions,
            "log_mode": log_mode,
            "log_dropped": getattr(decision_log, "dropped", 0),
            **breakdown,
        }
    )


def _serve_floor(spec: ServerSpec, conn: Connection, tracer: Any, decision_log: Any) -> None:
    """``--floor``: the work the issue requires of every Check whatever the decision —
    read the request, one span (meshward's own lean OTLP path, child of Envoy's
    ``traceparent``), one decision-log line — around a constant allow, on the same
    engine and settings as the baseline. No identity, no RBAC, no response headers.
    Its throughput against the baseline bounds what any authz that traces and logs every
    decision can reach here."""
    from authz import reasons
    from authz.decision import Decision, new_decision_id
    from authz.request import AuthzRequest
    from authz.tracing import DecisionSpans

    ok = _ok_response()
    spans = DecisionSpans(tracer)
    decided = 0

    def check(message: Any, context: Any) -> Any:
        nonlocal decided
        start_ns = time.time_ns()
        request = AuthzRequest.from_check_request(message)
        decision = Decision(True, 200, reasons.ALLOWED, new_decision_id(), route=request.route)
        trace_id = spans.record(
            decision,
            request,
            context.invocation_metadata(),
            start_ns=start_ns,
            end_ns=time.time_ns(),
            internal_error=False,
        )
        decision_log.record(decision, request, trace_id, start_ns / 1e9)
        decided += 1
        return ok

    _serve_handler(spec, conn, check)
    decision_log.close()
    conn.send({"decisions": decided, "log_dropped": getattr(decision_log, "dropped", 0)})


def _otlp_sink(conn: Connection, cpus: set[int] | None) -> None:
    """An OTLP/gRPC trace endpoint that counts spans and drops them."""
    _pin(cpus)
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    spans = 0
    parse = trace_service_pb2.ExportTraceServiceRequest.FromString
    empty = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()

    def export(data: bytes, context: Any) -> bytes:
        nonlocal spans
        request = parse(data)
        spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        return empty

    handler = grpc.unary_unary_rpc_method_handler(export)
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": handler}
            ),
        )
    )
    conn.send(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    conn.recv()
    conn.send(spans)
    server.stop(0)


@dataclass(frozen=True)
class LoadSpec:
    port: int
    requests: list[tuple[bytes, tuple[tuple[str, str], ...]]]
    mode: str  # "closed" or "open"
    concurrency: int
    rate: float
    warmup: float
    seconds: float
    cpus: set[int] | None


def _load(spec: LoadSpec, conn: Connection) -> None:
    """Drive one server; sends "start" when the measured window opens, then the result."""
    _pin(spec.cpus)
    import grpc

    requests = spec.requests

    async def run() -> dict[str, Any]:
        latencies: list[float] = []
        errors = 0
        lag = 0.0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{spec.port}") as channel:
            call = channel.unary_unary(METHOD)  # bytes in, bytes out: no client parsing
            await channel.channel_ready()
            # Prime: every distinct request once (token cache, first-sight caches).
            for k in range(0, len(requests), 64):
                await asyncio.gather(*(call(r, metadata=m) for r, m in requests[k : k + 64]))
            start = time.perf_counter() + spec.warmup
            end = start + spec.seconds

            async def mark_window() -> None:
                await asyncio.sleep(max(0.0, start - time.perf_counter()))
                conn.send("start")  # the parent samples the server's CPU here …

            async def one(index: int, scheduled: float) -> None:
                nonlocal errors
                data, metadata = requests[index % len(requests)]
                try:
                    await call(data, metadata=metadata)
                except grpc.RpcError:
                    errors += 1
                finished = time.perf_counter()
                if start <= scheduled and finished <= end:
                    latencies.append(finished - scheduled)

            async def closed(offset: int) -> None:
                i = offset
                while (began := time.perf_counter()) < end:
                    await one(i, began)
                    i += spec.concurrency

            async def opened() -> None:
                nonlocal lag
                interval = 1.0 / spec.rate
                first = time.perf_counter()
                tasks: set[asyncio.Task[None]] = set()
                k = 0
                while (scheduled := first + k * interval) < end:
                    now = time.perf_counter()
                    if scheduled > now:
                        await asyncio.sleep(scheduled - now)
                    elif scheduled >= start:
                        lag = max(lag, now - scheduled)
                    task = asyncio.ensure_future(one(k, scheduled))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    k += 1
                if tasks:
                    await asyncio.wait(tasks, timeout=30)

            if spec.mode == "closed":
                await asyncio.gather(mark_window(), *(closed(k) for k in range(spec.concurrency)))
            else:
                await asyncio.gather(mark_window(), opened())
        return {"latencies": latencies, "errors": errors, "lag": lag}

    conn.send(asyncio.run(run()))  # … and again when this arrives


# == measuring ==========================================================================


@dataclass
class Result:
    target: str
    mode: str
    checks: int
    errors: int
    seconds: float
    latencies: list[float]
    cpu_seconds: float
    lag: float = 0.0
    switches: int = 0
    #: ``--breakdown``: Checks and thread CPU (ns) inside the handler during the window.
    handler_checks: int = 0
    handler_cpu_ns: int = 0

    @property
    def rate(self) -> float:
        return self.checks / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.cpu_seconds / self.checks if self.checks else float("nan")

    @property
    def busy(self) -> float:
        """The server's CPU seconds per second of the window (1.0: one core saturated)."""
        return self.cpu_seconds / self.seconds if self.seconds else float("nan")

    @property
    def switches_per_check(self) -> float:
        return self.switches / self.checks if self.checks else float("nan")


def measure(
    server_pid: int,
    port: int,
    spec: LoadSpec,
    target: str,
    meter: Callable[[], tuple[int, int]] | None = None,
) -> Result:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_load, args=(spec, child), daemon=True)
    process.start()
    if not parent.poll(120) or parent.recv() != "start":
        raise RuntimeError("load generator did not start")
    before, switches = _proc_cpu(server_pid), _proc_switches(server_pid)
    metered = meter() if meter is not None else (0, 0)
    if not parent.poll(spec.seconds + 60):
        raise RuntimeError("load generator did not finish")
    after, switches = _proc_cpu(server_pid), _proc_switches(server_pid) - switches
    if meter is not None:
        checks, cpu_ns = meter()
        metered = (checks - metered[0], cpu_ns - metered[1])
    out = parent.recv()
    process.join(10)
    latencies = out["latencies"]
    return Result(
        target, spec.mode, len(latencies), out["errors"], spec.seconds, latencies,
        after - before, out["lag"], switches, *metered,
    )  # fmt: skip


class Server:
    """A server process (``baseline`` or ``meshward`` on one engine) for the whole run."""

    def __init__(self, spec: ServerSpec) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(spec, child), daemon=True)
        self.process.start()
        if not self.conn.poll(120):
            raise RuntimeError(f"{spec.target} server did not start")
        self.port: int = self.conn.recv()
        assert self.process.pid is not None
        self.pid: int = self.process.pid

    def meter(self) -> tuple[int, int]:
        """The handler's (Checks, CPU ns) so far (a ``--breakdown`` meshward server)."""
        self.conn.send("meter")
        checks, cpu_ns = self.conn.recv()
        return int(checks), int(cpu_ns)

    def alone(self, requests: list[tuple[bytes, Any]]) -> float:
        """The handler's CPU µs per Check on ``requests`` with no gRPC traffic."""
        self.conn.send(("alone", requests))
        return float(self.conn.recv())

    def stop(self) -> dict[str, Any]:
        self.conn.send("stop")
        info: dict[str, Any] = self.conn.recv() if self.conn.poll(60) else {}
        self.process.join(10)
        return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run")
    parser.add_argument("--concurrency", type=int, default=16, help="closed loop: in flight")
    parser.add_argument("--rate", type=float, default=1000.0, help="open loop: checks/s")
    parser.add_argument(
        "--workers", type=int, default=4, help="worker threads of the stock engine's servers"
    )
    parser.add_argument(
        "--engine",
        choices=("both", "stock", "fast"),
        default="both",
        help="serving engine(s) to measure, each with its own baseline",
    )
    parser.add_argument("--requests", type=int, default=2000, help="distinct CheckRequests")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians reported)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep", action="store_true", help="keep the generated policy dir")
    parser.add_argument(
        "--without",
        default="",
        help="cost breakdown only: turn parts of meshward off (comma list of "
        "tracing = no OTLP export, spans = no spans at all, log = no decision log)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also meter meshward's handler (Checker.check) CPU per Check while serving, "
        "and alone in the same process with no gRPC traffic (adds ~1 µs per Check)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure the floor: the same engine doing only what every Check needs "
        "whatever its decision (read the request, one span, one decision-log line)",
    )
    args = parser.parse_args(argv)

    pin = not args.no_pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2
    server_cpus = {0} if pin else None
    load_cpus = {1} if pin else None

    without = frozenset(w for w in args.without.split(",") if w)
    unknown = without - {"tracing", "spans", "log"}
    if unknown:
        parser.error(f"--without: unknown part(s) {', '.join(sorted(unknown))}")
    engines = ["stock", "fast"] if args.engine == "both" else [args.engine]
    if "fast" in engines:
        from authz.engine_fast import fast_engine_unavailable

        reason = fast_engine_unavailable()
        if reason is not None:
            if args.engine == "fast":
                parser.error(f"--engine fast: unavailable here ({reason})")
            print(f"# fast engine unavailable ({reason}): stock only")
            engines = ["stock"]
    kinds = ("baseline", "floor", "meshward") if args.floor else ("baseline", "meshward")
    targets = [f"{t}/{e}" for e in engines for t in kinds]
    rng = random.Random(args.seed)
    work_dir = Path(tempfile.mkdtemp(prefix="meshward-authz-bench-"))
    try:
        started = time.perf_counter()
        work = generate_policy(work_dir / "policy", rng)
        requests = build_requests(work, args.requests, rng)
        mix = decision_mix(work, requests)
        policy = work.policy
        bindings = len(policy.bindings)
        print(
            f"# policy {policy.version}: {len(policy.services)} services, "
            f"{sum(len(g.routes) for g in policy.gateways)} gateway routes, "
            f"{len(policy.issuers)} issuers ({', '.join(s.alg for s in ISSUERS)}), "
            f"{len(policy.roles)} roles, {bindings} bindings, {len(policy.api_keys)} API keys "
            f"(generated in {time.perf_counter() - started:.1f}s)"
        )
        total = sum(mix.values())
        allowed = sum(n for k, n in mix.items() if k.startswith("allow/"))
        print(
            f"# {len(requests)} CheckRequests (60% JWT from {TOKENS} tokens, 20% API key, "
            f"20% mTLS-only): allow {100 * allowed / total:.0f}%, "
            + ", ".join(f"{k} {100 * n / total:.0f}%" for k, n in mix.most_common() if n)
        )

        context = multiprocessing.get_context("spawn")
        sink_conn, sink_child = context.Pipe()
        sink = context.Process(target=_otlp_sink, args=(sink_child, load_cpus), daemon=True)
        sink.start()
        otlp_port = sink_conn.recv()
        servers: dict[str, Server] = {}
        for target in targets:
            kind, engine = target.split("/")
            servers[target] = Server(
                ServerSpec(
                    kind, engine, args.workers, str(work.directory),
                    f"http://127.0.0.1:{otlp_port}",
                    str(_decision_log_path(work_dir, target)),
                    server_cpus, without if kind == "meshward" else frozenset(),
                    args.breakdown and kind == "meshward",
                )
            )  # fmt: skip
        described = {
            "stock": f"stock = grpcio sync server, {args.workers} workers",
            "fast": "fast = one thread on grpcio's completion queue",
        }
        print(
            f"# engines: {'; '.join(described[e] for e in engines)}; baseline and meshward "
            f"share each engine's settings; "
            f"meshward: spans via the counting batch processor + OTLP/gRPC exporter to a dropping "
            f"sink process, decision log to a file, metrics on; "
            f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}"
            + (", servers pinned to CPU 0, load + OTLP sink to CPU 1" if pin else ", unpinned")
            + f"; {args.rounds} round(s) of {args.warmup:g}s warm-up + {args.seconds:g}s"
            + (
                f"; NOT PRODUCTION: meshward without {', '.join(sorted(without))}"
                if without
                else ""
            ),
            flush=True,
        )

        results: list[Result] = []
        for _ in range(args.rounds):
            for mode in ("closed", "open"):
                for target, server in servers.items():
                    spec = LoadSpec(
                        server.port, requests, mode, args.concurrency, args.rate,
                        args.warmup, args.seconds, load_cpus,
                    )  # fmt: skip
                    metered = args.breakdown and target.startswith("meshward/")
                    results.append(
                        measure(
                            server.pid, server.port, spec, target,
                            server.meter if metered else None,
                        )
                    )  # fmt: skip
        rss = {target: _proc_rss_mb(server.pid) for target, server in servers.items()}
        alone = {
            target: server.alone(requests)
            for target, server in servers.items()
            if args.breakdown and target.startswith("meshward/")
        }
        infos = {target: server.stop() for target, server in servers.items()}
        sink_conn.send("stop")
        spans = sink_conn.recv()
        sink.join(10)
        log_lines: dict[str, int] = {}
        for target in targets:
            path = _decision_log_path(work_dir, target)
            log_lines[target] = sum(1 for _ in path.open("rb")) if path.exists() else 0

        print()
        print(f"{'load':<22} {'target':<15} {'checks/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'max ms':>7} {'CPU µs/check':>12} {'busy %':>6} {'csw/check':>9} "
              f"{'errors':>6}")  # fmt: skip
        for r in results:
            label = (
                f"closed, {args.concurrency} in flight"
                if r.mode == "closed"
                else f"open, {args.rate:g}/s"
            )
            print(
                f"{label:<22} {r.target:<15} {r.rate:>9.0f} {1e3 * r.percentile(0.5):>7.2f} "
                f"{1e3 * r.percentile(0.99):>7.2f} {1e3 * max(r.latencies, default=0):>7.2f} "
                f"{r.cpu_us:>12.0f} {100 * r.busy:>6.0f} {r.switches_per_check:>9.1f} "
                f"{r.errors:>6}"
            )

        def median(mode: str, target: str, what: Callable[[Result], float]) -> float:
            return statistics.median(
                what(r) for r in results if r.mode == mode and r.target == target
            )

        print()
        for engine in engines:
            meshward = infos.get(f"meshward/{engine}", {})
            print(
                f"# meshward/{engine}: {meshward.get('decisions', 0):.0f} decisions, "
                f"{log_lines[f'meshward/{engine}']} decision-log lines "
                f"({meshward.get('log_mode')}, {meshward.get('log_dropped', 0)} dropped); RSS "
                f"baseline {rss[f'baseline/{engine}']:.0f} MB, meshward "
                f"{rss[f'meshward/{engine}']:.0f} MB"
            )
            if args.floor:
                floor = infos.get(f"floor/{engine}", {})
                print(
                    f"# floor/{engine}: {floor.get('decisions', 0):.0f} decisions, "
                    f"{log_lines[f'floor/{engine}']} decision-log lines "
                    f"({floor.get('log_dropped', 0)} dropped)"
                )
        print(f"# {spans} spans received by the OTLP sink (all meshward and floor servers)")
        for target, alone_us in alone.items():
            engine = target.split("/")[1]
            closed = [r for r in results if r.target == target and r.mode == "closed"]
            base = [r for r in results if r.target == f"baseline/{engine}" and r.mode == "closed"]
            checks = sum(r.handler_checks for r in closed)
            serving_us = sum(r.handler_cpu_ns for r in closed) / 1e3 / checks if checks else 0.0
            total_us = statistics.median(r.cpu_us for r in closed)
            print(
                f"# breakdown {target} (closed loop, CPU µs per Check): whole process "
                f"{total_us:.0f} = handler {serving_us:.0f} (Checker.check: decide, respond, "
                f"span, log hand-off, metrics) + {total_us - serving_us:.0f} engine, gRPC and "
                f"background threads; the same handler alone in that process (no gRPC "
                f"traffic) {alone_us:.0f}; do-nothing server, whole process "
                f"{statistics.median(r.cpu_us for r in base):.0f}"
            )
        lagging = max((r.lag for r in results if r.mode == "open"), default=0.0)
        if lagging > 0.005:
            print(f"# note: the open-loop sender ran up to {1e3 * lagging:.1f} ms behind schedule")

        for target in targets:  # a server the load generator could not saturate
            busy = median("closed", target, lambda r: r.busy)
            if busy < 0.9:
                print(
                    f"# note: {target} was {100 * busy:.0f}% busy in the closed loop: the load "
                    f"generator, not the server, set its throughput (a floor of its capacity), "
                    f"so a throughput ratio against it flatters the other side; '1/CPU at "
                    f"{args.rate:g}/s' compares the servers' own cost per Check at one load"
                )

        def ratios(top: str, bottom: str, note: str = "") -> None:
            def ratio(mode: str, what: Callable[[Result], float]) -> float:
                return median(mode, top, what) / median(mode, bottom, what)

            throughput = ratio("closed", lambda r: r.rate)
            latency = ratio("open", lambda r: r.percentile(0.99))
            capacity = 1 / ratio("open", lambda r: r.cpu_us)
            print(
                f"{top + ' / ' + bottom:<35} throughput {throughput:5.2f}   "
                f"p99 at {args.rate:g}/s {latency:5.2f}   "
                f"1/CPU at {args.rate:g}/s {capacity:5.2f}{note}"
            )

        for engine in engines:
            if args.floor:
                ratios(f"floor/{engine}", f"baseline/{engine}")
            ratios(f"meshward/{engine}", f"baseline/{engine}", "   (target >= 0.85, <= 1.25)")
        if len(engines) == 2:
            ratios("meshward/fast", "baseline/stock")
            ratios("meshward/fast", "meshward/stock")
    finally:
        if args.keep:
            print(f"# kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
