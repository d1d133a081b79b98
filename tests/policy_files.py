"""Helpers that write real policy directories (YAML + a real JWKS) for tests."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from joserfc.jwk import ECKey, RSAKey

from meshward.policy.errors import PolicyError
from meshward.policy.loader import load_policy

VALID_POLICY = """\
services:
  - name: orders
    endpoints:
      - address: 127.0.0.1
        port: {orders_port}
  - name: catalog
    endpoints:
      - address: 127.0.0.1
        port: {catalog_port}
gateways:
  - name: edge
    address: 127.0.0.1
    port: {gateway_port}
    routes:
      - name: orders-api
        match:
          prefix: /orders
          methods: [GET, POST]
        service: orders
      - name: catalog-api
        match:
          prefix: /catalog
        service: catalog
issuers:
  - name: test
    issuer: https://issuer.test
    audiences: [meshward-test]
    jwks_file: keys/jwks.json
roles:
  - name: orders-reader
    permissions:
      - methods: [GET]
        paths: ["/orders", "/orders/*"]
  - name: catalog-reader
    permissions:
      - methods: [GET]
        paths: ["/catalog/*"]
bindings:
  - name: alice-reads-orders
    role: orders-reader
    subjects: [alice]
  - name: customers-read-catalog
    role: catalog-reader
    groups: [customers]
default: deny
"""


def new_keys() -> tuple[RSAKey, ECKey]:
    rsa = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"}, auto_kid=True)
    ec = ECKey.generate_key("P-256", parameters={"use": "sig", "alg": "ES256"}, auto_kid=True)
    return rsa, ec


def write_jwks(path: Path, *keys: RSAKey | ECKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"keys": [k.as_dict(private=False) for k in keys]}))


def write_policy(
    directory: Path,
    text: str = VALID_POLICY,
    keys: tuple[RSAKey | ECKey, ...] | None = None,
    **ports: int,
) -> Path:
    """Write ``text`` (formatted with ports) as mesh.yaml plus keys/jwks.json."""
    values = {"orders_port": 18081, "catalog_port": 18082, "gateway_port": 18080}
    values.update(ports)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mesh.yaml").write_text(textwrap.dedent(text).format(**values))
    write_jwks(directory / "keys" / "jwks.json", *(keys or new_keys()))
    return directory


def policy_errors(directory: Path) -> list[str]:
    """The issues loading the policy in ``directory`` reports (loading must fail)."""
    with pytest.raises(PolicyError) as info:
        load_policy(directory)
    return [str(i) for i in info.value.issues]


def line_of(text: str, needle: str) -> int:
    """1-based number of the first line of ``text`` containing ``needle``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in text")
