"""The typed, immutable policy model: what the YAML means, after validation.

A :class:`Policy` is built only by :mod:`meshward.policy.loader` (or by tests) and never
mutated; services receive a new object on every reload. Every named object keeps the
:class:`Source` (file and line) it came from, so explanations and errors can point
back at the YAML an operator wrote.

``Policy.version`` is a content hash of the *meaning* of the policy (the canonical
JSON of everything but source positions), so re-formatting a file or adding a comment
does not produce a new version, while any semantic change does. The same version
string is written into every xDS snapshot and into every route's ext_authz context,
which is how a decision is tied to the exact policy that made it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

#: HTTP methods a route or permission may name.
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)

#: JWS algorithms the v1 policy accepts for an issuer.
JWT_ALGORITHMS = frozenset({"RS256", "ES256", "EdDSA"})


@dataclass(frozen=True)
class Source:
    """Where a policy object was defined: ``file:line`` (1-based line)."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


_NO_SOURCE = Source("<memory>", 0)


@dataclass(frozen=True)
class Endpoint:
    """One upstream address of a service. ``address`` is an IP or a DNS name."""

    address: str
    port: int


@dataclass(frozen=True)
class Mesh:
    """Mesh-wide identity settings: the SPIFFE trust domain and the namespace.

    Every workload's identity is ``spiffe://<trust_domain>/ns/<namespace>/sa/<name>``
    where ``name`` is the service (for a sidecar) or the gateway.
    """

    trust_domain: str = "meshward.local"
    namespace: str = "default"


@dataclass(frozen=True)
class Sidecar:
    """A service's sidecar proxy: the mTLS inbound listener in front of the service.

    The sidecar is its own Envoy node group (:meth:`Policy.sidecar_group`); it accepts
    only mTLS from workloads of the trust domain and forwards to the service's
    endpoints.
    """

    port: int
    address: str = "127.0.0.1"


@dataclass(frozen=True)
class Service:
    """An upstream service: a name, the endpoints that serve it, and maybe a sidecar."""

    name: str
    endpoints: tuple[Endpoint, ...]
    sidecar: Sidecar | None = None
    source: Source = field(default=_NO_SOURCE, compare=False)


@dataclass(frozen=True)
class RouteMatch:
    """What a request must look like to take a route.

    Exactly one of ``prefix`` and ``path`` is set. ``hosts`` empty means any host
    (``*``); ``methods`` empty means any method.
    """

    prefix: str | None = None
    path: str | None = None
    hosts: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class MfaRequirement:
    """What a route demands of the user's authentication (RFC 9470 step-up).

    A token satisfies it when its ``amr`` claim (a list) contains one of ``amr`` (empty:
    no ``amr`` demand), its ``acr`` is ``min_acr`` or a level above it in the issuer's
    ``acr_levels`` (empty: no ``acr`` demand), and, with ``max_age_seconds``, its
    ``auth_time`` is at most that old. A user identity that cannot carry these claims
    (an API key) never satisfies it.
    """

    amr: tuple[str, ...] = ()
    min_acr: str = ""
    max_age_seconds: int = 0


@dataclass(frozen=True)
class Route:
    """A gateway route: a match and the service it forwards to.

    ``name`` is unique across the whole policy; it is what Envoy reports back to
    authz (through ``context_extensions``) and what decisions and spans name. With
    ``mfa`` an otherwise allowed request whose user token does not meet it gets a 401
    ``insufficient_user_authentication``.
    """

    name: str
    match: RouteMatch
    service: str
    mfa: MfaRequirement | None = None
    source: Source = field(default=_NO_SOURCE, compare=False)


#: TLS versions a gateway may require of outside clients.
TLS_VERSIONS = ("1.2", "1.3")


@dataclass(frozen=True)
class GatewayTls:
    """TLS termination for outside clients.

    The gateway's server certificate is issued by the mesh CA for ``dns_names``;
    clients verify it with the CA bundle. ``min_version`` "1.3" means TLS 1.3 only.
    """

    dns_names: tuple[str, ...] = ("localhost",)
    min_version: str = "1.2"


@dataclass(frozen=True)
class Gateway:
    """An Envoy listener. ``name`` is the Envoy node group (``node.cluster``).

    With ``tls`` the listener terminates TLS (HTTPS); without it, plaintext HTTP.
    """

    name: str
    port: int
    routes: tuple[Route, ...]
    address: str = "127.0.0.1"
    tls: GatewayTls | None = None
    source: Source = field(default=_NO_SOURCE, compare=False)


@dataclass(frozen=True)
class Issuer:
    """A trusted JWT issuer.

    Keys come from exactly one of two places:

    - ``jwks``: the JWKS document itself (parsed JSON), read by the loader from
      ``jwks_file``; services never touch the file system for keys, so a policy can be
      shipped whole to authz replicas;
    - ``jwks_uri``: an HTTPS URL each authz process fetches in the background
      (``jwks`` is then empty). ``jwks_ca_pem`` is the PEM bundle that verifies the
      server (empty: the system's CAs); it is read by the loader from ``jwks_ca_file``
      and travels inside the policy like ``jwks``. Keys are re-fetched every
      ``jwks_refresh_seconds``, and on a token with an unknown ``kid`` at most once per
      ``jwks_min_refresh_seconds``; a failed fetch keeps the last good keys.

    ``subject_claim`` and ``groups_claim`` name the claims that become the subject and
    groups of the identity. ``acr_levels`` orders the issuer's ``acr`` values, lowest
    first, for routes demanding a minimum ``acr``.
    """

    name: str
    issuer: str
    audiences: tuple[str, ...]
    jwks: dict[str, Any] = field(compare=False, hash=False)
    #: Where the JWKS was read from: like ``source``, not part of the meaning (nor of
    #: equality), so a policy received over xDS (no file) equals the loaded one.
    jwks_file: str = field(default="", compare=False)
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    subject_claim: str = "sub"
    groups_claim: str = "groups"
    #: Seconds of clock skew tolerated when checking ``exp``, ``nbf`` and ``iat``.
    clock_skew_seconds: int = 30
    jwks_uri: str = ""
    jwks_ca_pem: str = ""
    jwks_refresh_seconds: int = 300
    jwks_min_refresh_seconds: int = 10
    acr_levels: tuple[str, ...] = ()
    source: Source = field(default=_NO_SOURCE, compare=False)


@dataclass(frozen=True)
class HeaderMatch:
    """A request header a permission requires. ``name`` is lower case; ``value`` is
    ``*`` (present, any value), ``prefix*`` (starts with), or an exact value."""

    name: str
    value: str = "*"


@dataclass(frozen=True)
class Permission:
    """What a role allows: a request matching every listed aspect.

    - ``methods``: empty means any method.
    - ``paths``: any one of the patterns. A pattern is an exact path (``/orders``), a
      prefix ending in ``*`` (``/orders/*``), a suffix starting with ``*``
      (``*.json``), ``*`` alone for any path, or a segment template where ``{*}`` is
      exactly one segment and a final ``{**}`` zero or more (``/orders/{*}/items``,
      ``/static/{**}``).
    - ``hosts``: empty means any; otherwise the request's host (port ignored) is one
      of them: exact (``api.example.com``) or ``*.example.com`` (one or more labels).
    - ``ports``: empty means any; otherwise the port the request arrived on (the
      listener's: the gateway's or the sidecar's).
    - ``headers``: every one must be present and match.
    - ``services``: empty means any; otherwise the service the route forwards to.
    """

    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ("*",)
    services: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True)
class Role:
    """A named set of permissions."""

    name: str
    permissions: tuple[Permission, ...]
    source: Source = field(default=_NO_SOURCE, compare=False)


@dataclass(frozen=True)
class ClaimCondition:
    """The user token's claim at ``path`` (dotted, like ``groups_claim``) must equal one
    of ``values`` or, when the claim is a list, contain one of them. Numbers and
    booleans compare by their JSON text (``true``, ``3``)."""

    path: str
    values: tuple[str, ...]


#: Binding effects and modes.
EFFECTS = ("allow", "deny")
MODES = ("enforce", "audit")


@dataclass(frozen=True)
class Binding:
    """Applies ``role`` to principals: end users and/or workloads, under conditions.

    *User* principals are JWT/API-key subjects and groups (``*`` in ``subjects``: any
    user identity); *workload* principals are SPIFFE ID patterns matched against the
    mTLS peer (``source.principal``). A binding that names both kinds requires both (the
    request must come from a matching workload *and* carry a matching user identity);
    one that names one kind requires that kind. A ``deny`` binding naming no principal
    applies to every request. Pattern syntax: an exact SPIFFE ID, ``*`` as a whole path
    segment for exactly one segment, and a trailing ``/*`` for one or more segments
    (``spiffe://example.org/ns/shop/*``).

    Conditions, all of which must hold: the client address is in one of
    ``source_ips`` (CIDRs; empty: any) and in none of ``not_source_ips``; every
    ``claims`` condition holds for the user's token (no token claims: it fails).

    ``effect: deny`` bindings are evaluated before any ``allow``: a match denies.
    ``mode: audit`` bindings are evaluated, traced and logged but never enforced.
    """

    name: str
    role: str
    subjects: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    workloads: tuple[str, ...] = ()
    effect: str = "allow"
    mode: str = "enforce"
    source_ips: tuple[str, ...] = ()
    not_source_ips: tuple[str, ...] = ()
    claims: tuple[ClaimCondition, ...] = ()
    source: Source = field(default=_NO_SOURCE, compare=False)


@dataclass(frozen=True)
class ApiKey:
    """A static API key for a user-kind identity (``subject`` and ``groups``).

    Only the key's SHA-256 (64 lower-case hex digits) is kept: the policy, the xDS
    payload and authz never hold the key itself. Bindings grant the key's ``subject``
    and ``groups`` like a JWT's.
    """

    name: str
    key_sha256: str
    subject: str
    groups: tuple[str, ...] = ()
    source: Source = field(default=_NO_SOURCE, compare=False)


@dataclass(frozen=True)
class Responses:
    """What authz adds to an allowed request before Envoy forwards it upstream.

    Each ``*_header`` names the header carrying that fact (empty: not sent). A sent
    header always overwrites a client-supplied one of the same name, and when there is
    nothing to send (no groups, no workload) a client-supplied one is removed, so the
    upstream can trust them. ``remove_authorization`` strips the ``Authorization``
    header (the user's token) once authz has verified it.
    """

    subject_header: str = "x-meshward-subject"
    groups_header: str = "x-meshward-groups"
    workload_header: str = "x-meshward-workload"
    remove_authorization: bool = False


@dataclass(frozen=True)
class Tracing:
    """Where every proxy sends its OpenTelemetry spans, and how many requests it traces.

    ``collector_address``/``collector_port`` is an OTLP/gRPC endpoint (plaintext); the
    translator gives every HTTP connection manager Envoy's OpenTelemetry tracer exporting
    to it through the cluster :data:`xds_server.translator.COLLECTOR_CLUSTER`, sampling
    ``sampling_percent`` of the requests that arrive without a sampling decision (a
    request whose ``traceparent`` is already sampled stays sampled). authz's decision
    span continues the trace Envoy sends in the Check's gRPC metadata.
    """

    collector_address: str
    collector_port: int
    sampling_percent: float = 100.0
    source: Source = field(default=_NO_SOURCE, compare=False)


@dataclass(frozen=True)
class Policy:
    """A whole, validated policy. Build with :meth:`Policy.build` to get a version."""

    services: tuple[Service, ...] = ()
    gateways: tuple[Gateway, ...] = ()
    issuers: tuple[Issuer, ...] = ()
    roles: tuple[Role, ...] = ()
    bindings: tuple[Binding, ...] = ()
    #: Static API keys (hashes only); see :class:`ApiKey`.
    api_keys: tuple[ApiKey, ...] = ()
    #: Only ``deny`` in v1: no rule matched → the request is denied.
    default_action: str = "deny"
    mesh: Mesh = Mesh()
    responses: Responses = Responses()
    #: ``None``: proxies do not trace (authz still makes decision spans).
    tracing: Tracing | None = None
    version: str = ""
    #: The files the policy was read from, for status pages and logs.
    files: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def build(
        cls,
        *,
        services: tuple[Service, ...] = (),
        gateways: tuple[Gateway, ...] = (),
        issuers: tuple[Issuer, ...] = (),
        roles: tuple[Role, ...] = (),
        bindings: tuple[Binding, ...] = (),
        api_keys: tuple[ApiKey, ...] = (),
        default_action: str = "deny",
        mesh: Mesh = Mesh(),
        responses: Responses = Responses(),
        tracing: Tracing | None = None,
        files: tuple[str, ...] = (),
    ) -> Policy:
        """Create a policy and stamp it with its content-hash version."""
        unversioned = cls(
            services=services,
            gateways=gateways,
            issuers=issuers,
            roles=roles,
            bindings=bindings,
            api_keys=api_keys,
            default_action=default_action,
            mesh=mesh,
            responses=responses,
            tracing=tracing,
            files=files,
        )
        digest = hashlib.sha256(unversioned.canonical_json().encode()).hexdigest()
        return cls(
            services=services,
            gateways=gateways,
            issuers=issuers,
            roles=roles,
            bindings=bindings,
            api_keys=api_keys,
            default_action=default_action,
            mesh=mesh,
            responses=responses,
            tracing=tracing,
            version=digest[:12],
            files=files,
        )

    def canonical_json(self) -> str:
        """The policy's meaning as canonical JSON (no sources, no version)."""
        return json.dumps(_plain(self), sort_keys=True, separators=(",", ":"))

    # Lookups used by the translator and authz. Names are unique (the loader checks).
    def service(self, name: str) -> Service:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)

    def role(self, name: str) -> Role:
        for r in self.roles:
            if r.name == name:
                return r
        raise KeyError(name)

    def spiffe_id(self, workload: str) -> str:
        """The SPIFFE ID of a workload (a service or a gateway name)."""
        return f"spiffe://{self.mesh.trust_domain}/ns/{self.mesh.namespace}/sa/{workload}"

    @staticmethod
    def sidecar_group(service: str) -> str:
        """The Envoy node group (``node.cluster``) of a service's sidecar."""
        return f"{service}-sidecar"

    def node_groups(self) -> dict[str, str]:
        """Every Envoy node group → the workload (gateway or service) it proxies for."""
        groups = {g.name: g.name for g in self.gateways}
        groups.update({self.sidecar_group(s.name): s.name for s in self.services if s.sidecar})
        return groups

    def routes(self) -> tuple[Route, ...]:
        return tuple(r for g in self.gateways for r in g.routes)


#: Not part of the meaning: where things were written, and the version itself.
_SKIPPED_FIELDS = frozenset({"source", "version", "files", "jwks_file"})


def _plain(value: Any) -> Any:
    """Dataclasses → dicts (without sources/version), tuples → lists, recursively."""
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in fields(value)
            if f.name not in _SKIPPED_FIELDS
        }
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
