"""What the policy's patterns and conditions mean: syntax checks and compiled matchers.

One module holds both halves so the loader (which rejects a bad pattern with a
``file:line`` error) and authz (which matches requests) can never disagree about a
pattern's syntax. Every ``*_problem`` function returns ``None`` for a valid pattern or a
phrase that completes "'<pattern>' …" and says how to fix it.

Paths (permissions' ``paths``), compared against the request path as Envoy saw it
(undecoded, query string cut):

- ``*``: any path;
- ``/orders``: exactly that path;
- ``/orders/*``: a prefix (``/orders/`` and below, not ``/orders``);
- ``*.json``: a suffix;
- ``/orders/{*}/items``, ``/static/{**}``: a segment template, Istio-style: ``{*}`` is
  exactly one non-empty segment, ``{**}`` (last segment only) the rest of the path,
  possibly empty (``/static/{**}`` matches ``/static/`` and below, not ``/static``).
  Operators fill whole segments (``/a{*}`` is an error).

Every pattern but ``*`` and an exact path needs a *plain* path: a path with a dot
segment (``.``/``..``, also percent-encoded, or behind a backslash or an encoded slash)
never matches it in an allow, since an upstream that normalizes the path could land
outside what the pattern names — and always matches it in a deny, for the same reason
(fail closed both ways). Such paths still match ``*`` and exact patterns. (Envoy
normalizes paths before ext_authz, so they are rare behind it.)

Hosts: ``api.example.com`` exactly, ``*.example.com`` for one or more labels before
``.example.com``, ``*`` for any; compared case-insensitively, without the port and
without a fully qualified name's trailing dot.

Headers: ``*`` (present, any value), ``prefix*`` (starts with), or an exact value.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

PathMatcher = Callable[[str], bool]

_HOST_PATTERN_RE = re.compile(r"^(\*\.)?[a-zA-Z0-9.-]+$|^\*$")
_HEADER_NAME_RE = re.compile(r"^:?[a-z0-9!#$%&'*+.^_`|~-]+$")
_SEGMENT_RE = re.compile(r"^[^*{}]*$")


# ---- paths ----------------------------------------------------------------------------


def path_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a path pattern (see the module docstring), or None."""
    if pattern == "*":
        return None
    if pattern.startswith("*"):
        rest = pattern[1:]
        if not rest or "*" in rest or "{" in rest or "}" in rest:
            return "is not a suffix pattern; use '*' followed by plain text, like '*.json'"
        return None
    if not pattern.startswith("/"):
        return (
            "is not a path pattern; use an exact path ('/orders'), a prefix ending in '*' "
            "('/orders/*'), a suffix ('*.json'), a template ('/orders/{*}/items') or '*'"
        )
    if "{" in pattern or "}" in pattern:
        segments = pattern[1:].split("/")
        for i, segment in enumerate(segments):
            if segment == "{**}" and i != len(segments) - 1:
                return "uses '{**}' before the last segment; '{**}' must end the template"
            if segment not in ("{*}", "{**}") and not _SEGMENT_RE.match(segment):
                return (
                    f"has segment '{segment}': a template operator must be a whole segment, "
                    "'{*}' (one segment) or '{**}' (the rest), and '*' is not allowed in it"
                )
        return None
    if "*" in pattern[:-1]:
        return "has '*' in the middle; '*' may only end a prefix ('/orders/*')"
    return None


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


class PathSet:
    """A permission's path patterns, compiled: ``matches(path, plain)``.

    Exact paths are a set lookup; prefixes and suffixes string tests; templates one
    regular expression for all of them.
    """

    __slots__ = ("any", "exact", "prefixes", "suffixes", "template")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.any = "*" in patterns
        self.exact = frozenset(p for p in patterns if _kind(p) == "exact")
        self.prefixes = tuple(p[:-1] for p in patterns if _kind(p) == "prefix")
        self.suffixes = tuple(p[1:] for p in patterns if _kind(p) == "suffix")
        templates = [_template_regex(p) for p in patterns if _kind(p) == "template"]
        self.template = re.compile("|".join(templates)) if templates else None

    def matches(self, path: str, plain: bool, *, unplain_matches: bool = False) -> bool:
        """Whether ``path`` matches; ``plain`` is :func:`is_plain_path` of it.

        A path that is not plain never matches a wildcard pattern — unless
        ``unplain_matches`` (deny rules: failing closed, it then matches every wildcard
        pattern, since where it lands after normalization is unknown)."""
        if self.any or path in self.exact:
            return True
        if not plain:
            return unplain_matches and bool(self.prefixes or self.suffixes or self.template)
        if self.prefixes and path.startswith(self.prefixes):
            return True
        if self.suffixes and path.endswith(self.suffixes):
            return True
        return self.template is not None and self.template.fullmatch(path) is not None


def _kind(pattern: str) -> str:
    if pattern == "*":
        return "any"
    if pattern.startswith("*"):
        return "suffix"
    if "{" in pattern:
        return "template"
    if pattern.endswith("*"):
        return "prefix"
    return "exact"


def _template_regex(pattern: str) -> str:
    parts = []
    for segment in pattern[1:].split("/"):
        if segment == "{*}":
            parts.append("[^/]+")
        elif segment == "{**}":
            parts.append(".*")
        else:
            parts.append(re.escape(segment))
    return "(?:/" + "/".join(parts) + ")"


# ---- hosts ----------------------------------------------------------------------------


def host_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a host pattern, or None."""
    if _HOST_PATTERN_RE.fullmatch(pattern):  # fullmatch: "$" would accept a final "\n"
        return None
    return "is not a host name (use 'api.example.com', '*.example.com' or '*')"


def request_host(authority: str) -> str:
    """The host of a ``Host``/``:authority`` value: lower case, without the port and
    without the trailing dot of a fully qualified name (``api.example.com.`` is the same
    host as ``api.example.com``)."""
    host = authority.lower()
    if host.startswith("["):  # [v6]:port
        end = host.find("]")
        return host[: end + 1] if end >= 0 else host
    colon = host.rfind(":")
    if colon >= 0 and host.count(":") == 1:
        host = host[:colon]
    return host[:-1] if host.endswith(".") else host


class HostSet:
    """Host patterns, compiled: ``matches(host)`` with ``host`` from :func:`request_host`."""

    __slots__ = ("any", "exact", "suffixes")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        lowered = [p.lower().removesuffix(".") or p for p in patterns]
        self.any = not lowered or "*" in lowered
        self.exact = frozenset(p for p in lowered if not p.startswith("*."))
        self.suffixes = tuple(p[1:] for p in lowered if p.startswith("*."))

    def matches(self, host: str) -> bool:
        if self.any or host in self.exact:
            return True
        return any(host.endswith(s) and len(host) > len(s) for s in self.suffixes)


# ---- headers --------------------------------------------------------------------------


def header_name_problem(name: str) -> str | None:
    """Why ``name`` is not an HTTP header name (lower case), or None."""
    if _HEADER_NAME_RE.fullmatch(name):  # fullmatch: "$" would accept a final "\n"
        return None
    return "is not a header name; use lower-case letters, digits and '-' (like 'x-tenant')"


def header_value_matches(pattern: str, value: str | None) -> bool:
    """``*``: present; ``prefix*``: starts with; otherwise exactly equal."""
    if value is None:
        return False
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


# ---- source addresses -----------------------------------------------------------------


def cidr_problem(value: str) -> str | None:
    """Why ``value`` is not a CIDR block or IP address, or None."""
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return "is not an IP address or CIDR block (like '10.0.0.0/8' or '2001:db8::/32')"
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError:
        return f"has host bits set; did you mean '{network}'?"
    return None


def address_problem(value: str) -> str | None:
    """Why ``value`` is not one IP address (a client address), or None."""
    if "/" in value:
        return "must be one address, not a block"
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "is not an IP address"
    return None


def normalize_cidr(value: str) -> str:
    """``10.1.2.3`` → ``10.1.2.3/32``; a valid CIDR as Python prints it."""
    return str(ipaddress.ip_network(value, strict=False))


class CidrSet:
    """CIDR blocks, compiled: ``contains(ip)`` (False for an empty or bad address)."""

    __slots__ = ("networks",)

    def __init__(self, cidrs: tuple[str, ...]) -> None:
        self.networks = tuple(_unmapped(ipaddress.ip_network(c, strict=False)) for c in cidrs)

    def contains(self, ip: str) -> bool | None:
        """Whether ``ip`` is in a block; None when the address is unknown (empty) or not
        an address — callers decide which way an unknown address fails."""
        if not ip:
            return None
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


def _unmapped(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A block of IPv4-mapped IPv6 addresses (``::ffff:10.0.0.0/104``) as the IPv4 block it
    maps, since :meth:`CidrSet.contains` compares such client addresses as IPv4."""
    mapped = getattr(network.network_address, "ipv4_mapped", None)
    if mapped is not None and network.prefixlen >= 96:
        return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
    return network


# ---- token claims ---------------------------------------------------------------------


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The claim at a dotted ``path`` (``realm_access.roles``), or None.

    A claim whose *name* is the whole path (``https://example.com/groups.v1``) wins over
    the nested reading, so URL-named claims work without escaping.
    """
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def claim_text(value: Any) -> str | None:
    """A scalar claim as compared by conditions: strings as is, numbers and booleans as
    their JSON text (``true``, ``3``); None for anything else."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(int(value)) if float(value).is_integer() else repr(value)
    return None


def claim_matches(value: Any, wanted: frozenset[str]) -> bool:
    """Whether a claim equals one of ``wanted`` or, for a list, contains one."""
    if isinstance(value, list):
        return any(claim_text(v) in wanted for v in value)
    return claim_text(value) in wanted
