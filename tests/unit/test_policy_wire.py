"""meshward.v1.PolicyResource: the policy as authz receives it over ADS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf.any_pb2 import Any as AnyMessage

from meshward.policy import wire
from meshward.policy.loader import load_policy
from meshward.policy.model import Policy
from tests.policy_files import VALID_POLICY, write_policy
from xds_server import resources as rs


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return load_policy(write_policy(tmp_path / "policy"))


def test_round_trip_gives_an_equal_policy_with_the_same_version(policy: Policy) -> None:
    message = wire.to_resource(policy)
    assert getattr(message, "version") == policy.version  # noqa: B009
    # Through bytes, as on the wire.
    received = wire.PolicyResource.FromString(message.SerializeToString())
    decoded = wire.from_resource(received)
    assert decoded == policy
    assert decoded.version == policy.version
    assert decoded.canonical_json() == policy.canonical_json()
    # Fields outside equality travel too: the JWKS, and sources become <xds>.
    assert decoded.issuers[0].jwks == policy.issuers[0].jwks
    assert len(decoded.issuers[0].jwks["keys"]) == 2
    assert decoded.gateways[0].routes[0].source == wire.XDS_SOURCE
    assert decoded.issuers[0].source == wire.XDS_SOURCE
    assert isinstance(decoded.gateways[0].routes, tuple)
    assert isinstance(decoded.gateways[0].routes[0].match.methods, tuple)


def test_packs_into_any_with_the_xds_policy_type_url(policy: Policy) -> None:
    packed = rs.pack(wire.to_resource(policy))
    assert packed.type_url == rs.POLICY == wire.TYPE_URL
    assert rs.type_url_of(wire.to_resource(policy)) == rs.POLICY
    assert rs.resource_name(wire.to_resource(policy)) == "policy"
    unpacked = wire.PolicyResource()
    assert AnyMessage.FromString(packed.SerializeToString()).Unpack(unpacked)
    assert wire.from_resource(unpacked) == policy


def _tampered(policy: Policy, edit: object) -> object:
    data = json.loads(policy.canonical_json())
    edit(data)  # type: ignore[operator]
    return wire.PolicyResource(version=policy.version, policy_json=json.dumps(data))


def test_changed_content_with_the_old_version_is_rejected(policy: Policy) -> None:
    def grant_bob(data: dict[str, object]) -> None:
        data["bindings"][0]["subjects"].append("bob")  # type: ignore[index]

    with pytest.raises(wire.WireError, match="version mismatch") as info:
        wire.from_resource(_tampered(policy, grant_bob))  # type: ignore[arg-type]
    assert policy.version in str(info.value)


def test_wrong_carried_version_is_rejected(policy: Policy) -> None:
    message = wire.PolicyResource(version="000000000000", policy_json=policy.canonical_json())
    with pytest.raises(wire.WireError, match="version mismatch"):
        wire.from_resource(message)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ("{not json", "not JSON"),
        ("[]", "expected an object"),
        ('{"services": []}', "missing"),
    ],
)
def test_malformed_json_is_rejected(policy: Policy, payload: str, needle: str) -> None:
    message = wire.PolicyResource(version=policy.version, policy_json=payload)
    with pytest.raises(wire.WireError, match=needle):
        wire.from_resource(message)


def test_wrong_shapes_name_the_place(policy: Policy) -> None:
    def port_as_string(data: dict[str, object]) -> None:
        data["gateways"][0]["port"] = "80"  # type: ignore[index]

    def unknown_key(data: dict[str, object]) -> None:
        data["roles"][0]["extra"] = 1  # type: ignore[index]

    def bool_port(data: dict[str, object]) -> None:
        data["services"][0]["endpoints"][0]["port"] = True  # type: ignore[index]

    for edit, needle in (
        (port_as_string, r"gateways\[0\]\.port: expected an integer"),
        (unknown_key, r"roles\[0\]: unknown 'extra'"),
        (bool_port, r"services\[0\]\.endpoints\[0\]\.port: expected an integer"),
    ):
        with pytest.raises(wire.WireError, match=needle):
            wire.from_resource(_tampered(policy, edit))  # type: ignore[arg-type]


def test_other_message_types_are_rejected() -> None:
    with pytest.raises(wire.WireError, match=r"expected a meshward\.v1\.PolicyResource"):
        wire.from_resource(AnyMessage())


def test_round_trip_with_api_keys_keeps_hashes_subjects_and_groups(tmp_path: Path) -> None:
    api_keys = (
        "api_keys:\n"
        "  - name: alice-script\n"
        f"    key_sha256: {'ab' * 32}\n"
        "    subject: alice\n"
        "  - name: ci\n"
        f"    key_sha256: {'12' * 32}\n"
        "    subject: ci-bot\n"
        "    groups: [customers]\n"
    )
    policy = load_policy(write_policy(tmp_path / "keys", text=VALID_POLICY + api_keys))
    assert len(policy.api_keys) == 2
    message = wire.to_resource(policy)
    carried = json.loads(getattr(message, "policy_json"))  # noqa: B009
    assert carried["api_keys"][0]["key_sha256"] == "ab" * 32
    decoded = wire.from_resource(wire.PolicyResource.FromString(message.SerializeToString()))
    assert decoded == policy and decoded.version == policy.version
    assert decoded.api_keys == policy.api_keys
    assert decoded.api_keys[1].groups == ("customers",)
    assert isinstance(decoded.api_keys[1].groups, tuple)
    assert decoded.api_keys[0].source == wire.XDS_SOURCE

    def drop_groups(data: dict[str, object]) -> None:
        del data["api_keys"][1]["groups"]  # type: ignore[index]

    with pytest.raises(wire.WireError, match=r"api_keys\[1\]: missing 'groups'"):
        wire.from_resource(_tampered(policy, drop_groups))  # type: ignore[arg-type]
