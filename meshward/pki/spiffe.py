"""SPIFFE ID and trust-domain validation, following the SPIFFE-ID specification.

A SPIFFE ID is ``spiffe://<trust domain>/<path>``: the scheme is lowercase ``spiffe``;
the trust domain uses only ``a-z 0-9 . - _`` (no port, no user info, at most 255
characters); every path segment is non-empty, is not ``.`` or ``..`` and uses only
``a-z A-Z 0-9 . - _``; there is no trailing ``/``, query or fragment; the whole ID is at
most 2048 bytes. A workload identity (what an X.509-SVID carries) must have a path.
"""

from __future__ import annotations

import re

from meshward.pki.errors import PkiError

SCHEME = "spiffe://"
_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]{1,255}$")
_SEGMENT_RE = re.compile(r"^[a-zA-Z0-9._-]+$")
_MAX_ID_BYTES = 2048


def validate_trust_domain(trust_domain: str) -> str:
    """Return ``trust_domain`` if it is a valid SPIFFE trust domain name, else raise."""
    if not _TRUST_DOMAIN_RE.match(trust_domain):
        raise PkiError(
            f"trust domain {trust_domain!r} is not a valid SPIFFE trust domain: use 1-255 "
            "lowercase letters, digits, '.', '-' or '_' (for example 'example.org')"
        )
    return trust_domain


def trust_domain_of(spiffe_id: str) -> str | None:
    """The trust domain of a well-formed ``spiffe://`` URI, or None if it is not one."""
    if not spiffe_id.startswith(SCHEME):
        return None
    domain = spiffe_id[len(SCHEME) :].split("/", 1)[0]
    return domain if _TRUST_DOMAIN_RE.match(domain) else None


def validate_workload_id(spiffe_id: str, trust_domain: str) -> str:
    """Return ``spiffe_id`` if it is a workload SPIFFE ID in ``trust_domain``, else raise.

    The error says what is wrong and what a valid ID looks like.
    """
    example = f"spiffe://{trust_domain}/ns/default/sa/<workload>"

    def bad(reason: str) -> PkiError:
        return PkiError(f"SPIFFE ID {spiffe_id!r} {reason}; use an ID like {example!r}")

    if len(spiffe_id.encode()) > _MAX_ID_BYTES:
        raise bad(f"is longer than {_MAX_ID_BYTES} bytes")
    if not spiffe_id.startswith(SCHEME):
        raise bad("does not start with 'spiffe://' (the scheme must be lowercase)")
    rest = spiffe_id[len(SCHEME) :]
    if "?" in rest or "#" in rest:
        raise bad("has a query or fragment, which SPIFFE IDs must not have")
    domain, sep, path = rest.partition("/")
    if "@" in domain or ":" in domain:
        raise bad("has user info or a port in its trust domain, which SPIFFE IDs must not have")
    if not _TRUST_DOMAIN_RE.match(domain):
        raise bad("has an invalid trust domain (only lowercase a-z, 0-9, '.', '-', '_')")
    if domain != trust_domain:
        raise bad(f"is in trust domain {domain!r}, but this CA serves {trust_domain!r}")
    if not sep or not path:
        raise bad("has no path: a workload identity needs one")
    for segment in path.split("/"):
        if not segment:
            raise bad("has an empty path segment ('//' or a trailing '/')")
        if segment in (".", ".."):
            raise bad("has a '.' or '..' path segment")
        if not _SEGMENT_RE.match(segment):
            raise bad(f"has path segment {segment!r} with characters outside a-z A-Z 0-9 . - _")
    return spiffe_id
