"""``meshward test``: YAML policy test cases through the real decision code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meshward.cli import main
from tests.policy_files import VALID_POLICY, new_keys, write_jwks, write_policy
from tests.tokens import claims, sign

ROOT = Path(__file__).resolve().parents[2]

DEMO_POLICY = VALID_POLICY.replace(
    "  - name: test\n    issuer: https://issuer.test\n    audiences: [meshward-test]\n",
    "  - name: demo\n    issuer: https://demo.meshward.local\n    audiences: [meshward-demo]\n",
)

PASSING = """\
- name: alice reads orders
  request: {method: GET, path: /orders/1, subject: alice}
  expect: {decision: allow}
- name: customers read the catalog
  request: {path: /catalog/x, subject: carol, groups: [customers]}
  expect: {decision: allow, status: 200, reason: allowed}
- name: no token
  request: {path: /orders/1}
  expect: {decision: deny, status: 401, reason: missing_token}
- name: no route
  request: {path: /admin, subject: alice}
  expect: {decision: deny, reason: no_route}
"""


def make_tests_dir(tmp_path: Path, text: str, name: str = "mesh_test.yaml") -> Path:
    policy = write_policy(tmp_path / "policies", DEMO_POLICY)
    (policy / "tests").mkdir(exist_ok=True)
    (policy / "tests" / name).write_text(textwrap.dedent(text))
    return policy / "tests"


def run(tmp_path: Path, *args: str) -> int:
    return main(["test", *args, "--state-dir", str(tmp_path / "state")])


def test_passing_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tests = make_tests_dir(tmp_path, PASSING)
    assert run(tmp_path, str(tests)) == 0
    assert capsys.readouterr().out.strip() == "PASS: 4/4"


def test_failing_case_names_file_line_and_binding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    failing = PASSING + (
        "- name: alice may not read\n"
        "  request: {path: /orders/1, subject: alice}\n"
        "  expect: {decision: deny, reason: forbidden}\n"
    )
    tests = make_tests_dir(tmp_path, failing)
    assert run(tmp_path, str(tests)) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{tests / 'mesh_test.yaml'}:13: case alice may not read: "
        "expected deny/forbidden, got allow (binding alice-reads-orders)",
        "FAIL: 1/5",
    ]


def test_malformed_test_file_reports_file_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = """\
    - name: fine
      request: {path: /orders/1, subject: alice}
      expect: {decision: allow}
    - name: typo
      request: {path: /orders/1, subjct: alice}
      expect: {decision: maybe}
    """
    tests = make_tests_dir(tmp_path, bad)
    assert run(tmp_path, str(tests)) == 2
    out = capsys.readouterr().out
    path = tests / "mesh_test.yaml"
    assert f"{path}:5: case typo.request: unknown key 'subjct'" in out
    assert f"{path}:6: case typo.expect.decision: expected 'allow' or 'deny'" in out
    assert "1/1 cases passed" in out


def test_invalid_yaml_and_real_tokens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = new_keys()
    policy = write_policy(tmp_path / "p", keys=keys)  # issuer.test: no demo key
    token = sign(keys[0], claims("alice"))
    tests = tmp_path / "cases"
    tests.mkdir()
    (tests / "a.yaml").write_text(
        f"- name: real token\n  request: {{path: /orders, token: {token}}}\n"
        "  expect: {decision: allow}\n"
    )
    assert run(tmp_path, str(tests), "--policy", str(policy)) == 0
    assert "PASS: 1/1" in capsys.readouterr().out
    (tests / "b.yaml").write_text("- name: x\n  request: [oops\n")
    assert run(tmp_path, str(tests), "--policy", str(policy)) == 2
    assert f"{tests / 'b.yaml'}:3: invalid YAML" in capsys.readouterr().out
    (tests / "b.yaml").write_text(
        "- name: demo token\n  request: {path: /orders, subject: alice}\n"
        "  expect: {decision: allow}\n"
    )
    assert run(tmp_path, str(tests), "--policy", str(policy)) == 2
    out = capsys.readouterr().out
    assert f"{tests / 'b.yaml'}:1: case demo token:" in out and "does not trust" in out


def test_subprocess_on_the_shipped_demo_tests(tmp_path: Path) -> None:
    """The repository's own policies/tests against a copy of the demo policy."""
    policy = tmp_path / "policies"
    (policy / "tests").mkdir(parents=True)
    (policy / "mesh.yaml").write_text((ROOT / "policies" / "mesh.yaml").read_text())
    (policy / "tests" / "mesh_test.yaml").write_text(
        (ROOT / "policies" / "tests" / "mesh_test.yaml").read_text()
    )
    # Any JWKS lets the policy load; the fresh demo key then replaces it.
    write_jwks(policy / "keys" / "demo-jwks.json", *new_keys())
    result = subprocess.run(
        [
            *(sys.executable, "-m", "meshward", "test", str(policy / "tests")),
            *("--state-dir", str(tmp_path / "state")),
        ],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().startswith("PASS: ")


RULES_POLICY = DEMO_POLICY.replace(
    "bindings:\n",
    """\
bindings:
  - name: no-orders-from-outside
    role: orders-reader
    effect: deny
    not_source_ips: [10.0.0.0/8]
  - name: tenants-only
    role: orders-reader
    subjects: [zed]
    claims: {{tenant: acme}}
  - name: try-dave
    role: orders-reader
    subjects: [dave]
    mode: audit
""",
    1,
)


def test_cases_with_claims_source_ip_headers_and_audit_outcome(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "role: orders-reader" in RULES_POLICY  # the base policy has the role we bind
    cases = """\
    - name: inside
      request: {path: /orders/1, subject: zed, claims: {tenant: acme}, source_ip: 10.0.0.9}
      expect: {decision: allow}
    - name: outside is denied first
      request: {path: /orders/1, subject: zed, claims: {tenant: acme}, source_ip: 192.0.2.1}
      expect: {decision: deny, reason: denied_by_rule}
    - name: other tenant
      request: {path: /orders/1, subject: zed, claims: {tenant: other}, source_ip: 10.0.0.9}
      expect: {decision: deny, status: 403, reason: forbidden}
    - name: dave is a dry run
      request: {path: /orders/1, subject: dave, source_ip: 10.0.0.9, port: 18080,
                headers: {x-trace: "1"}}
      expect: {decision: deny, reason: forbidden, audit_outcome: would_allow}
    - name: wrong audit expectation
      request: {path: /orders/1, subject: zed, claims: {tenant: acme}, source_ip: 10.0.0.9}
      expect: {decision: allow, audit_outcome: would_deny}
    """
    policy = write_policy(tmp_path / "policies", RULES_POLICY)
    (policy / "tests").mkdir()
    (policy / "tests" / "t.yaml").write_text(textwrap.dedent(cases))
    assert run(tmp_path, str(policy / "tests")) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{policy / 'tests' / 't.yaml'}:14: case wrong audit expectation: expected "
        "allow/audit would_deny, got allow (binding tenants-only) (audit none)",
        "FAIL: 1/5",
    ]
    (policy / "tests" / "t.yaml").write_text(
        "- name: bad\n  request: {path: /x, source_ip: 10.0.0.0/8, port: 0, claims: {a: 1}}\n"
        "  expect: {decision: deny, audit_outcome: maybe}\n"
    )
    assert run(tmp_path, str(policy / "tests")) == 2
    out = capsys.readouterr().out
    assert "bad.request.source_ip: '10.0.0.0/8' is not an IP address" in out
    assert "bad.request.port: expected a port (1-65535)" in out
    assert "bad.request.claims: needs 'subject'" in out
    assert "bad.expect.audit_outcome: expected one of none, would_deny, would_allow" in out
