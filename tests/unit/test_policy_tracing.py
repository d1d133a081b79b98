"""The policy's ``tracing`` section: what it loads into, one ``file:line`` error per bad
input, once per policy, and its trip over the wire to authz (same version)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshward.policy import wire
from meshward.policy.errors import PolicyError
from meshward.policy.loader import load_policy
from meshward.policy.model import Policy, Tracing
from tests.policy_files import VALID_POLICY, line_of, new_keys, policy_errors, write_policy

TRACING = """\
tracing:
  collector:
    address: 10.0.0.7
    port: 4317
  sampling_percent: 25
"""
TEXT = TRACING + VALID_POLICY


@pytest.fixture(scope="module")
def keys() -> tuple[object, ...]:
    return new_keys()


def load(directory: Path, text: str, keys: tuple[object, ...]) -> Policy:
    return load_policy(write_policy(directory, text, keys=keys))  # type: ignore[arg-type]


def errors_of(directory: Path, text: str, keys: tuple[object, ...]) -> list[str]:
    return policy_errors(write_policy(directory, text, keys=keys))  # type: ignore[arg-type]


def edit(before: str, after: str) -> str:
    assert TEXT.count(before) == 1, before
    return TEXT.replace(before, after)


# ---- accepted ---------------------------------------------------------------------------------


def test_tracing_loads_with_its_source(tmp_path: Path, keys: tuple[object, ...]) -> None:
    policy = load(tmp_path, TEXT, keys)
    assert policy.tracing == Tracing("10.0.0.7", 4317, 25.0)
    assert policy.tracing is not None
    assert isinstance(policy.tracing.sampling_percent, float)
    assert policy.tracing.source.file.endswith("mesh.yaml")
    assert policy.tracing.source.line == 2  # where its mapping starts


def test_without_tracing_the_policy_has_none(tmp_path: Path, keys: tuple[object, ...]) -> None:
    assert load(tmp_path, VALID_POLICY, keys).tracing is None


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ("  sampling_percent: 25\n", "", Tracing("10.0.0.7", 4317, 100.0)),
        ("sampling_percent: 25", "sampling_percent: 0.5", Tracing("10.0.0.7", 4317, 0.5)),
        ("sampling_percent: 25", "sampling_percent: 0", Tracing("10.0.0.7", 4317, 0.0)),
        ("sampling_percent: 25", "sampling_percent: 100.0", Tracing("10.0.0.7", 4317, 100.0)),
        (
            "address: 10.0.0.7",
            "address: otel-collector.observability",
            Tracing("otel-collector.observability", 4317, 25.0),
        ),
        ("address: 10.0.0.7", 'address: "::1"', Tracing("::1", 4317, 25.0)),
    ],
    ids=["default-percent", "decimal", "zero", "hundred-float", "dns-name", "ipv6"],
)
def test_accepted_forms(
    tmp_path: Path, keys: tuple[object, ...], before: str, after: str, expected: Tracing
) -> None:
    assert load(tmp_path, edit(before, after), keys).tracing == expected


# ---- rejected: one error, at the right line, naming the key and the fix -----------------------

BAD_CASES = [
    pytest.param(
        TRACING,
        "tracing: yes\n",
        "tracing: yes",
        ["tracing: expected a mapping (key: value), got a boolean"],
        id="not-a-mapping",
    ),
    pytest.param(
        "  sampling_percent: 25\n",
        "  sampling_precent: 25\n",
        "sampling_precent",
        ["tracing: unknown key 'sampling_precent' (did you mean 'sampling_percent'?)"],
        id="key-typo",
    ),
    pytest.param(
        "  collector:\n    address: 10.0.0.7\n    port: 4317\n",
        "",
        "sampling_percent: 25",
        ["tracing: missing required key 'collector'"],
        id="no-collector",
    ),
    pytest.param(
        "  collector:\n    address: 10.0.0.7\n    port: 4317\n",
        "  collector: 10.0.0.7:4317\n",
        "collector: 10.0.0.7:4317",
        ["tracing.collector: expected a mapping (key: value), got a string"],
        id="collector-not-a-mapping",
    ),
    pytest.param(
        "    port: 4317\n",
        "    port: 4317\n    insecure: true\n",
        "insecure: true",
        ["tracing.collector: unknown key 'insecure'", "allowed keys: address, port"],
        id="collector-unknown-key",
    ),
    pytest.param(
        "    port: 4317\n",
        "",
        "address: 10.0.0.7",  # a mapping's line is that of its first key
        ["tracing.collector: missing required key 'port'"],
        id="collector-no-port",
    ),
    pytest.param(
        "    address: 10.0.0.7\n",
        "",
        "port: 4317",
        ["tracing.collector: missing required key 'address'"],
        id="collector-no-address",
    ),
    pytest.param(
        "address: 10.0.0.7",
        "address: 4317",
        "address: 4317",
        ["tracing.collector.address: expected a string, got an integer"],
        id="address-not-a-string",
    ),
    pytest.param(
        "address: 10.0.0.7",
        "address: http://10.0.0.7:4317",
        "address: http://",
        [
            "tracing.collector.address: 'http://10.0.0.7:4317' is neither an IP address nor "
            "a DNS name",
            "like 127.0.0.1",
        ],
        id="address-is-a-url",
    ),
    pytest.param(
        "address: 10.0.0.7",
        "address: 0.0.0.0",
        "address: 0.0.0.0",
        ["tracing.collector.address: '0.0.0.0' is a listen-anywhere address", "127.0.0.1"],
        id="address-unspecified",
    ),
    pytest.param(
        "port: 4317",
        "port: 0",
        "port: 0",
        ["tracing.collector.port: 0 is out of range; use 1..65535"],
        id="port-zero",
    ),
    pytest.param(
        "port: 4317",
        "port: 70000",
        "port: 70000",
        ["tracing.collector.port: 70000 is out of range; use 1..65535"],
        id="port-too-big",
    ),
    pytest.param(
        "port: 4317",
        "port: otlp",
        "port: otlp",
        ["tracing.collector.port: expected an integer, got a string 'otlp'"],
        id="port-not-a-number",
    ),
    pytest.param(
        "sampling_percent: 25",
        'sampling_percent: "25%"',
        "sampling_percent",
        [
            "tracing.sampling_percent: expected a number from 0 to 100 (a percent), "
            "got a string '25%'"
        ],
        id="percent-a-string",
    ),
    pytest.param(
        "sampling_percent: 25",
        "sampling_percent: true",
        "sampling_percent",
        ["tracing.sampling_percent: expected a number from 0 to 100", "got a boolean"],
        id="percent-a-boolean",
    ),
    pytest.param(
        "sampling_percent: 25",
        "sampling_percent: 150",
        "sampling_percent",
        ["tracing.sampling_percent: 150 is out of range; use 0..100"],
        id="percent-over-100",
    ),
    pytest.param(
        "sampling_percent: 25",
        "sampling_percent: -0.5",
        "sampling_percent",
        ["tracing.sampling_percent: -0.5 is out of range; use 0..100"],
        id="percent-negative",
    ),
    pytest.param(
        "sampling_percent: 25",
        "sampling_percent: .inf",
        "sampling_percent",
        ["tracing.sampling_percent: .inf is out of range; use 0..100"],
        id="percent-infinite",
    ),
    pytest.param(
        "sampling_percent: 25",
        "sampling_percent: .nan",
        "sampling_percent",
        ["tracing.sampling_percent: .nan is out of range; use 0..100"],
        id="percent-nan",
    ),
]


@pytest.mark.parametrize(("before", "after", "needle", "messages"), BAD_CASES)
def test_each_bad_input_is_one_error_with_file_and_line(
    tmp_path: Path,
    keys: tuple[object, ...],
    *,
    before: str,
    after: str,
    needle: str,
    messages: list[str],
) -> None:
    text = edit(before, after)
    errors = errors_of(tmp_path, text, keys)
    assert len(errors) == 1, errors
    line = line_of(text, needle)
    assert errors[0].startswith(f"{tmp_path}/mesh.yaml:{line}: "), (errors[0], line)
    for message in messages:
        assert message in errors[0], errors[0]


def test_tracing_set_in_two_files_names_the_first(tmp_path: Path, keys: tuple[object, ...]) -> None:
    write_policy(tmp_path, TEXT, keys=keys)  # type: ignore[arg-type]
    (tmp_path / "zz-tracing.yaml").write_text("# more\n" + TRACING)
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)
    assert [str(i) for i in info.value.issues] == [
        f"{tmp_path}/zz-tracing.yaml:3: tracing: set again (first at {tmp_path}/mesh.yaml:2); "
        "keep one"
    ]


# ---- the wire: authz computes the xDS server's version ----------------------------------------


def through_the_wire(policy: Policy) -> Policy:
    message = wire.PolicyResource.FromString(wire.to_resource(policy).SerializeToString())
    return wire.from_resource(message)


def test_tracing_round_trips_with_the_same_version(
    tmp_path: Path, keys: tuple[object, ...]
) -> None:
    policy = load(tmp_path, TEXT, keys)
    decoded = through_the_wire(policy)
    assert decoded == policy and decoded.version == policy.version
    assert decoded.tracing == policy.tracing
    assert decoded.tracing is not None and decoded.tracing.source == wire.XDS_SOURCE
    without = load(tmp_path / "plain", VALID_POLICY, keys)
    assert through_the_wire(without).tracing is None
    assert without.version != policy.version


@pytest.mark.parametrize(
    "tracing",
    [
        Tracing("127.0.0.1", 4317),
        Tracing("otel.example", 4318, 0.25),
        Tracing("127.0.0.1", 4317, 50),  # an int from Python code keeps its JSON (and hash)
    ],
)
def test_policies_built_in_code_round_trip_too(tracing: Tracing) -> None:
    policy = Policy.build(tracing=tracing)
    decoded = through_the_wire(policy)
    assert decoded.tracing == tracing and decoded.version == policy.version


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ({"collector_address": "127.0.0.1", "collector_port": 4317}, "missing 'sampling_percent'"),
        (
            {"collector_address": "x", "collector_port": 1, "sampling_percent": "5"},
            r"tracing\.sampling_percent: expected a number",
        ),
        (
            {"collector_address": "x", "collector_port": 1, "sampling_percent": True},
            r"tracing\.sampling_percent: expected a number",
        ),
        ([], r"tracing: expected an object"),
    ],
)
def test_a_wrong_tracing_shape_is_a_wire_error(value: object, needle: str) -> None:
    policy = Policy.build(tracing=Tracing("127.0.0.1", 4317))
    data = json.loads(policy.canonical_json())
    data["tracing"] = value
    message = wire.PolicyResource(version=policy.version, policy_json=json.dumps(data))
    with pytest.raises(wire.WireError, match=needle):
        wire.from_resource(message)


def test_a_payload_without_tracing_is_a_wire_error() -> None:
    """A sender whose model predates ``tracing``: its hash is not ours, say so plainly."""
    policy = Policy.build()
    data = json.loads(policy.canonical_json())
    del data["tracing"]
    message = wire.PolicyResource(version=policy.version, policy_json=json.dumps(data))
    with pytest.raises(wire.WireError, match="missing 'tracing'"):
        wire.from_resource(message)
