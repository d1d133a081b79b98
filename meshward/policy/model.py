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
class Route:
    """A gateway route: a match and the service it forwards to.

    ``name`` is unique across the whole policy; it is what Envoy reports back to
    authz (through ``context_extensions``) and what decisions and spans name.
    """

    name: str
    match: RouteMatch
    service: str
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

    ``jwks`` is the JWKS document itself (parsed JSON), read by the loader from
    ``jwks_file``; services never touch the file system for keys, so a policy can be
    shipped whole to authz replicas. ``subject_claim`` and ``groups_claim`` name the
    claims that become the subject and groups of the identity.
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
    source: Source = field(default=_NO_SOURCE, compare=False)


@dataclass(frozen=True)
class Permission:
    """What a role allows: any of ``methods`` on any of ``paths``.

    ``methods`` empty means any method. A path pattern is an exact path (``/orders``),
    a prefix ending in ``*`` (``/orders/*`` matches ``/orders/`` and below), or ``*``
    alone for any path. ``services`` empty means any service; otherwise the
    permission applies only to requests routed to one of the named services.
    """

    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ("*",)
    services: tuple[str, ...] = ()


@dataclass(frozen=True)
class Role:
    """A named set of permissions."""

    name: str
    permissions: tuple[Permission, ...]
    source: Source = field(default=_NO_SOURCE, compare=False)


@dataclass(frozen=True)
class Binding:
    """Grants ``role`` to principals: end users and/or workloads.

    *User* principals are JWT subjects (``sub``) and groups; *workload* principals are
    SPIFFE ID patterns matched against the mTLS peer (``source.principal``). A binding
    that names both kinds requires both (the request must come from a matching
    workload *and* carry a matching user token); one that names one kind requires
    that kind. Pattern syntax: an exact SPIFFE ID, ``*`` as a whole path segment for
    exactly one segment, and a trailing ``/*`` for one or more segments
    (``spiffe://example.org/ns/shop/*``).
    """

    name: str
    role: str
    subjects: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    workloads: tuple[str, ...] = ()
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
