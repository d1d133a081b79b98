"""A small view over ``CheckRequest``, parsed once per Check.

Envoy facts this relies on:

- ``attributes.request.http.path`` is the request target as the client sent it,
  query string included (``query`` and ``fragment`` are always empty), so the path is
  cut at ``?`` / ``#`` here and nothing is decoded;
- header names in ``http.headers`` are already lower case (Envoy's header map is), so
  that map is used as it is, without a copy; a non-Envoy caller sending upper-case
  names is simply not understood (``authorization`` missing → 401). With
  ``encode_raw_headers`` Envoy fills ``http.header_map`` instead (values may then be
  in ``raw_value``); it is read, lower-cased, when ``headers`` is empty;
- the route Envoy matched arrives as ``attributes.context_extensions`` written by the
  translator (keys in :mod:`meshward.route_context`); authz never re-matches paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2

from meshward import route_context


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    """What the decision needs to know about one request (empty string = absent)."""

    method: str
    #: The path without query string or fragment, undecoded.
    path: str
    host: str
    #: Request headers, lower-case names. May hold credentials: never log or trace it.
    headers: Mapping[str, str]
    #: ``attributes.source.principal``: the peer's mTLS identity (SPIFFE URI) if any.
    source_principal: str
    route: str
    service: str
    gateway: str
    #: The policy version the proxy's route was built from (may lag authz's policy).
    proxy_policy_version: str
    #: ``x-request-id``, the id Envoy's own spans and access logs carry.
    request_id: str
    #: ``attributes.source.address``: the client's IP as Envoy saw it (the downstream
    #: peer, or the trusted ``x-forwarded-for`` hop when Envoy is configured so).
    source_ip: str = ""
    #: ``attributes.destination.address``'s port: the listener the request arrived on.
    destination_port: int = 0

    @classmethod
    def of(
        cls,
        method: str,
        path: str,
        *,
        service: str = "",
        route: str = "",
        host: str = "",
        headers: Mapping[str, str] | None = None,
        source_principal: str = "",
        source_ip: str = "",
        destination_port: int = 0,
    ) -> AuthzRequest:
        """A request built from parts (CLIs, tests); absent parts are empty."""
        return cls(
            method=method.upper(),
            path=path,
            host=host,
            headers=headers if headers is not None else {},
            source_principal=source_principal,
            route=route,
            service=service,
            gateway="",
            proxy_policy_version="",
            request_id="",
            source_ip=source_ip,
            destination_port=destination_port,
        )

    @classmethod
    def from_check_request(cls, message: external_auth_pb2.CheckRequest) -> AuthzRequest:
        """Parse the parts of a ``CheckRequest`` that authz uses."""
        attributes = message.attributes
        http = attributes.request.http
        headers = _headers(http)
        path = http.path
        cut = _path_end(path)
        if cut >= 0:
            path = path[:cut]
        extensions = attributes.context_extensions
        return cls(
            method=http.method.upper(),
            path=path,
            host=http.host,
            headers=headers,
            source_principal=attributes.source.principal,
            route=extensions.get(route_context.ROUTE, ""),
            service=extensions.get(route_context.SERVICE, ""),
            gateway=extensions.get(route_context.GATEWAY, ""),
            proxy_policy_version=extensions.get(route_context.POLICY_VERSION, ""),
            request_id=headers.get("x-request-id", ""),
            source_ip=attributes.source.address.socket_address.address,
            destination_port=attributes.destination.address.socket_address.port_value,
        )


def _path_end(path: str) -> int:
    """Index where the query string or fragment starts, -1 when neither is present."""
    query = path.find("?")
    fragment = path.find("#")
    if query < 0:
        return fragment
    if fragment < 0:
        return query
    return min(query, fragment)


def _headers(http: Any) -> Mapping[str, str]:
    """``http.headers`` itself, or ``http.header_map`` as a dict with lower-case names."""
    if len(http.headers):
        return http.headers  # type: ignore[no-any-return]
    headers: dict[str, str] = {}
    for entry in http.header_map.headers:
        value = entry.raw_value.decode("utf-8", "replace") if entry.raw_value else entry.value
        key = entry.key.lower()
        # Envoy joins repeated headers with "," in the ``headers`` map; do the same.
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    return headers
