"""Policy YAML → :class:`~meshward.policy.model.Policy`, with ``file:line`` errors.

The loader reads YAML as a *node tree* (``yaml.compose``), not as plain data, so every
value still knows its line. It never stops at the first problem: it reports every
issue it can find in one pass (unknown or duplicate keys, wrong types, bad values,
dangling references, duplicate or reserved names, unreadable JWKS files) as
:class:`~meshward.policy.errors.PolicyIssue` objects, and raises one
:class:`~meshward.policy.errors.PolicyError` holding all of them. A policy with any
issue is never returned: callers keep serving the last good one.

A policy is a directory of ``*.yaml``/``*.yml`` files (read in name order, not
recursively: sub-directories such as ``tests/`` or ``keys/`` belong to other tools)
or one file. Each file may hold any of the top-level sections; names are unique per
kind across all files. Relative ``jwks_file`` paths are relative to the file naming
them.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from meshward.policy.errors import PolicyError, PolicyIssue
from meshward.policy.model import (
    HTTP_METHODS,
    JWT_ALGORITHMS,
    TLS_VERSIONS,
    ApiKey,
    Binding,
    Endpoint,
    Gateway,
    GatewayTls,
    Issuer,
    Mesh,
    Permission,
    Policy,
    Role,
    Route,
    RouteMatch,
    Service,
    Sidecar,
    Source,
)
from meshward.policy.yaml_source import YamlSyntaxError, compose

T = TypeVar("T")

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)"
    r"(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*$"
)
_HOST_PATTERN_RE = re.compile(r"^(\*\.)?[a-zA-Z0-9.-]+$|^\*$")
#: Gateway names are Envoy node groups; this prefix is kept for meshward's own groups
#: (``meshward-authz``: authz replicas fetching the policy over ADS).
RESERVED_GROUP_PREFIX = "meshward-"
_TOP_LEVEL = (
    "mesh",
    "services",
    "gateways",
    "issuers",
    "roles",
    "bindings",
    "api_keys",
    "api_keys_file",
    "default",
)
_SHA256_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?$")
_SPIFFE_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_NULL = "tag:yaml.org,2002:null"


def load_policy(path: str | Path) -> Policy:
    """Load and validate the policy at ``path`` (a directory or one YAML file)."""
    files = policy_files(Path(path))
    reader = _Reader()
    for file in files:
        reader.read_file(file)
    return reader.finish(tuple(str(f) for f in files))


def policy_files(path: Path) -> list[Path]:
    """The YAML files that make up the policy at ``path``, or a PolicyError saying why none."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if not files:
            raise PolicyError(
                [
                    PolicyIssue(
                        str(path),
                        0,
                        "no policy files (*.yaml) in this directory; "
                        "point --policy at the directory holding mesh.yaml",
                    )
                ]
            )
        return files
    if path.is_file():
        return [path]
    raise PolicyError(
        [
            PolicyIssue(
                str(path),
                0,
                "no such file or directory; pass the policy directory (for example policies/)",
            )
        ]
    )


@dataclass
class _Named:
    """A collected named object, with where it was defined (for duplicate checks)."""

    value: Any
    source: Source


@dataclass
class _Reader:
    """Accumulates objects and issues across all files of one policy."""

    issues: list[PolicyIssue] = field(default_factory=list)
    services: list[_Named] = field(default_factory=list)
    gateways: list[_Named] = field(default_factory=list)
    issuers: list[_Named] = field(default_factory=list)
    roles: list[_Named] = field(default_factory=list)
    bindings: list[_Named] = field(default_factory=list)
    api_keys: list[_Named] = field(default_factory=list)
    default: tuple[str, Source] | None = None
    mesh: tuple[Mesh, Source] | None = None
    # References to check once every file is read: (kind, name, source, what).
    service_refs: list[tuple[str, Source, str]] = field(default_factory=list)
    role_refs: list[tuple[str, Source, str]] = field(default_factory=list)
    file: str = ""

    # ---- issue reporting -------------------------------------------------------
    def error(self, node: Node | Source | None, message: str) -> None:
        if isinstance(node, Source):
            self.issues.append(PolicyIssue(node.file, node.line, message))
        elif node is None:
            self.issues.append(PolicyIssue(self.file, 0, message))
        else:
            self.issues.append(PolicyIssue(self.file, node.start_mark.line + 1, message))

    def src(self, node: Node) -> Source:
        return Source(self.file, node.start_mark.line + 1)

    # ---- files -----------------------------------------------------------------
    def read_file(self, path: Path) -> None:
        self.file = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.error(None, f"cannot read policy file ({exc}); check the path and permissions")
            return
        try:
            root = compose(text)
        except YamlSyntaxError as exc:
            hint = "; fix the YAML syntax" if exc.line else ""
            self.issues.append(
                PolicyIssue(self.file, exc.line, f"YAML syntax error: {exc.problem}{hint}")
            )
            return
        if root is None or (isinstance(root, ScalarNode) and root.tag == _NULL):
            return  # an empty file contributes nothing
        top = self.mapping(root, "the policy file", allowed=_TOP_LEVEL)
        if top is None:
            return
        section_readers: dict[str, Callable[[Node], None]] = {
            "services": lambda n: self.section(n, "services", self.read_service, self.services),
            "gateways": lambda n: self.section(n, "gateways", self.read_gateway, self.gateways),
            "issuers": lambda n: self.section(n, "issuers", self.read_issuer, self.issuers),
            "roles": lambda n: self.section(n, "roles", self.read_role, self.roles),
            "bindings": lambda n: self.section(n, "bindings", self.read_binding, self.bindings),
            "api_keys": lambda n: self.section(n, "api_keys", self.read_api_key, self.api_keys),
            "api_keys_file": self.read_api_keys_file,
            "default": self.read_default,
            "mesh": self.read_mesh,
        }
        for key, (_, value) in top.items():
            section_readers[key](value)

    def section(
        self,
        node: Node,
        what: str,
        read_one: Callable[[Node, str], _Named | None],
        out: list[_Named],
    ) -> None:
        items = self.sequence(node, what)
        for i, item in enumerate(items or []):
            named = read_one(item, f"{what}[{i}]")
            if named is not None:
                out.append(named)

    # ---- generic node readers --------------------------------------------------
    def mapping(
        self,
        node: Node,
        what: str,
        allowed: tuple[str, ...],
        required: tuple[str, ...] = (),
    ) -> dict[str, tuple[Node, Node]] | None:
        """A mapping with only ``allowed`` keys; reports unknown, duplicate, missing keys."""
        if not isinstance(node, MappingNode):
            self.error(node, f"{what}: expected a mapping (key: value), got {_kind(node)}")
            return None
        out: dict[str, tuple[Node, Node]] = {}
        suggested: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag != _STR:
                self.error(key_node, f"{what}: keys must be strings")
                continue
            key = str(key_node.value)
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
                suggested.update(hint)
                self.error(
                    key_node,
                    f"{what}: unknown key '{key}'{suggestion}; allowed keys: {', '.join(allowed)}",
                )
                continue
            if key in out:
                first = out[key][0].start_mark.line + 1
                self.error(
                    key_node, f"{what}: duplicate key '{key}' (first at line {first}); keep one"
                )
                continue
            out[key] = (key_node, value_node)
        for key in required:
            if key not in out and key not in suggested:  # a typo was reported already
                self.error(node, f"{what}: missing required key '{key}'")
        return out

    def sequence(self, node: Node, what: str) -> list[Node] | None:
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return []
        if not isinstance(node, SequenceNode):
            self.error(node, f"{what}: expected a list, got {_kind(node)}")
            return None
        return list(node.value)

    def string(self, node: Node, what: str) -> str | None:
        if not isinstance(node, ScalarNode) or node.tag != _STR:
            self.error(node, f"{what}: expected a string, got {_kind(node)}")
            return None
        value = str(node.value)
        if not value:
            self.error(node, f"{what}: must not be empty")
            return None
        return value

    def integer(self, node: Node, what: str, low: int, high: int) -> int | None:
        if not isinstance(node, ScalarNode) or node.tag != _INT:
            self.error(node, f"{what}: expected an integer, got {_kind(node)}")
            return None
        value = int(node.value.replace("_", ""), 0)
        if not low <= value <= high:
            self.error(node, f"{what}: {value} is out of range; use {low}..{high}")
            return None
        return value

    def strings(self, node: Node, what: str) -> list[tuple[str, Node]]:
        items = self.sequence(node, what)
        out: list[tuple[str, Node]] = []
        for i, item in enumerate(items or []):
            value = self.string(item, f"{what}[{i}]")
            if value is not None:
                out.append((value, item))
        return out

    def name(self, fields: dict[str, tuple[Node, Node]], what: str) -> str | None:
        if "name" not in fields:
            return None
        node = fields["name"][1]
        value = self.string(node, f"{what}.name")
        if value is not None and not _NAME_RE.match(value):
            self.error(
                node,
                f"{what}.name: '{value}' is not a valid name; use lowercase letters, digits, "
                "'-', '_' and '.', starting and ending with a letter or digit (max 63)",
            )
            return None
        return value

    def methods(self, node: Node, what: str) -> tuple[str, ...]:
        out = []
        for value, item in self.strings(node, what):
            method = value.upper()
            if method not in HTTP_METHODS:
                self.error(
                    item,
                    f"{what}: '{value}' is not an HTTP method; use one of "
                    + ", ".join(sorted(HTTP_METHODS)),
                )
                continue
            if method not in out:
                out.append(method)
        return tuple(out)

    # ---- sections ----------------------------------------------------------------
    def read_service(self, node: Node, what: str) -> _Named | None:
        fields = self.mapping(
            node, what, allowed=("name", "endpoints", "sidecar"), required=("name", "endpoints")
        )
        if fields is None:
            return None
        name = self.name(fields, what)
        sidecar = None
        if "sidecar" in fields:
            sidecar = self.read_sidecar(fields["sidecar"][1], f"{what}.sidecar")
        endpoints: list[Endpoint] = []
        if "endpoints" in fields:
            items = self.sequence(fields["endpoints"][1], f"{what}.endpoints")
            if items == []:
                self.error(fields["endpoints"][1], f"{what}.endpoints: list at least one endpoint")
            for i, item in enumerate(items or []):
                endpoint = self.read_endpoint(item, f"{what}.endpoints[{i}]")
                if endpoint is not None:
                    endpoints.append(endpoint)
        if name is None:
            return None
        return _Named(
            Service(name, tuple(endpoints), sidecar, source=self.src(node)), self.src(node)
        )

    def read_sidecar(self, node: Node, what: str) -> Sidecar | None:
        fields = self.mapping(node, what, allowed=("address", "port"), required=("port",))
        if fields is None or "port" not in fields:
            return None
        port = self.integer(fields["port"][1], f"{what}.port", 1, 65535)
        address = self.listen_address(fields, what)
        if port is None or address is None:
            return None
        return Sidecar(port, address)

    def listen_address(self, fields: dict[str, tuple[Node, Node]], what: str) -> str | None:
        """The optional ``address`` to listen on (an IP; default 127.0.0.1)."""
        if "address" not in fields:
            return "127.0.0.1"
        value = self.string(fields["address"][1], f"{what}.address")
        if value is not None and not _is_ip(value):
            self.error(
                fields["address"][1],
                f"{what}.address: '{value}' is not an IP address to listen on "
                "(for example 127.0.0.1 or 0.0.0.0)",
            )
            return None
        return value

    def read_endpoint(self, node: Node, what: str) -> Endpoint | None:
        fields = self.mapping(node, what, allowed=("address", "port"), required=("address", "port"))
        if fields is None or len(fields) < 2:
            return None
        address = self.string(fields["address"][1], f"{what}.address")
        port = self.integer(fields["port"][1], f"{what}.port", 1, 65535)
        if address is not None and not _is_ip(address) and not _HOSTNAME_RE.match(address):
            self.error(
                fields["address"][1],
                f"{what}.address: '{address}' is neither an IP address nor a DNS name",
            )
            return None
        if address is None or port is None:
            return None
        return Endpoint(address, port)

    def read_gateway(self, node: Node, what: str) -> _Named | None:
        fields = self.mapping(
            node,
            what,
            allowed=("name", "address", "port", "tls", "routes"),
            required=("name", "port", "routes"),
        )
        if fields is None:
            return None
        name = self.name(fields, what)
        if name is not None and name.startswith(RESERVED_GROUP_PREFIX):
            self.error(
                fields["name"][1],
                f"{what}.name: '{name}' is reserved: gateway names starting with "
                f"'{RESERVED_GROUP_PREFIX}' are meshward's own node groups; rename the gateway",
            )
            name = None
        address = self.listen_address(fields, what) or "127.0.0.1"
        tls = self.read_gateway_tls(fields["tls"][1], f"{what}.tls") if "tls" in fields else None
        port = (
            self.integer(fields["port"][1], f"{what}.port", 1, 65535) if "port" in fields else None
        )
        routes: list[Route] = []
        if "routes" in fields:
            for i, item in enumerate(self.sequence(fields["routes"][1], f"{what}.routes") or []):
                route = self.read_route(item, f"{what}.routes[{i}]")
                if route is not None:
                    routes.append(route)
        if name is None or port is None:
            return None
        return _Named(
            Gateway(name, port, tuple(routes), address, tls, source=self.src(node)),
            self.src(node),
        )

    def read_gateway_tls(self, node: Node, what: str) -> GatewayTls | None:
        fields = self.mapping(node, what, allowed=("dns_names", "min_version"))
        if fields is None:
            return None
        dns_names: list[str] = []
        if "dns_names" in fields:
            for host, host_node in self.strings(fields["dns_names"][1], f"{what}.dns_names"):
                if not _HOSTNAME_RE.match(host) and not _is_ip(host):
                    self.error(host_node, f"{what}.dns_names: '{host}' is not a DNS name or IP")
                else:
                    dns_names.append(host)
        min_version = "1.2"
        if "min_version" in fields:
            vnode = fields["min_version"][1]
            value = vnode.value if isinstance(vnode, ScalarNode) else None
            if value not in TLS_VERSIONS:
                self.error(
                    vnode,
                    f"{what}.min_version: '{value}' is not supported; use "
                    + " or ".join(f"'{v}'" for v in TLS_VERSIONS)
                    + ' (quote it: "1.2")',
                )
                return None
            min_version = str(value)
        return GatewayTls(tuple(dns_names) or ("localhost",), min_version)

    def read_route(self, node: Node, what: str) -> Route | None:
        fields = self.mapping(
            node, what, allowed=("name", "match", "service"), required=("name", "match", "service")
        )
        if fields is None:
            return None
        name = self.name(fields, what)
        match = self.read_match(fields["match"][1], f"{what}.match") if "match" in fields else None
        service = None
        if "service" in fields:
            service = self.string(fields["service"][1], f"{what}.service")
            if service is not None:
                self.service_refs.append(
                    (service, self.src(fields["service"][1]), f"{what}.service")
                )
        if name is None or match is None or service is None:
            return None
        return Route(name, match, service, source=self.src(node))

    def read_match(self, node: Node, what: str) -> RouteMatch | None:
        fields = self.mapping(node, what, allowed=("prefix", "path", "hosts", "methods"))
        if fields is None:
            return None
        if ("prefix" in fields) == ("path" in fields):
            self.error(
                node, f"{what}: set exactly one of 'prefix' (path prefix) or 'path' (exact path)"
            )
            return None
        key = "prefix" if "prefix" in fields else "path"
        value = self.string(fields[key][1], f"{what}.{key}")
        if value is not None and not value.startswith("/"):
            self.error(fields[key][1], f"{what}.{key}: '{value}' must start with '/'")
            value = None
        hosts: list[str] = []
        for host, host_node in (
            self.strings(fields["hosts"][1], f"{what}.hosts") if "hosts" in fields else []
        ):
            if not _HOST_PATTERN_RE.match(host):
                self.error(
                    host_node,
                    f"{what}.hosts: '{host}' is not a host name "
                    "(use 'api.example.com', '*.example.com' or '*')",
                )
            elif host not in hosts:
                hosts.append(host.lower())
        if "*" in hosts:
            hosts = []  # any host
        methods = (
            self.methods(fields["methods"][1], f"{what}.methods") if "methods" in fields else ()
        )
        if value is None:
            return None
        return RouteMatch(
            prefix=value if key == "prefix" else None,
            path=value if key == "path" else None,
            hosts=tuple(hosts),
            methods=methods,
        )

    def read_issuer(self, node: Node, what: str) -> _Named | None:
        fields = self.mapping(
            node,
            what,
            allowed=(
                "name",
                "issuer",
                "audiences",
                "jwks_file",
                "algorithms",
                "subject_claim",
                "groups_claim",
                "clock_skew_seconds",
            ),
            required=("name", "issuer", "audiences", "jwks_file"),
        )
        if fields is None:
            return None
        name = self.name(fields, what)
        issuer = self.string(fields["issuer"][1], f"{what}.issuer") if "issuer" in fields else None
        audiences: list[str] = []
        if "audiences" in fields:
            audiences = [a for a, _ in self.strings(fields["audiences"][1], f"{what}.audiences")]
            if not audiences and isinstance(fields["audiences"][1], SequenceNode):
                self.error(
                    fields["audiences"][1],
                    f"{what}.audiences: list at least one audience; tokens must name "
                    "this service as their 'aud'",
                )
        algorithms: tuple[str, ...] = ("RS256", "ES256")
        if "algorithms" in fields:
            algs = []
            for alg, alg_node in self.strings(fields["algorithms"][1], f"{what}.algorithms"):
                if alg not in JWT_ALGORITHMS:
                    self.error(
                        alg_node,
                        f"{what}.algorithms: '{alg}' is not supported; use "
                        + ", ".join(sorted(JWT_ALGORITHMS)),
                    )
                elif alg not in algs:
                    algs.append(alg)
            algorithms = tuple(algs)
        claims = {}
        for key in ("subject_claim", "groups_claim"):
            if key in fields:
                claims[key] = self.string(fields[key][1], f"{what}.{key}")
        clock_skew: int | None = 30
        if "clock_skew_seconds" in fields:
            clock_skew = self.integer(
                fields["clock_skew_seconds"][1], f"{what}.clock_skew_seconds", 0, 300
            )
        jwks: dict[str, Any] | None = None
        jwks_file = ""
        if "jwks_file" in fields:
            jwks_node = fields["jwks_file"][1]
            rel = self.string(jwks_node, f"{what}.jwks_file")
            if rel is not None:
                resolved = Path(self.file).parent / rel
                jwks_file = str(resolved)
                jwks = self.read_jwks(resolved, jwks_node, f"{what}.jwks_file")
        if (
            name is None
            or issuer is None
            or jwks is None
            or not audiences
            or None in claims.values()
            or clock_skew is None
        ):
            return None
        return _Named(
            Issuer(
                name=name,
                issuer=issuer,
                audiences=tuple(audiences),
                jwks=jwks,
                jwks_file=jwks_file,
                algorithms=algorithms,
                subject_claim=claims.get("subject_claim") or "sub",
                groups_claim=claims.get("groups_claim") or "groups",
                clock_skew_seconds=clock_skew,
                source=self.src(node),
            ),
            self.src(node),
        )

    def read_jwks(self, path: Path, node: Node, what: str) -> dict[str, Any] | None:
        """Read and check a JWKS: JSON, a non-empty ``keys`` list of public RSA/EC keys."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            self.error(
                node,
                f"{what}: cannot read JWKS file {path}: {reason}; fix the path "
                "(relative to this policy file) or create the key set (for the demo: "
                "`meshward token --init`)",
            )
            return None
        except (ValueError, UnicodeDecodeError) as exc:
            self.error(
                node,
                f"{what}: {path} is not valid JSON ({exc}); it must be a JWKS "
                'document like {"keys": [...]}',
            )
            return None
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, list) or not keys:
            self.error(
                node,
                f"{what}: {path} has no 'keys' list; it must be a JWKS document "
                'like {"keys": [...]}',
            )
            return None
        from joserfc.jwk import KeySet  # local: keeps `meshward check` start-up light

        for i, key in enumerate(keys):
            if isinstance(key, dict) and "d" in key:
                self.error(
                    node,
                    f"{what}: {path} key #{i} contains private key material "
                    "('d'); publish only the public keys",
                )
                return None
        try:
            KeySet.import_key_set(data)
        except Exception as exc:  # joserfc raises several types for bad keys
            self.error(
                node,
                f"{what}: {path} is not a usable JWKS ({exc}); each key needs "
                "'kty' (RSA, EC or OKP), its public parameters and a 'kid'",
            )
            return None
        return dict(data)

    # ---- api_keys ------------------------------------------------------------------
    def read_api_key(self, node: Node, what: str) -> _Named | None:
        """One ``{name, key_sha256, subject, groups?}`` entry (a hash, never a key)."""
        fields = self.mapping(
            node,
            what,
            allowed=("name", "key_sha256", "subject", "groups"),
            required=("name", "key_sha256", "subject"),
        )
        if fields is None:
            return None
        name = self.name(fields, what)
        digest = None
        if "key_sha256" in fields:
            hash_node = fields["key_sha256"][1]
            # An all-digit hash is a YAML integer: read the scalar's text as written.
            if isinstance(hash_node, ScalarNode) and hash_node.tag == _INT:
                value: str | None = str(hash_node.value)
            else:
                value = self.string(hash_node, f"{what}.key_sha256")
            if value is not None and not _SHA256_HEX_RE.match(value):
                # Never echo the value: it may be a key pasted by mistake.
                self.error(
                    hash_node,
                    f"{what}.key_sha256: not a SHA-256 hash (64 hex digits); store the "
                    "key's hash, never the key itself: compute it with "
                    "`printf %s KEY | sha256sum`",
                )
            elif value is not None:
                digest = value.lower()
        subject = None
        if "subject" in fields:
            subject = self.string(fields["subject"][1], f"{what}.subject")
            if subject is not None and not subject.isprintable():
                self.error(fields["subject"][1], f"{what}.subject: must be printable text")
                subject = None
        groups: tuple[str, ...] = ()
        if "groups" in fields:
            groups = tuple(g for g, _ in self.strings(fields["groups"][1], f"{what}.groups"))
        if name is None or digest is None or subject is None:
            return None
        source = self.src(node)
        return _Named(ApiKey(name, digest, subject, groups, source=source), source)

    def read_api_keys_file(self, node: Node) -> None:
        """``api_keys_file: path``: the ``api_keys`` list in a YAML/JSON file of its own
        (relative to this policy file), e.g. a mounted secret."""
        rel = self.string(node, "api_keys_file")
        if rel is None:
            return
        path = Path(self.file).parent / rel
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.error(
                node,
                f"api_keys_file: cannot read {path}: {reason}; fix the path (relative to "
                "this policy file)",
            )
            return
        policy_file, self.file = self.file, str(path)
        try:
            try:
                root = compose(text)
            except YamlSyntaxError as exc:
                self.issues.append(
                    PolicyIssue(self.file, exc.line, f"YAML syntax error: {exc.problem}")
                )
                return
            if root is None:
                return
            self.section(root, "api_keys", self.read_api_key, self.api_keys)
        finally:
            self.file = policy_file

    def read_role(self, node: Node, what: str) -> _Named | None:
        fields = self.mapping(
            node, what, allowed=("name", "permissions"), required=("name", "permissions")
        )
        if fields is None:
            return None
        name = self.name(fields, what)
        permissions: list[Permission] = []
        if "permissions" in fields:
            items = self.sequence(fields["permissions"][1], f"{what}.permissions")
            if items == []:
                self.error(
                    fields["permissions"][1], f"{what}.permissions: list at least one permission"
                )
            for i, item in enumerate(items or []):
                perm = self.read_permission(item, f"{what}.permissions[{i}]")
                if perm is not None:
                    permissions.append(perm)
        if name is None:
            return None
        return _Named(Role(name, tuple(permissions), self.src(node)), self.src(node))

    def read_permission(self, node: Node, what: str) -> Permission | None:
        fields = self.mapping(
            node, what, allowed=("methods", "paths", "services"), required=("paths",)
        )
        if fields is None:
            return None
        methods = (
            self.methods(fields["methods"][1], f"{what}.methods") if "methods" in fields else ()
        )
        paths: list[str] = []
        for pattern, pnode in (
            self.strings(fields["paths"][1], f"{what}.paths") if "paths" in fields else []
        ):
            if pattern != "*" and (not pattern.startswith("/") or "*" in pattern[:-1]):
                self.error(
                    pnode,
                    f"{what}.paths: '{pattern}' is not a path pattern; use an "
                    "exact path ('/orders'), a prefix ending in '*' ('/orders/*') or '*'",
                )
            else:
                paths.append(pattern)
        services = []
        if "services" in fields:
            for svc, snode in self.strings(fields["services"][1], f"{what}.services"):
                self.service_refs.append((svc, self.src(snode), f"{what}.services"))
                services.append(svc)
        if not paths:
            return None
        return Permission(methods=methods, paths=tuple(paths), services=tuple(services))

    def read_binding(self, node: Node, what: str) -> _Named | None:
        fields = self.mapping(
            node,
            what,
            allowed=("name", "role", "subjects", "groups", "workloads"),
            required=("name", "role"),
        )
        if fields is None:
            return None
        name = self.name(fields, what)
        role = self.string(fields["role"][1], f"{what}.role") if "role" in fields else None
        if role is not None:
            self.role_refs.append((role, self.src(fields["role"][1]), f"{what}.role"))
        subjects = (
            tuple(s for s, _ in self.strings(fields["subjects"][1], f"{what}.subjects"))
            if "subjects" in fields
            else ()
        )
        groups = (
            tuple(g for g, _ in self.strings(fields["groups"][1], f"{what}.groups"))
            if "groups" in fields
            else ()
        )
        workloads: list[str] = []
        if "workloads" in fields:
            for pattern, pnode in self.strings(fields["workloads"][1], f"{what}.workloads"):
                problem = spiffe_pattern_problem(pattern)
                if problem:
                    self.error(pnode, f"{what}.workloads: '{pattern}' {problem}")
                else:
                    workloads.append(pattern)
        if not subjects and not groups and not workloads:
            self.error(
                node,
                f"{what}: grants its role to nobody; list 'subjects', 'groups' and/or 'workloads'",
            )
            return None
        if name is None or role is None:
            return None
        return _Named(
            Binding(name, role, subjects, groups, tuple(workloads), source=self.src(node)),
            self.src(node),
        )

    def read_mesh(self, node: Node) -> None:
        fields = self.mapping(node, "mesh", allowed=("trust_domain", "namespace"))
        if fields is None:
            return
        if self.mesh is not None:
            self.error(node, f"mesh: set again (first at {self.mesh[1]}); keep one")
            return
        values = {"trust_domain": "meshward.local", "namespace": "default"}
        for key, regex in (("trust_domain", _TRUST_DOMAIN_RE), ("namespace", _NAME_RE)):
            if key in fields:
                value = self.string(fields[key][1], f"mesh.{key}")
                if value is None:
                    return
                if not regex.match(value):
                    self.error(
                        fields[key][1],
                        f"mesh.{key}: '{value}' is not valid; use lowercase letters, digits, "
                        "'.', '-' and '_' (a SPIFFE trust domain or path segment)",
                    )
                    return
                values[key] = value
        self.mesh = (Mesh(**values), self.src(node))

    def read_default(self, node: Node) -> None:
        value = self.string(node, "default")
        if value is None:
            return
        if value != "deny":
            self.error(
                node,
                f"default: '{value}' is not supported; a zero-trust mesh denies "
                "what no rule allows: use 'default: deny'",
            )
            return
        if self.default is not None:
            self.error(node, f"default: set again (first at {self.default[1]}); keep one")
            return
        self.default = (value, self.src(node))

    # ---- cross-file checks ---------------------------------------------------------
    def unique(self, items: list[_Named], kind: str) -> list[Any]:
        seen: dict[str, Source] = {}
        out = []
        for item in items:
            name = item.value.name
            if name in seen:
                self.error(
                    item.source,
                    f"duplicate {kind} name '{name}' (first defined at "
                    f"{seen[name]}); names must be unique",
                )
                continue
            seen[name] = item.source
            out.append(item.value)
        return out

    def finish(self, files: tuple[str, ...]) -> Policy:
        services = self.unique(self.services, "service")
        gateways = self.unique(self.gateways, "gateway")
        issuers = self.unique(self.issuers, "issuer")
        roles = self.unique(self.roles, "role")
        bindings = self.unique(self.bindings, "binding")
        api_keys = self.unique(self.api_keys, "api key")
        key_hashes: dict[str, ApiKey] = {}
        for key in api_keys:
            if key.key_sha256 in key_hashes:
                first = key_hashes[key.key_sha256]
                self.error(
                    key.source,
                    f"api key '{key.name}' has the same key_sha256 as '{first.name}' "
                    f"({first.source}); each key must be distinct",
                )
            else:
                key_hashes[key.key_sha256] = key
        self.unique([_Named(r, r.source) for g in gateways for r in g.routes], "route")
        listen: dict[tuple[str, int], tuple[str, Source]] = {}
        listeners = [(f"gateway '{g.name}'", g.address, g.port, g.source) for g in gateways]
        listeners += [
            (f"sidecar of service '{s.name}'", s.sidecar.address, s.sidecar.port, s.source)
            for s in services
            if s.sidecar is not None
        ]
        for what, address, port, source in listeners:
            key = (address, port)
            if key in listen:
                other, other_source = listen[key]
                self.error(
                    source,
                    f"{what} listens on {address}:{port}, already used by {other} "
                    f"({other_source}); pick another port",
                )
            listen[key] = (what, source)
        gateway_names = {g.name: g for g in gateways}
        for svc in services:
            group = Policy.sidecar_group(svc.name)
            if svc.sidecar is not None and group in gateway_names:
                self.error(
                    gateway_names[group].source,
                    f"gateway '{group}' has the node group name of the sidecar of service "
                    f"'{svc.name}'; rename the gateway",
                )
        issuer_urls: dict[str, Issuer] = {}
        for iss in issuers:
            if iss.issuer in issuer_urls:
                self.error(
                    iss.source,
                    f"issuer '{iss.name}' repeats issuer URL '{iss.issuer}' "
                    f"of '{issuer_urls[iss.issuer].name}'; each 'iss' needs one entry",
                )
            issuer_urls[iss.issuer] = iss
        service_names = {s.name for s in services}
        for gw in gateways:
            for route in gw.routes:
                if route.name.endswith(".inbound") and route.name[: -len(".inbound")] in (
                    service_names
                ):
                    self.error(
                        route.source,
                        f"route name '{route.name}' is reserved for the inbound route of "
                        "that service's sidecar; rename the route",
                    )
        for ref, source, what in self.service_refs:
            if ref not in service_names:
                self.error(
                    source,
                    f"{what}: service '{ref}' is not defined; define it under "
                    f"'services' or use one of: {_names(service_names)}",
                )
        role_names = {r.name for r in roles}
        for ref, source, what in self.role_refs:
            if ref not in role_names:
                self.error(
                    source,
                    f"{what}: role '{ref}' is not defined; define it under "
                    f"'roles' or use one of: {_names(role_names)}",
                )
        if self.issues:
            raise PolicyError(self.issues)
        return Policy.build(
            services=tuple(services),
            gateways=tuple(gateways),
            issuers=tuple(issuers),
            roles=tuple(roles),
            bindings=tuple(bindings),
            api_keys=tuple(api_keys),
            default_action="deny",
            mesh=self.mesh[0] if self.mesh else Mesh(),
            files=files,
        )


def spiffe_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a SPIFFE ID pattern (None when it is one).

    ``spiffe://<trust-domain>/<segment>/...``; a segment may be ``*`` (exactly one
    segment), and a trailing ``*`` segment matches one or more segments.
    """
    prefix = "spiffe://"
    if not pattern.startswith(prefix):
        return "is not a SPIFFE ID pattern; it must start with 'spiffe://'"
    domain, _, path = pattern[len(prefix) :].partition("/")
    if not _TRUST_DOMAIN_RE.match(domain):
        return f"has an invalid trust domain '{domain}' (lowercase letters, digits, '.', '-', '_')"
    if not path:
        return "names no workload; add a path such as /ns/<namespace>/sa/<name>"
    for segment in path.split("/"):
        if segment != "*" and not _SPIFFE_SEGMENT_RE.match(segment):
            return (
                f"has an invalid path segment '{segment}'; use letters, digits, '.', '-', "
                "'_', or '*' for a whole segment"
            )
    return None


def _names(names: set[str]) -> str:
    return ", ".join(sorted(names)) if names else "(none defined)"


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, ScalarNode):
        tag = node.tag.rsplit(":", 1)[-1]
        names = {
            "str": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "a boolean",
            "null": "nothing (null)",
        }
        shown = f" {node.value!r}" if node.tag != _NULL else ""
        return names.get(tag, tag) + shown
    return "something else"
