"""The policy on the wire: ``meshward.v1.PolicyResource``, the xDS resource authz receives.

The message is declared here without protoc, as if from ``meshward/v1/policy.proto``::

    package meshward.v1;
    message PolicyResource {
      string version = 1;      // Policy.version (content hash of policy_json)
      string policy_json = 2;  // Policy.canonical_json()
    }

It is added to protobuf's default descriptor pool at import, so it packs into an
``Any`` as ``type.googleapis.com/meshward.v1.PolicyResource`` (= ``xds_server.resources.
POLICY``) and any process that imports this module can unpack it.

The payload is the canonical JSON whose hash *is* the policy version, so the receiver
rebuilds the :class:`~meshward.policy.model.Policy` and recomputes the version: a
mismatch (corruption, or a sender whose model differs from ours) is a :class:`WireError`,
never a silently different policy. JWKS documents and API key hashes (never keys)
travel inside the JSON; source positions do not (rebuilt objects point at ``<xds>``).
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from meshward.policy.model import (
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

PROTO_FILE = "meshward/v1/policy.proto"
PROTO_PACKAGE = "meshward.v1"
MESSAGE_NAME = "PolicyResource"
FULL_NAME = f"{PROTO_PACKAGE}.{MESSAGE_NAME}"
TYPE_URL = f"type.googleapis.com/{FULL_NAME}"

#: The node group (``node.cluster``) authz replicas announce to fetch the policy over ADS.
AUTHZ_GROUP = "meshward-authz"

#: Where rebuilt policy objects say they came from.
XDS_SOURCE = Source("<xds>", 0)

T = TypeVar("T")


class WireError(ValueError):
    """A PolicyResource that does not decode into the policy it claims to carry."""


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    string = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    return descriptor_pb2.FileDescriptorProto(
        name=PROTO_FILE,
        package=PROTO_PACKAGE,
        syntax="proto3",
        message_type=[
            descriptor_pb2.DescriptorProto(
                name=MESSAGE_NAME,
                field=[
                    descriptor_pb2.FieldDescriptorProto(
                        name="version", number=1, type=string, label=optional, json_name="version"
                    ),
                    descriptor_pb2.FieldDescriptorProto(
                        name="policy_json",
                        number=2,
                        type=string,
                        label=optional,
                        json_name="policyJson",
                    ),
                ],
            )
        ],
    )


def _message_class() -> type[Message]:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(PROTO_FILE)
    except KeyError:
        pool.AddSerializedFile(_file_descriptor().SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(FULL_NAME))


#: The generated message class (fields ``version`` and ``policy_json``).
PolicyResource: type[Message] = _message_class()


def to_resource(policy: Policy) -> Message:
    """The ``PolicyResource`` carrying ``policy`` (its version and canonical JSON)."""
    return PolicyResource(version=policy.version, policy_json=policy.canonical_json())


def from_resource(message: Message) -> Policy:
    """Rebuild the :class:`Policy` a ``PolicyResource`` carries; raises :class:`WireError`
    if the JSON does not match the policy model or its version is not the carried one."""
    if message.DESCRIPTOR.full_name != FULL_NAME:
        raise WireError(f"expected a {FULL_NAME}, got a {message.DESCRIPTOR.full_name}")
    carried = str(getattr(message, "version"))  # noqa: B009
    try:
        data = json.loads(str(getattr(message, "policy_json")))  # noqa: B009
    except ValueError as error:
        raise WireError(
            f"policy {carried or '(no version)'}: policy_json is not JSON: {error}"
        ) from None
    try:
        policy = _decode_policy(data)
    except _ShapeError as error:
        raise WireError(
            f"policy {carried or '(no version)'}: policy_json does not match the policy "
            f"model at {error.path or '(top)'}: {error}; is the xDS server a different "
            "meshward version?"
        ) from None
    if policy.version != carried:
        raise WireError(
            f"policy version mismatch: the resource says {carried!r} but its content hashes "
            f"to {policy.version!r} (corrupted or tampered payload); rejected"
        )
    return policy


# ---- JSON → model ---------------------------------------------------------------------


class _ShapeError(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


#: Model fields that are not part of the canonical JSON, and what they get on decode.
_LOCAL_FIELDS: dict[str, Any] = {"source": XDS_SOURCE, "jwks_file": ""}
_POLICY_PARTS: dict[str, type[Any]] = {
    "services": Service,
    "gateways": Gateway,
    "issuers": Issuer,
    "roles": Role,
    "bindings": Binding,
    "api_keys": ApiKey,
}
# Types the decoder may meet, resolved once (the model uses postponed annotations).
_HINTS: dict[type[Any], dict[str, Any]] = {
    cls: typing.get_type_hints(cls)
    for cls in (
        Service,
        Endpoint,
        Sidecar,
        Gateway,
        GatewayTls,
        Route,
        RouteMatch,
        Issuer,
        Role,
        Permission,
        Binding,
        ApiKey,
        Mesh,
        MfaRequirement,
        HeaderMatch,
        ClaimCondition,
        Responses,
        Tracing,
    )
}


def _decode_policy(data: Any) -> Policy:
    expected = {*_POLICY_PARTS, "default_action", "mesh", "responses", "tracing"}
    if not isinstance(data, dict):
        raise _ShapeError("", f"expected an object, got {type(data).__name__}")
    _check_keys(data, expected, "")
    parts = {
        key: tuple(
            _decode(cls, item, f"{key}[{i}]") for i, item in enumerate(_list(data[key], key))
        )
        for key, cls in _POLICY_PARTS.items()
    }
    default_action = data["default_action"]
    if not isinstance(default_action, str):
        raise _ShapeError("default_action", "expected a string")
    mesh = _decode(Mesh, data["mesh"], "mesh")
    responses = _decode(Responses, data["responses"], "responses")
    tracing = _value(Tracing | None, data["tracing"], "tracing")
    return Policy.build(
        default_action=default_action, mesh=mesh, responses=responses, tracing=tracing, **parts
    )


def _decode(cls: type[T], data: Any, path: str) -> T:
    if not isinstance(data, dict):
        raise _ShapeError(path, f"expected an object, got {type(data).__name__}")
    hints = _HINTS[cls]
    assert is_dataclass(cls)
    wire_fields = [f for f in fields(cls) if f.name not in _LOCAL_FIELDS]
    required = {f.name for f in wire_fields}
    _check_keys(data, required, path)
    kwargs = {f.name: _value(hints[f.name], data[f.name], f"{path}.{f.name}") for f in wire_fields}
    kwargs.update({f.name: _LOCAL_FIELDS[f.name] for f in fields(cls) if f.name in _LOCAL_FIELDS})
    return cls(**kwargs)


def _value(hint: Any, data: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is str:
        if not isinstance(data, str):
            raise _ShapeError(path, f"expected a string, got {type(data).__name__}")
        return data
    if hint is bool:
        if not isinstance(data, bool):
            raise _ShapeError(path, f"expected a boolean, got {type(data).__name__}")
        return data
    if hint is int:
        if not isinstance(data, int) or isinstance(data, bool):
            raise _ShapeError(path, f"expected an integer, got {type(data).__name__}")
        return data
    if hint is float:
        # Kept as decoded (an int stays an int), so the canonical JSON, hence the
        # version, is the sender's: the loader always gives floats; Python code may not.
        if not isinstance(data, int | float) or isinstance(data, bool):
            raise _ShapeError(path, f"expected a number, got {type(data).__name__}")
        return data
    if origin is tuple:
        (item, _) = typing.get_args(hint)
        return tuple(_value(item, v, f"{path}[{i}]") for i, v in enumerate(_list(data, path)))
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if data is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _value(inner, data, path)
    if origin is dict:
        if not isinstance(data, dict):
            raise _ShapeError(path, f"expected an object, got {type(data).__name__}")
        return data
    if isinstance(hint, type) and hint in _HINTS:
        return _decode(hint, data, path)
    raise _ShapeError(path, f"cannot decode a {hint!r}")  # a model change missed here


def _list(data: Any, path: str) -> list[Any]:
    if not isinstance(data, list):
        raise _ShapeError(path, f"expected a list, got {type(data).__name__}")
    return data


def _check_keys(data: dict[str, Any], expected: set[str], path: str) -> None:
    missing = sorted(expected - set(data))
    unknown = sorted(set(data) - expected)
    if missing:
        raise _ShapeError(path, f"missing {', '.join(map(repr, missing))}")
    if unknown:
        raise _ShapeError(path, f"unknown {', '.join(map(repr, unknown))}")
