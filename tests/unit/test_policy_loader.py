"""The policy loader: typed objects, content-hash versions, and file:line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshward.policy.loader import load_policy
from meshward.policy.model import Policy, Tracing
from tests.policy_files import (
    VALID_POLICY,
    line_of,
    new_keys,
    policy_errors,
    write_jwks,
    write_policy,
)

ROOT = Path(__file__).resolve().parents[2]


def test_valid_policy_loads_into_typed_objects(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path))
    assert [s.name for s in policy.services] == ["orders", "catalog"]
    gw = policy.gateways[0]
    assert (gw.name, gw.address, gw.port) == ("edge", "127.0.0.1", 18080)
    orders = gw.routes[0]
    assert orders.match.prefix == "/orders" and orders.match.methods == ("GET", "POST")
    assert orders.service == "orders"
    assert orders.source.file.endswith("mesh.yaml")
    assert orders.source.line == line_of(VALID_POLICY, "name: orders-api")
    issuer = policy.issuers[0]
    assert issuer.audiences == ("meshward-test",)
    assert len(issuer.jwks["keys"]) == 2
    assert policy.bindings[1].groups == ("customers",)
    assert policy.default_action == "deny"
    assert len(policy.version) == 12


def test_policy_objects_are_immutable(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path))
    with pytest.raises(AttributeError):
        policy.version = "x"  # type: ignore[misc]
    assert isinstance(policy.services, tuple)


def test_version_ignores_formatting_but_not_meaning(tmp_path: Path) -> None:
    keys = new_keys()
    base = load_policy(write_policy(tmp_path / "a", keys=keys))
    reformatted = "# a comment\n\n" + VALID_POLICY.replace(
        "methods: [GET, POST]", "methods:\n            - GET\n            - POST"
    )
    same = load_policy(write_policy(tmp_path / "b", text=reformatted, keys=keys))
    changed = load_policy(
        write_policy(
            tmp_path / "c",
            text=VALID_POLICY.replace("subjects: [alice]", "subjects: [alice, bob]"),
            keys=keys,
        )
    )
    other_key = load_policy(write_policy(tmp_path / "d"))
    assert same.version == base.version
    assert changed.version != base.version
    assert other_key.version != base.version, "the JWKS content is part of the policy"


def test_demo_policy_is_valid(tmp_path: Path) -> None:
    """policies/mesh.yaml (with a freshly generated demo JWKS) passes validation."""
    target = tmp_path / "policies"
    target.mkdir()
    (target / "mesh.yaml").write_text((ROOT / "policies" / "mesh.yaml").read_text())
    write_jwks(target / "keys" / "demo-jwks.json", *new_keys())
    policy = load_policy(target)
    assert {r.name for r in policy.routes()} == {"orders-admin", "orders-api", "catalog-api"}
    assert policy.tracing == Tracing("127.0.0.1", 4317, 100.0)  # `meshward up`'s receiver


def test_files_in_a_directory_merge_and_names_stay_unique(tmp_path: Path) -> None:
    write_policy(tmp_path)
    extra = "services:\n  - name: orders\n    endpoints: [{address: 10.0.0.1, port: 80}]\n"
    (tmp_path / "zz-extra.yaml").write_text(extra)
    errors = policy_errors(tmp_path)
    assert errors == [
        f"{tmp_path}/zz-extra.yaml:2: duplicate service name 'orders' (first defined at "
        f"{tmp_path}/mesh.yaml:2); names must be unique"
    ]


BAD_CASES = [
    pytest.param(
        "        service: orders",
        "        servce: orders",
        "servce:",
        "routes[0]: unknown key 'servce' (did you mean 'service'?)",
        id="unknown-key",
    ),
    pytest.param(
        "port: {gateway_port}",
        "port: eighty",
        "port: eighty",
        "gateways[0].port: expected an integer, got a string 'eighty'",
        id="wrong-type",
    ),
    pytest.param(
        "        service: catalog",
        "        service: billing",
        "service: billing",
        "routes[1].service: service 'billing' is not defined",
        id="undefined-service",
    ),
    pytest.param(
        "    role: catalog-reader",
        "    role: catalog-writer",
        "role: catalog-writer",
        "bindings[1].role: role 'catalog-writer' is not defined",
        id="undefined-role",
    ),
    pytest.param(
        "  - name: customers-read-catalog",
        "  - name: alice-reads-orders",
        "- name: alice-reads-orders\n",
        "duplicate binding name 'alice-reads-orders'",
        id="duplicate-name",
    ),
    pytest.param(
        "jwks_file: keys/jwks.json",
        "jwks_file: keys/missing.json",
        "jwks_file",
        "issuers[0].jwks_file: cannot read JWKS file",
        id="unreadable-jwks",
    ),
    pytest.param(
        "      - name: catalog-api",
        "      - name: orders-api",
        "- name: orders-api\n",
        "duplicate route name 'orders-api'",
        id="duplicate-route",
    ),
    pytest.param(
        "methods: [GET, POST]",
        "methods: [GET, FETCH]",
        "methods: [GET, FETCH]",
        "'FETCH' is not an HTTP method",
        id="bad-method",
    ),
    pytest.param(
        "default: deny",
        "default: allow",
        "default: allow",
        "default: 'allow' is not supported",
        id="default-allow",
    ),
    pytest.param(
        "    subjects: [alice]",
        "",
        "- name: alice-reads-orders",
        "grants its role to nobody",
        id="binding-to-nobody",
    ),
    pytest.param(
        "prefix: /orders",
        "prefix: orders",
        "prefix: orders",
        "'orders' must start with '/'",
        id="relative-prefix",
    ),
]


@pytest.mark.parametrize(("before", "after", "needle", "message"), BAD_CASES)
def test_each_bad_input_is_reported_with_file_and_line(
    tmp_path: Path, before: str, after: str, needle: str, message: str
) -> None:
    line = write_bad_policy(tmp_path, before, after, needle, message)
    errors = policy_errors(tmp_path)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{tmp_path}/mesh.yaml:{line}: "), errors
    assert message in errors[0]


def write_bad_policy(directory: Path, before: str, after: str, needle: str, message: str) -> int:
    """Write VALID_POLICY with one edit; return the line the error must name."""
    assert before in VALID_POLICY
    write_policy(directory, text=VALID_POLICY.replace(before, after, 1))
    rendered = (directory / "mesh.yaml").read_text()
    # The duplicate is reported at its second occurrence.
    line = (
        line_of(rendered, needle)
        if "duplicate" not in message
        else rendered.count("\n", 0, rendered.rindex(needle.strip())) + 1
    )
    return line


def test_every_problem_is_reported_in_one_pass(tmp_path: Path) -> None:
    text = (
        VALID_POLICY.replace("port: {gateway_port}", "port: 99999")
        .replace("    role: catalog-reader", "    role: nope")
        .replace("        service: orders", "        service: ghost")
    )
    errors = policy_errors(write_policy(tmp_path, text=text))
    assert len(errors) == 3
    assert any("out of range" in e for e in errors)
    assert any("role 'nope'" in e for e in errors)
    assert any("service 'ghost'" in e for e in errors)


def test_yaml_syntax_error_and_duplicate_key(tmp_path: Path) -> None:
    write_policy(tmp_path, text=VALID_POLICY.replace("  - name: catalog\n", "  - name: [catalog\n"))
    errors = policy_errors(tmp_path)
    assert len(errors) == 1 and "YAML syntax error" in errors[0]
    assert errors[0].startswith(f"{tmp_path}/mesh.yaml:")

    dup = tmp_path / "dup"
    write_policy(dup, text=VALID_POLICY.replace("default: deny", "default: deny\ndefault: deny"))
    errors = policy_errors(dup)
    first = line_of(VALID_POLICY, "default: deny")
    assert errors == [
        f"{dup}/mesh.yaml:{first + 1}: the policy file: duplicate key 'default' "
        f"(first at line {first}); keep one"
    ]


def test_jwks_with_private_key_or_garbage_is_rejected(tmp_path: Path) -> None:
    write_policy(tmp_path)
    rsa, _ = new_keys()
    (tmp_path / "keys" / "jwks.json").write_text(
        '{"keys": [' + __import__("json").dumps(rsa.as_dict(private=True)) + "]}"
    )
    assert "private key material" in policy_errors(tmp_path)[0]
    (tmp_path / "keys" / "jwks.json").write_text("not json")
    assert "is not valid JSON" in policy_errors(tmp_path)[0]
    (tmp_path / "keys" / "jwks.json").write_text('{"keys": [{"kty": "RSA", "n": "x"}]}')
    assert "not a usable JWKS" in policy_errors(tmp_path)[0]


def test_missing_directory_or_empty_directory(tmp_path: Path) -> None:
    assert "no such file or directory" in policy_errors(tmp_path / "nope")[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no policy files" in policy_errors(empty)[0]


def test_policy_build_is_deterministic() -> None:
    assert Policy.build().version == Policy.build().version


def _meshward(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "meshward", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_meshward_check_cli_accepts_good_and_names_file_line_of_each_bad_class(
    tmp_path: Path,
) -> None:
    good = write_policy(tmp_path / "good")
    ok = _meshward("check", str(good), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "OK, version" in ok.stdout

    expected = []
    for case in BAD_CASES:
        before, after, needle, message = case.values
        directory = tmp_path / str(case.id)
        line = write_bad_policy(directory, before, after, needle, message)
        expected.append((f"{directory}/mesh.yaml:{line}: ", message))
    result = _meshward("check", *(str(tmp_path / str(c.id)) for c in BAD_CASES), cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    for prefix, message in expected:
        assert any(ln.startswith(prefix) and message in ln for ln in lines), (prefix, message)
    assert "Traceback" not in result.stderr
    assert sum("the policy was not accepted" in ln for ln in lines) == len(BAD_CASES)


def test_gateway_names_starting_with_meshward_are_reserved(tmp_path: Path) -> None:
    text = VALID_POLICY.replace("  - name: edge", "  - name: meshward-authz")
    write_policy(tmp_path, text=text)
    line = line_of(text, "name: meshward-authz")
    assert policy_errors(tmp_path) == [
        f"{tmp_path}/mesh.yaml:{line}: gateways[0].name: 'meshward-authz' is reserved: "
        "gateway names starting with 'meshward-' are meshward's own node groups; "
        "rename the gateway"
    ]


def test_sidecar_inbound_route_names_are_reserved(tmp_path: Path) -> None:
    text = VALID_POLICY.replace("      - name: catalog-api", "      - name: catalog.inbound")
    errors = policy_errors(write_policy(tmp_path, text=text))
    line = line_of(text, "name: catalog.inbound")
    assert errors == [
        f"{tmp_path}/mesh.yaml:{line}: route name 'catalog.inbound' is reserved for the "
        "inbound route of that service's sidecar; rename the route"
    ]


# ---- api_keys --------------------------------------------------------------------

ALICE_HASH = "ab" * 32
CI_HASH = "CD" * 32  # upper-case hex is accepted and stored lower-case

API_KEYS = f"""\
api_keys:
  - name: alice-script
    key_sha256: {ALICE_HASH}
    subject: alice
  - name: ci
    key_sha256: {CI_HASH}
    subject: ci-bot
    groups: [customers, ci]
"""


def test_api_keys_load_as_hashes_with_subject_and_groups(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, text=VALID_POLICY + API_KEYS))
    alice, ci = policy.api_keys
    assert (alice.name, alice.key_sha256, alice.subject, alice.groups) == (
        "alice-script",
        ALICE_HASH,
        "alice",
        (),
    )
    assert (ci.key_sha256, ci.subject, ci.groups) == (
        CI_HASH.lower(),
        "ci-bot",
        ("customers", "ci"),
    )
    assert ci.source.line == line_of(VALID_POLICY + API_KEYS, "name: ci")
    assert ALICE_HASH in policy.canonical_json(), "hashes are part of the meaning"
    without = load_policy(write_policy(tmp_path / "plain"))
    assert without.api_keys == () and without.version != policy.version


def test_api_keys_file_is_relative_to_the_policy_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "keys.yaml").write_text(API_KEYS.split("\n", 1)[1].replace("\n  ", "\n")[2:])
    (secret / "keys.json").write_text(
        '[{"name": "json-key", "key_sha256": "' + "ef" * 32 + '", "subject": "bob"}]'
    )
    (tmp_path / "policy").mkdir()
    write_policy(
        tmp_path / "policy",
        text=VALID_POLICY + "api_keys_file: ../secret/keys.yaml\n",
    )
    (tmp_path / "policy" / "more.yaml").write_text("api_keys_file: ../secret/keys.json\n")
    policy = load_policy(tmp_path / "policy")
    assert [k.name for k in policy.api_keys] == ["alice-script", "ci", "json-key"]
    assert policy.api_keys[1].groups == ("customers", "ci")
    assert policy.api_keys[0].source.file == str(tmp_path / "policy" / "../secret/keys.yaml")
    inline = load_policy(write_policy(tmp_path / "inline", text=VALID_POLICY + API_KEYS))
    assert policy.api_keys[:2] == inline.api_keys


@pytest.mark.parametrize(
    "bad",
    ["mk_live_plaintext_key", "ab" * 31, "ab" * 33, "zz" * 32, "ab" * 31 + "a "],
)
def test_a_value_that_is_not_a_sha256_hash_is_rejected(tmp_path: Path, bad: str) -> None:
    text = VALID_POLICY + API_KEYS.replace(ALICE_HASH, f'"{bad}"')
    errors = policy_errors(write_policy(tmp_path, text=text))
    line = line_of(text, 'key_sha256: "')
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{tmp_path}/mesh.yaml:{line}: api_keys[0].key_sha256: ")
    assert "printf %s KEY | sha256sum" in errors[0]
    assert bad.strip() not in errors[0], "a pasted key is never echoed"


def test_duplicate_api_key_names_and_hashes_are_reported(tmp_path: Path) -> None:
    dup_name = API_KEYS + f"  - name: ci\n    key_sha256: {'01' * 32}\n    subject: x\n"
    errors = policy_errors(write_policy(tmp_path / "a", text=VALID_POLICY + dup_name))
    line = (VALID_POLICY + dup_name).count("\n", 0, (VALID_POLICY + dup_name).rindex("name: ci"))
    assert errors == [
        f"{tmp_path}/a/mesh.yaml:{line + 1}: duplicate api key name 'ci' (first defined at "
        f"{tmp_path}/a/mesh.yaml:{line_of(VALID_POLICY + API_KEYS, 'name: ci')}); "
        "names must be unique"
    ]
    dup_hash = API_KEYS + f"  - name: other\n    key_sha256: {ALICE_HASH.upper()}\n    subject: x\n"
    errors = policy_errors(write_policy(tmp_path / "b", text=VALID_POLICY + dup_hash))
    assert len(errors) == 1
    assert errors[0].startswith(
        f"{tmp_path}/b/mesh.yaml:{line_of(VALID_POLICY + dup_hash, 'name: other')}: "
        "api key 'other' has the same key_sha256 as 'alice-script'"
    )


def test_api_keys_file_errors_name_that_file(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text("- name: k\n  key_sha256: nope\n  subject: s\n")
    write_policy(tmp_path / "p", text=VALID_POLICY + "api_keys_file: ../keys.yaml\n")
    errors = policy_errors(tmp_path / "p")
    assert len(errors) == 1 and errors[0].startswith(f"{tmp_path}/p/../keys.yaml:2: ")
    write_policy(tmp_path / "q", text=VALID_POLICY + "api_keys_file: missing.yaml\n")
    (error,) = policy_errors(tmp_path / "q")
    assert error.startswith(f"{tmp_path}/q/mesh.yaml:{line_of(VALID_POLICY, 'default') + 1}: ")
    assert "api_keys_file: cannot read" in error
