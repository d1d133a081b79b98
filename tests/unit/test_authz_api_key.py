"""API keys: hashed lookup, user identity for bindings, 401s, and no key leaks."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from authz import reasons
from authz.check import Checker
from authz.compiled import CompiledPolicy, compile_policy
from authz.decision import Decision, decide
from authz.decision_log import LOGGER_NAME, decision_record
from authz.identity import api_key
from authz.identity.api_key import ApiKeyMethod
from authz.request import AuthzRequest
from authz.response import to_check_response
from meshward.policy.model import ApiKey, Policy
from tests import authz_helpers as testing

NOW = 1_800_000_000.0
ALICE_KEY = "mk_alice_0123456789abcdef"  # bound by subject (alice-runs-orders)
STAFF_KEY = "mk_ci_fedcba9876543210"  # bound by group (staff-read-orders)


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def key() -> testing.SigningKey:
    return testing.rsa_key()


@pytest.fixture(scope="module")
def policy(key: testing.SigningKey) -> Policy:
    base = testing.workload_policy(testing.jwks(key))
    return testing.rebuilt(
        base,
        api_keys=(
            ApiKey("alice-script", sha(ALICE_KEY), "alice"),
            ApiKey("ci", sha(STAFF_KEY), "ci-bot", ("staff",)),
        ),
    )


@pytest.fixture(scope="module")
def compiled(policy: Policy) -> CompiledPolicy:
    return compile_policy(policy)


def decide_for(compiled: CompiledPolicy, method: str, path: str, **kw: object) -> Decision:
    message = testing.check_request(method, path, **kw)  # type: ignore[arg-type]
    return decide(AuthzRequest.from_check_request(message), compiled, NOW)


def test_valid_key_is_allowed_through_a_subject_binding(compiled: CompiledPolicy) -> None:
    decision = decide_for(compiled, "POST", "/orders/1", headers={"x-api-key": ALICE_KEY})
    assert decision.allowed and decision.reason == reasons.ALLOWED
    assert decision.subject == "alice"
    assert decision.auth_method == "api_key"
    assert decision.matched_rule == "alice-runs-orders/orders-admin#0"


def test_valid_key_is_allowed_through_a_group_binding(compiled: CompiledPolicy) -> None:
    decision = decide_for(
        compiled, "GET", "/orders/1", headers={"authorization": f"ApiKey {STAFF_KEY}"}
    )
    assert decision.allowed
    assert decision.subject == "ci-bot"
    assert decision.matched_rule == "staff-read-orders/orders-reader#0"
    # A group binding grants only its role: staff may not delete orders.
    denied = decide_for(compiled, "DELETE", "/orders/1", headers={"x-api-key": STAFF_KEY})
    assert (denied.http_status, denied.reason) == (403, reasons.FORBIDDEN)


def test_key_with_mtls_peer_is_mtls_plus_api_key(compiled: CompiledPolicy) -> None:
    decision = decide_for(
        compiled,
        "GET",
        "/orders",
        headers={"x-api-key": ALICE_KEY},
        principal=testing.spiffe("console"),
    )
    assert decision.allowed
    assert decision.auth_method == "mtls+api_key"
    assert decision.subject == "alice"


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": "not-a-key"},
        {"x-api-key": ""},
        {"authorization": "ApiKey not-a-key"},
        {"authorization": "apikey " + ALICE_KEY + "x"},
        {"x-api-key": "k" * (api_key.MAX_KEY_LENGTH + 1)},
        {"x-api-key": sha(ALICE_KEY)},  # the hash is not the key
    ],
)
def test_unknown_key_is_401_with_an_api_key_challenge(
    compiled: CompiledPolicy, headers: dict[str, str]
) -> None:
    decision = decide_for(compiled, "GET", "/orders", headers=headers)
    assert (decision.http_status, decision.reason) == (401, reasons.INVALID_API_KEY)
    assert decision.www_authenticate == 'ApiKey realm="meshward"'
    assert decision.auth_method == "api_key"
    response = to_check_response(decision)
    assert response.status.code == 16
    headers_out = {h.header.key: h.header.value for h in response.denied_response.headers}
    assert headers_out["www-authenticate"] == 'ApiKey realm="meshward"'
    assert json.loads(response.denied_response.body)["reason"] == "invalid_api_key"


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": ALICE_KEY, "authorization": "Bearer x.y.z"},
        {"x-api-key": ALICE_KEY, "authorization": f"ApiKey {STAFF_KEY}"},
    ],
)
def test_two_credentials_are_401_ambiguous(
    compiled: CompiledPolicy, headers: dict[str, str]
) -> None:
    decision = decide_for(compiled, "GET", "/orders", headers=headers)
    assert (decision.http_status, decision.reason) == (401, reasons.AMBIGUOUS_CREDENTIALS)
    assert not decision.allowed
    assert "ApiKey" in decision.www_authenticate and "Bearer" in decision.www_authenticate


def test_a_valid_jwt_with_a_valid_key_is_still_ambiguous(
    compiled: CompiledPolicy, key: testing.SigningKey
) -> None:
    token = key.sign(testing.claims("alice", [], now=NOW))
    decision = decide_for(
        compiled,
        "GET",
        "/orders",
        headers={"x-api-key": ALICE_KEY, "authorization": f"Bearer {token}"},
    )
    assert decision.reason == reasons.AMBIGUOUS_CREDENTIALS


def test_jwt_alone_still_works_next_to_api_keys(
    compiled: CompiledPolicy, key: testing.SigningKey
) -> None:
    token = key.sign(testing.claims("alice", [], now=NOW))
    decision = decide_for(compiled, "GET", "/orders", headers={"authorization": f"Bearer {token}"})
    assert decision.allowed and decision.auth_method == "jwt"
    missing = decide_for(compiled, "GET", "/orders")
    assert missing.reason == reasons.MISSING_TOKEN


def test_no_api_keys_in_policy_means_no_api_key_method(key: testing.SigningKey) -> None:
    compiled = compile_policy(testing.demo_policy(testing.jwks(key)))
    assert all(m.name != "api_key" for m in compiled.user_methods)


def test_lookup_compares_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def counting(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    method = ApiKeyMethod([ApiKey("a", sha(ALICE_KEY), "alice")])
    assert method.identify(ALICE_KEY).subject == "alice"
    assert calls == [(sha(ALICE_KEY), sha(ALICE_KEY))]
    with pytest.raises(Exception, match="invalid_api_key"):
        method.identify("wrong")
    # An unknown key is compared too (against a dummy): both paths do the same work.
    assert len(calls) == 2 and calls[1][0] == sha("wrong")


def test_a_failing_compare_digest_rejects_even_a_found_hash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: False)
    method = ApiKeyMethod([ApiKey("a", sha(ALICE_KEY), "alice")])
    with pytest.raises(Exception, match="invalid_api_key"):
        method.identify(ALICE_KEY)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def checker(compiled: CompiledPolicy, exporter: InMemorySpanExporter) -> Iterator[Checker]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Checker(compiled, provider.get_tracer("test"))
    provider.shutdown()


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({"x-api-key": ALICE_KEY}, True),
        ({"authorization": f"ApiKey {ALICE_KEY}"}, True),
        ({"x-api-key": ALICE_KEY + "-wrong"}, False),
        ({"x-api-key": ALICE_KEY, "authorization": "Bearer a.b.c"}, False),
    ],
)
def test_key_never_in_span_decision_log_or_response(
    checker: Checker,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
    headers: dict[str, str],
    allowed: bool,
) -> None:
    message = testing.check_request("GET", "/orders", headers)
    with caplog.at_level(logging.DEBUG):
        response = checker.check(message, [])
    assert (response.status.code == 0) is allowed
    (span,) = exporter.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert attributes["meshward.auth_method"] == "api_key"
    secrets = (ALICE_KEY, sha(ALICE_KEY))
    texts = [
        json.dumps(attributes),
        str(response),
        response.SerializeToString().decode("latin-1"),
        caplog.text,
        *(json.dumps(r.__dict__, default=str) for r in caplog.records),
    ]
    records = [r for r in caplog.records if r.name == LOGGER_NAME]
    assert records, "the decision was logged"
    for text in texts:
        for secret in secrets:
            assert secret not in text


def test_decision_record_has_no_key(compiled: CompiledPolicy) -> None:
    message = testing.check_request("GET", "/orders", {"x-api-key": ALICE_KEY})
    request = AuthzRequest.from_check_request(message)
    decision = decide(request, compiled, NOW)
    record = decision_record(decision, request, "0" * 32, NOW)
    assert record["auth_method"] == "api_key" and record["subject"] == "alice"
    assert ALICE_KEY not in json.dumps(record)


def test_api_key_never_reaches_the_upstream(compiled: CompiledPolicy) -> None:
    """On allow, Envoy is told to strip x-api-key, and Authorization only when it carried
    the key: a key in x-api-key leaves another scheme's Authorization to the upstream."""

    def removed(headers: dict[str, str]) -> list[str]:
        request = AuthzRequest.from_check_request(testing.check_request("GET", "/orders", headers))
        decision = decide(request, compiled, NOW)
        assert decision.allowed and decision.auth_method == "api_key", decision
        return list(to_check_response(decision).ok_response.headers_to_remove)

    in_authorization = removed({"authorization": f"ApiKey {ALICE_KEY}"})
    assert "x-api-key" in in_authorization and "authorization" in in_authorization
    beside_basic = removed({"x-api-key": ALICE_KEY, "authorization": "Basic dXNlcjpwdw=="})
    assert "x-api-key" in beside_basic and "authorization" not in beside_basic
