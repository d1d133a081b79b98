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
import math
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from meshward.policy.errors import PolicyError, PolicyIssue
from meshward.policy.matching import (
    cidr_problem,
    header_name_problem,
    host_pattern_problem,
    normalize_cidr,
    path_pattern_problem,
)
from meshward.policy.model import (
    EFFECTS,
    HTTP_METHODS,
    JWT_ALGORITHMS,
    MODES,
    TLS_VERSIONS,
    ApiKey,
    Binding,
    ClaimCondition,
    Endpoint,
    Gateway,
    GatewayTls,
    HeaderMatch,
    Issuer,
    Mesh,
    MfaRequirement,
    Permission,
    Policy,
    Responses,
    Role,
    Route,
    RouteMatch,
    Service,
    Sidecar,
    Source,
    Tracing,
)
from meshward.policy.yaml_source import YamlSyntaxError, compose

T = TypeVar("T")

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)"
    r"(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*$"
)
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
    "responses",
    "tracing",
    "default",
)
_SHA256_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?$")
_SPIFFE_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
#: Headers ``responses.headers`` may not name: Envoy's, the credential's, meshward's own.
_RESERVED_RESPONSE_HEADERS = frozenset(
    {"authorization", "host", "content-length", "content-type", "te", "connection",
     "transfer-encoding", "x-api-key", "x-meshward-decision-id", "x-request-id",
     "x-forwarded-client-cert", "x-forwarded-for", "traceparent", "tracestate"}
)  # fmt: skip


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
    responses: tuple[Responses, Source] | None = None
    tracing: tuple[Tracing, Source] | None = None
    # min_acr values routes demand: checked against the issuers' acr_levels at the end.
    acr_refs: list[tuple[str, Source, str]] = field(default_factory=list)
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
            "responses": self.read_responses,
            "tracing": self.read_tracing,
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

    def boolean(self, node: Node, what: str) -> bool | None:
        if not isinstance(node, ScalarNode) or node.tag != _BOOL:
            self.error(node, f"{what}: expected true or false, got {_kind(node)}")
            return None
        return str(node.value).lower() in ("true", "yes", "on")

    def choice(self, node: Node, what: str, options: tuple[str, ...]) -> str | None:
        value = self.string(node, what)
        if value is not None and value not in options:
            self.error(node, f"{what}: '{value}' is not one of: {', '.join(options)}")
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
            node,
            what,
            allowed=("name", "match", "service", "mfa"),
            required=("name", "match", "service"),
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
        mfa = self.read_mfa(fields["mfa"][1], f"{what}.mfa") if "mfa" in fields else None
        if name is None or match is None or service is None or (mfa is None and "mfa" in fields):
            return None
        return Route(name, match, service, mfa=mfa, source=self.src(node))

    def read_mfa(self, node: Node, what: str) -> MfaRequirement | None:
        """``{amr: [..], min_acr: level, max_age_seconds: n}``: what the route demands."""
        fields = self.mapping(node, what, allowed=("amr", "min_acr", "max_age_seconds"))
        if fields is None:
            return None
        amr: tuple[str, ...] = ()
        if "amr" in fields:
            amr = tuple(dict.fromkeys(a for a, _ in self.strings(fields["amr"][1], f"{what}.amr")))
        min_acr = ""
        if "min_acr" in fields:
            min_acr = self.string(fields["min_acr"][1], f"{what}.min_acr") or ""
            if min_acr:
                self.acr_refs.append((min_acr, self.src(fields["min_acr"][1]), f"{what}.min_acr"))
        max_age = 0
        if "max_age_seconds" in fields:
            max_age = (
                self.integer(fields["max_age_seconds"][1], f"{what}.max_age_seconds", 1, 86400 * 30)
                or 0
            )
        if not amr and not min_acr:
            self.error(
                node,
                f"{what}: demands nothing; list 'amr' methods (like [mfa, otp, hwk]) "
                "and/or a 'min_acr' level",
            )
            return None
        return MfaRequirement(amr=amr, min_acr=min_acr, max_age_seconds=max_age)

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
            problem = host_pattern_problem(host)
            if problem:
                self.error(host_node, f"{what}.hosts: '{host}' {problem}")
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
                "jwks_uri",
                "jwks_ca_file",
                "jwks_refresh_seconds",
                "jwks_min_refresh_seconds",
                "algorithms",
                "subject_claim",
                "groups_claim",
                "clock_skew_seconds",
                "acr_levels",
            ),
            required=("name", "issuer", "audiences"),
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
        ints: dict[str, int | None] = {
            "clock_skew_seconds": 30,
            "jwks_refresh_seconds": 300,
            "jwks_min_refresh_seconds": 10,
        }
        ranges = {
            "clock_skew_seconds": (0, 300),
            "jwks_refresh_seconds": (10, 86400),
            "jwks_min_refresh_seconds": (0, 3600),
        }
        for key, (low, high) in ranges.items():
            if key in fields:
                ints[key] = self.integer(fields[key][1], f"{what}.{key}", low, high)
        acr_levels: tuple[str, ...] = ()
        if "acr_levels" in fields:
            levels = []
            for level, lnode in self.strings(fields["acr_levels"][1], f"{what}.acr_levels"):
                # They are quoted, space-separated, in the RFC 9470 challenge's acr_values.
                if not level.isprintable() or any(c in level for c in ' "\\'):
                    self.error(
                        lnode,
                        f"{what}.acr_levels: '{level}' may not contain spaces, quotes, "
                        "backslashes or control characters",
                    )
                elif level not in levels:
                    levels.append(level)
            acr_levels = tuple(levels)
        keys = self.read_issuer_keys(node, fields, what)
        if (
            name is None
            or issuer is None
            or keys is None
            or not audiences
            or None in claims.values()
            or None in ints.values()
        ):
            return None
        jwks, jwks_file, jwks_uri, jwks_ca_pem = keys
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
                clock_skew_seconds=ints["clock_skew_seconds"] or 0,
                jwks_uri=jwks_uri,
                jwks_ca_pem=jwks_ca_pem,
                jwks_refresh_seconds=ints["jwks_refresh_seconds"] or 300,
                jwks_min_refresh_seconds=ints["jwks_min_refresh_seconds"] or 0,
                acr_levels=acr_levels,
                source=self.src(node),
            ),
            self.src(node),
        )

    def read_issuer_keys(
        self, node: Node, fields: dict[str, tuple[Node, Node]], what: str
    ) -> tuple[dict[str, Any], str, str, str] | None:
        """Exactly one of ``jwks_file`` (read now) and ``jwks_uri`` (fetched by authz):
        ``(jwks, jwks_file, jwks_uri, jwks_ca_pem)``."""
        if ("jwks_file" in fields) == ("jwks_uri" in fields):
            self.error(
                node,
                f"{what}: set exactly one of 'jwks_file' (a JWKS file next to the policy) "
                "or 'jwks_uri' (an HTTPS URL authz fetches the keys from)",
            )
            return None
        if "jwks_file" in fields:
            for key in ("jwks_ca_file", "jwks_refresh_seconds", "jwks_min_refresh_seconds"):
                if key in fields:
                    self.error(fields[key][0], f"{what}.{key}: only applies with 'jwks_uri'")
            jwks_node = fields["jwks_file"][1]
            rel = self.string(jwks_node, f"{what}.jwks_file")
            if rel is None:
                return None
            resolved = Path(self.file).parent / rel
            jwks = self.read_jwks(resolved, jwks_node, f"{what}.jwks_file")
            return None if jwks is None else (jwks, str(resolved), "", "")
        uri_node = fields["jwks_uri"][1]
        uri = self.string(uri_node, f"{what}.jwks_uri")
        if uri is not None:
            parsed = urllib.parse.urlsplit(uri)
            if parsed.scheme != "https" or not parsed.hostname:
                self.error(
                    uri_node,
                    f"{what}.jwks_uri: '{uri}' is not an https:// URL; keys must be fetched "
                    "over verified TLS (use the issuer's https JWKS endpoint)",
                )
                uri = None
            elif parsed.username or parsed.password:
                self.error(uri_node, f"{what}.jwks_uri: must not carry credentials")
                uri = None
        ca_pem = ""
        if "jwks_ca_file" in fields:
            ca_node = fields["jwks_ca_file"][1]
            rel = self.string(ca_node, f"{what}.jwks_ca_file")
            if rel is None:
                return None
            ca_pem = self.read_ca_bundle(Path(self.file).parent / rel, ca_node, what) or ""
            if not ca_pem:
                return None
        return None if uri is None else ({}, "", uri, ca_pem)

    def read_ca_bundle(self, path: Path, node: Node, what: str) -> str | None:
        """A PEM file of CA certificates (checked to parse), as text."""
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.error(
                node,
                f"{what}.jwks_ca_file: cannot read {path}: {reason}; give the PEM file of "
                "the CA that signed the JWKS server's certificate (relative to this file)",
            )
            return None
        from cryptography import x509  # local: keeps `meshward check` start-up light

        try:
            certs = x509.load_pem_x509_certificates(text.encode())
        except ValueError:
            certs = []
        if not certs:
            self.error(
                node,
                f"{what}.jwks_ca_file: {path} holds no PEM certificate; it must contain "
                "'-----BEGIN CERTIFICATE-----' blocks",
            )
            return None
        return text

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
            node,
            what,
            allowed=("methods", "paths", "hosts", "ports", "headers", "services"),
            required=("paths",),
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
            problem = path_pattern_problem(pattern)
            if problem:
                self.error(pnode, f"{what}.paths: '{pattern}' {problem}")
            elif pattern not in paths:
                paths.append(pattern)
        hosts: list[str] = []
        for host, hnode in (
            self.strings(fields["hosts"][1], f"{what}.hosts") if "hosts" in fields else []
        ):
            problem = host_pattern_problem(host)
            if problem:
                self.error(hnode, f"{what}.hosts: '{host}' {problem}")
            elif host.lower() not in hosts:
                hosts.append(host.lower())
        if "*" in hosts:
            hosts = []
        ports: list[int] = []
        if "ports" in fields:
            for i, pnode in enumerate(self.sequence(fields["ports"][1], f"{what}.ports") or []):
                port = self.integer(pnode, f"{what}.ports[{i}]", 1, 65535)
                if port is not None and port not in ports:
                    ports.append(port)
        headers = self.read_header_matches(fields["headers"][1], f"{what}.headers") if (
            "headers" in fields
        ) else ()  # fmt: skip
        services = []
        if "services" in fields:
            for svc, snode in self.strings(fields["services"][1], f"{what}.services"):
                self.service_refs.append((svc, self.src(snode), f"{what}.services"))
                services.append(svc)
        if not paths or headers is None:
            return None
        return Permission(
            methods=methods,
            paths=tuple(paths),
            services=tuple(services),
            hosts=tuple(hosts),
            ports=tuple(ports),
            headers=headers,
        )

    def read_header_matches(self, node: Node, what: str) -> tuple[HeaderMatch, ...] | None:
        """``{name: value-pattern}``: headers a request must carry."""
        if not isinstance(node, MappingNode):
            self.error(
                node,
                f"{what}: expected a mapping of header name to value ('*': present, "
                f"'prefix*', or an exact value), got {_kind(node)}",
            )
            return None
        out: dict[str, HeaderMatch] = {}
        for key_node, value_node in node.value:
            name = self.string(key_node, f"{what} key")
            value = self.string(value_node, f"{what}.{name}")
            if name is None or value is None:
                continue
            name = name.lower()
            problem = header_name_problem(name)
            if problem:
                self.error(key_node, f"{what}: '{name}' {problem}")
            elif name in out:
                self.error(key_node, f"{what}: header '{name}' listed twice; keep one")
            else:
                out[name] = HeaderMatch(name, value)
        return tuple(out.values())

    def read_binding(self, node: Node, what: str) -> _Named | None:
        fields = self.mapping(
            node,
            what,
            allowed=(
                "name",
                "role",
                "subjects",
                "groups",
                "workloads",
                "effect",
                "mode",
                "source_ips",
                "not_source_ips",
                "claims",
            ),
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
        effect = self.choice(fields["effect"][1], f"{what}.effect", EFFECTS) if (
            "effect" in fields
        ) else "allow"  # fmt: skip
        mode = self.choice(fields["mode"][1], f"{what}.mode", MODES) if (
            "mode" in fields
        ) else "enforce"  # fmt: skip
        cidrs: dict[str, tuple[str, ...]] = {}
        for key in ("source_ips", "not_source_ips"):
            found = []
            for value, vnode in (
                self.strings(fields[key][1], f"{what}.{key}") if key in fields else []
            ):
                problem = cidr_problem(value)
                if problem:
                    self.error(vnode, f"{what}.{key}: '{value}' {problem}")
                else:
                    found.append(normalize_cidr(value))
            cidrs[key] = tuple(dict.fromkeys(found))
        claims = self.read_claim_conditions(fields["claims"][1], f"{what}.claims") if (
            "claims" in fields
        ) else ()  # fmt: skip
        if not subjects and not groups and not workloads and effect == "allow":
            self.error(
                node,
                f"{what}: grants its role to nobody; list 'subjects', 'groups' and/or "
                "'workloads' (only a deny binding may name none: it then applies to everyone)",
            )
            return None
        if name is None or role is None or effect is None or mode is None or claims is None:
            return None
        return _Named(
            Binding(
                name,
                role,
                subjects,
                groups,
                tuple(workloads),
                effect=effect,
                mode=mode,
                source_ips=cidrs["source_ips"],
                not_source_ips=cidrs["not_source_ips"],
                claims=claims,
                source=self.src(node),
            ),
            self.src(node),
        )

    def read_claim_conditions(self, node: Node, what: str) -> tuple[ClaimCondition, ...] | None:
        """``{claim.path: value | [values]}``; scalars may be strings, numbers or booleans."""
        if not isinstance(node, MappingNode):
            self.error(
                node,
                f"{what}: expected a mapping of claim path to accepted value(s), like "
                "'{realm_access.roles: [admin]}', got " + _kind(node),
            )
            return None
        out: list[ClaimCondition] = []
        for key_node, value_node in node.value:
            path = self.string(key_node, f"{what} key")
            if path is None:
                continue
            items = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            values = []
            for item in items:
                if isinstance(item, ScalarNode) and item.tag in (_STR, _INT, _BOOL) and item.value:
                    text = str(item.value)
                    if item.tag == _BOOL:  # YAML 1.1 spellings (yes/on/…) as JSON text
                        text = "true" if text.lower() in ("true", "yes", "on", "y") else "false"
                    values.append(text)
                else:
                    self.error(
                        item,
                        f"{what}.{path}: expected a string, number or boolean, got {_kind(item)}",
                    )
            if not values:
                if isinstance(value_node, SequenceNode) and not value_node.value:
                    self.error(value_node, f"{what}.{path}: list at least one accepted value")
                continue
            out.append(ClaimCondition(path, tuple(dict.fromkeys(values))))
        return tuple(out)

    def read_responses(self, node: Node) -> None:
        """``responses: {headers: {subject|groups|workload: name|null}, remove_authorization}``."""
        fields = self.mapping(node, "responses", allowed=("headers", "remove_authorization"))
        if fields is None:
            return
        if self.responses is not None:
            self.error(node, f"responses: set again (first at {self.responses[1]}); keep one")
            return
        defaults = Responses()
        names = {
            "subject": defaults.subject_header,
            "groups": defaults.groups_header,
            "workload": defaults.workload_header,
        }
        ok = True
        if "headers" in fields:
            headers = self.mapping(
                fields["headers"][1], "responses.headers", allowed=("subject", "groups", "workload")
            )
            for key, (_, value_node) in (headers or {}).items():
                if isinstance(value_node, ScalarNode) and value_node.tag == _NULL:
                    names[key] = ""  # not sent
                    continue
                value = self.string(value_node, f"responses.headers.{key}")
                if value is None:
                    ok = False
                    continue
                value = value.lower()
                problem = header_name_problem(value)
                if problem or value.startswith(":"):
                    self.error(
                        value_node,
                        f"responses.headers.{key}: '{value}' {problem or 'is a pseudo-header'}",
                    )
                    ok = False
                elif value in _RESERVED_RESPONSE_HEADERS:
                    self.error(
                        value_node,
                        f"responses.headers.{key}: '{value}' is reserved (a credential, "
                        "transport or meshward header); pick another name like 'x-user'",
                    )
                    ok = False
                else:
                    names[key] = value
            sent = [n for n in names.values() if n]
            if len(sent) != len(set(sent)):
                self.error(
                    fields["headers"][1], "responses.headers: each fact needs its own header name"
                )
                ok = False
        remove = False
        if "remove_authorization" in fields:
            flag = self.boolean(fields["remove_authorization"][1], "responses.remove_authorization")
            ok = ok and flag is not None
            remove = bool(flag)
        if ok:
            self.responses = (
                Responses(
                    subject_header=names["subject"],
                    groups_header=names["groups"],
                    workload_header=names["workload"],
                    remove_authorization=remove,
                ),
                self.src(node),
            )

    def read_tracing(self, node: Node) -> None:
        """``tracing: {collector: {address, port}, sampling_percent}``: where every proxy
        exports its spans (OTLP/gRPC, plaintext) and the percent of requests it traces."""
        fields = self.mapping(
            node, "tracing", allowed=("collector", "sampling_percent"), required=("collector",)
        )
        if fields is None:
            return
        if self.tracing is not None:
            self.error(node, f"tracing: set again (first at {self.tracing[1]}); keep one")
            return
        collector = None
        if "collector" in fields:
            collector = self.read_collector(fields["collector"][1], "tracing.collector")
        percent: float | None = 100.0
        if "sampling_percent" in fields:
            percent = self.percent(fields["sampling_percent"][1], "tracing.sampling_percent")
        if collector is None or percent is None:
            return
        address, port = collector
        self.tracing = (Tracing(address, port, percent, source=self.src(node)), self.src(node))

    def read_collector(self, node: Node, what: str) -> tuple[str, int] | None:
        """The OTLP/gRPC collector: an IP or DNS name to connect to, and a port."""
        fields = self.mapping(node, what, allowed=("address", "port"), required=("address", "port"))
        if fields is None or len(fields) < 2:
            return None
        address = self.string(fields["address"][1], f"{what}.address")
        port = self.integer(fields["port"][1], f"{what}.port", 1, 65535)
        if address is not None:
            if not _is_ip(address) and not _HOSTNAME_RE.match(address):
                self.error(
                    fields["address"][1],
                    f"{what}.address: '{address}' is neither an IP address nor a DNS name; "
                    "give the collector's address, like 127.0.0.1 or otel-collector",
                )
                return None
            if _is_ip(address) and ipaddress.ip_address(address).is_unspecified:
                self.error(
                    fields["address"][1],
                    f"{what}.address: '{address}' is a listen-anywhere address, not one to "
                    "connect to; give the collector's address, like 127.0.0.1",
                )
                return None
        if address is None or port is None:
            return None
        return address, port

    def percent(self, node: Node, what: str) -> float | None:
        """A number from 0 to 100 (an integer or a decimal), as a float."""
        if not isinstance(node, ScalarNode) or node.tag not in (_INT, _FLOAT):
            self.error(
                node, f"{what}: expected a number from 0 to 100 (a percent), got {_kind(node)}"
            )
            return None
        text = str(node.value).replace("_", "")
        try:
            value = float(int(text, 0)) if node.tag == _INT else float(text)
        except ValueError:  # YAML's .inf / .nan spellings
            value = math.nan
        if not math.isfinite(value) or not 0.0 <= value <= 100.0:
            self.error(node, f"{what}: {node.value} is out of range; use 0..100")
            return None
        return value

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
        acr_known = {level for iss in issuers for level in iss.acr_levels}
        for level, source, what in self.acr_refs:
            if level not in acr_known:
                self.error(
                    source,
                    f"{what}: '{level}' is in no issuer's 'acr_levels'; list the issuer's acr "
                    "values, lowest first, under 'acr_levels' so a minimum can be compared",
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
            responses=self.responses[0] if self.responses else Responses(),
            tracing=self.tracing[0] if self.tracing else None,
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
