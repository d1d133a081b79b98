"""``meshward explain``: a real CheckRequest, the real decision, and why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from joserfc.jwk import ECKey, RSAKey

from authz.compiled import compile_policy
from meshward import explain
from meshward.cli import main
from meshward.policy.loader import load_policy
from tests.policy_files import VALID_POLICY, new_keys, write_policy
from tests.tokens import claims, sign

Keys = tuple[RSAKey, ECKey]
ROOT = Path(__file__).resolve().parents[2]

DEMO_ISSUER_BLOCK = """\
  - name: demo
    issuer: https://demo.meshward.local
    audiences: [meshward-demo]
    jwks_file: keys/jwks.json
"""


@pytest.fixture(scope="module")
def keys() -> tuple[RSAKey, ECKey]:
    return new_keys()


def test_explain_allow_names_the_rule(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = write_policy(tmp_path / "p", keys=keys)
    token = sign(keys[0], claims("alice"))
    code = main(["explain", "--policy", str(policy), "--path", "/orders/1", "--token", token])
    out = capsys.readouterr().out
    assert code == 0
    assert "decision: ALLOW 200 allowed" in out
    assert "route: orders-api (service orders, gateway edge)" in out
    assert "rule: alice-reads-orders/orders-reader#0" in out


def test_explain_deny_lists_failing_conditions(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = write_policy(tmp_path / "p", keys=keys)
    token = sign(keys[0], claims("bob", ("staff",)))
    code = main(
        [
            *("explain", "--policy", str(policy), "--method", "POST"),
            *("--path", "/orders/1", "--token", token),
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "decision: DENY 403 forbidden" in out
    lines = {line.split(":", 1)[0].strip(): line for line in out.splitlines()}
    alice = lines["binding alice-reads-orders (orders-reader)"]
    assert "subject not in subjects (bob not in [alice])" in alice
    assert "method not allowed (POST not in [GET])" in alice
    customers = lines["binding customers-read-catalog (catalog-reader)"]
    assert "no group in groups [customers] (identity groups: staff)" in customers
    assert "path does not match" in customers


def test_explain_without_route_and_without_token(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = write_policy(tmp_path / "p", keys=keys)
    assert main(["explain", "--policy", str(policy), "--path", "/admin"]) == 1
    assert "decision: DENY 403 no_route" in capsys.readouterr().out
    assert main(["explain", "--policy", str(policy), "--path", "/orders"]) == 1
    out = capsys.readouterr().out
    assert "decision: DENY 401 missing_token" in out
    assert "no user identity" in out


def test_explain_input_errors_exit_2_without_traceback(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = write_policy(tmp_path / "p", keys=keys)
    base = ["explain", "--policy", str(policy), "--path", "/orders"]
    assert main([*base, "--sub", "alice"]) == 2
    err = capsys.readouterr().err
    assert "does not trust the demo issuer" in err and "--token" in err
    assert "Traceback" not in err
    assert main([*base, "--route", "nope"]) == 2
    assert "no route named 'nope'" in capsys.readouterr().err
    assert main(["explain", "--policy", str(tmp_path / "missing"), "--path", "/"]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_explain_mints_demo_tokens_when_the_demo_issuer_is_trusted(
    tmp_path: Path,
    keys: Keys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = VALID_POLICY.replace(
        "  - name: test\n    issuer: https://issuer.test\n    audiences: [meshward-test]\n"
        "    jwks_file: keys/jwks.json\n",
        DEMO_ISSUER_BLOCK,
    )
    policy = write_policy(tmp_path / "p", text, keys=keys)
    state = tmp_path / "state"
    args = ["explain", "--policy", str(policy), "--state-dir", str(state), "--path", "/catalog/1"]
    assert main([*args, "--sub", "carol", "--groups", "customers"]) == 0
    assert "user carol (customers) via jwt" in capsys.readouterr().out
    assert main([*args, "--sub", "carol"]) == 1
    assert "identity groups: none" in capsys.readouterr().out


def test_route_matcher_mirrors_the_translator(tmp_path: Path, keys: Keys) -> None:
    policy = load_policy(write_policy(tmp_path / "p", keys=keys))
    assert explain.match_route(policy, "GET", "/orders/1?x=1") == explain.RouteContext(
        "orders-api", "orders", "edge"
    )
    assert explain.match_route(policy, "DELETE", "/orders/1") is None  # methods: GET, POST
    assert explain.match_route(policy, "DELETE", "/catalog", "Edge.local:443") is not None
    assert explain.match_route(policy, "GET", "/") is None
    outcome = explain.run(
        policy, compile_policy(policy), method="GET", path="/x", route="catalog-api"
    )
    assert outcome.context is not None and outcome.context.route == "catalog-api"
    assert outcome.decision.reason == "missing_token"


def test_explain_subprocess(tmp_path: Path, keys: Keys) -> None:
    policy = write_policy(tmp_path / "p", keys=keys)
    token = sign(keys[1], claims("alice"))
    result = subprocess.run(
        [
            *(sys.executable, "-m", "meshward", "explain", "--policy", str(policy)),
            *("--method", "POST", "--path", "/orders", "--token", token),
        ],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "decision: DENY 403 forbidden" in result.stdout
    assert "method not allowed (POST not in [GET])" in result.stdout
