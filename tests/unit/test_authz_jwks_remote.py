"""Issuer keys from an HTTPS JWKS URL: a real TLS server on 127.0.0.1, real fetches.

The server's certificate comes from meshward's own PKI; nothing on the network path is
mocked. Intervals are short (0-1 s) and every wait polls against a deadline.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from authz import reasons
from authz.compiled import compile_policy
from authz.identity.base import AuthenticationError, Identity
from authz.identity.jwks_remote import (
    JwksConfigError,
    JwksFetcher,
    JwksFetchError,
    JwksRegistry,
    parse_jwks,
)
from authz.identity.jwt import JwtMethod
from authz.request import AuthzRequest
from meshward import explain
from meshward.policy.model import Binding
from tests import authz_helpers as testing
from tests.jwks_helpers import (
    ISSUER,
    JwksServer,
    Reply,
    Tls,
    make_tls,
    remote_issuer,
    remote_policy,
    token,
    until,
)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("jwks-tls"))


@pytest.fixture(scope="module")
def k1() -> testing.SigningKey:
    return testing.rsa_key("k1")


@pytest.fixture(scope="module")
def k2() -> testing.SigningKey:
    return testing.ec_key("k2")


@pytest.fixture
def server(tls: Tls, k1: testing.SigningKey) -> Iterator[JwksServer]:
    running = JwksServer(tls.cert_file, tls.key_file)
    running.serve(k1)
    yield running
    running.stop()


@dataclass
class Outcomes:
    """What the registry's ``on_fetch`` reported."""

    seen: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, url: str, outcome: str) -> None:
        self.seen.append((url, outcome))


@pytest.fixture
def outcomes() -> Outcomes:
    return Outcomes()


@pytest.fixture
def registry(outcomes: Outcomes) -> Iterator[JwksRegistry]:
    jwks = JwksRegistry(on_fetch=outcomes)
    yield jwks
    jwks.close()


# --- helpers -------------------------------------------------------------------------


def authenticate(method: JwtMethod, jwt: str) -> Identity | None:
    request = AuthzRequest.from_check_request(
        testing.check_request(headers={"authorization": f"Bearer {jwt}"})
    )
    return method.authenticate(request, time.time())


def rejection(method: JwtMethod, jwt: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as caught:
        authenticate(method, jwt)
    return caught.value


def verifies(method: JwtMethod, jwt: str) -> bool:
    try:
        return authenticate(method, jwt) is not None
    except AuthenticationError:
        return False


# --- tests ---------------------------------------------------------------------------


def test_first_fetch_then_token_verifies(
    server: JwksServer, tls: Tls, registry: JwksRegistry, k1: testing.SigningKey, outcomes: Outcomes
) -> None:
    issuer = remote_issuer(server.url, tls.ca_pem)
    method = JwtMethod([issuer], jwks=registry)
    fetcher = registry.fetcher(issuer)
    assert fetcher.wait_ready(5)
    identity = authenticate(method, token(k1, "alice"))
    assert identity is not None
    assert (identity.subject, identity.issuer) == ("alice", ISSUER)
    assert fetcher.kids() == ("k1",)
    assert (fetcher.fetch_count, fetcher.error_count, server.count) == (1, 0, 1)
    assert fetcher.last_success is not None
    assert fetcher.last_error == ""
    assert outcomes.seen == [(server.url, "success")]


def test_no_keys_yet_is_unknown_key_then_the_failed_first_fetch_is_retried(
    server: JwksServer, tls: Tls, registry: JwksRegistry, k1: testing.SigningKey
) -> None:
    server.reply = Reply(status=503, body=b"down for maintenance")
    issuer = remote_issuer(server.url, tls.ca_pem, min_refresh=1)
    method = JwtMethod([issuer], jwks=registry)
    fetcher = registry.fetcher(issuer)
    until(lambda: fetcher.error_count >= 1, "the first fetch to fail")
    assert "HTTP 503" in fetcher.last_error
    assert not fetcher.wait_ready(0)
    error = rejection(method, token(k1))
    assert (error.reason, error.description) == (
        reasons.UNKNOWN_KEY,
        "issuer keys not available yet",
    )
    server.serve(k1)
    # The retry (back-off from 1 s, or the refresh the token asked for) brings the keys.
    assert fetcher.wait_ready(5)
    assert authenticate(method, token(k1)) is not None


def test_key_rotation_unknown_kid_denied_at_once_then_refreshed(
    server: JwksServer,
    tls: Tls,
    registry: JwksRegistry,
    k1: testing.SigningKey,
    k2: testing.SigningKey,
) -> None:
    method = JwtMethod([remote_issuer(server.url, tls.ca_pem, min_refresh=1)], jwks=registry)
    fetcher = registry.fetchers()[0]
    assert fetcher.wait_ready(5)
    old = token(k1)
    assert authenticate(method, old) is not None  # cached from now on
    server.serve(k2)  # the IdP rotates: k1 withdrawn, k2 published
    new = token(k2)
    # The first Check with the new kid is not delayed: denied, and a refresh is asked.
    assert rejection(method, new).reason == reasons.UNKNOWN_KEY
    until(lambda: verifies(method, new), "the token signed with the new key to verify")
    # The periodic refresh is 300 s away: this one was asked for, and the denials while
    # it ran asked for no other (at most one fetch per min_refresh, 1 s here).
    assert server.count == 2
    assert fetcher.kids() == ("k2",)
    # The cached token of the withdrawn key is verified again, and refused.
    assert rejection(method, old).reason == reasons.UNKNOWN_KEY


def test_unknown_kid_flood_fetches_at_most_once_per_min_refresh(
    server: JwksServer, tls: Tls, registry: JwksRegistry, k1: testing.SigningKey
) -> None:
    method = JwtMethod([remote_issuer(server.url, tls.ca_pem, min_refresh=1)], jwks=registry)
    fetcher = registry.fetchers()[0]
    assert fetcher.wait_ready(5)
    flood_end = time.monotonic() + 2.5
    denied = 0
    while time.monotonic() < flood_end:
        assert rejection(method, token(k1, kid=uuid.uuid4().hex)).reason == reasons.UNKNOWN_KEY
        denied += 1
        time.sleep(0.002)
    assert denied > 50
    until(lambda: server.count >= 4, "the deferred refresh after the flood", timeout=3)
    time.sleep(1.2)  # one more window: nothing else may come
    times = server.requests
    on_demand = len(times) - 1
    # ~2.5 s of random kids, windows of 1 s: refreshes at about +1, +2 and +3 s.
    assert 2 <= on_demand <= 4, times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.9, gaps  # never two fetches within one window
    assert authenticate(method, token(k1)) is not None  # the real key still works


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (Reply(status=500, body=b"oops"), "HTTP 500"),
        (Reply(body=b"{not json"), "not JSON"),
        (Reply(body=b'{"keys": []}'), "no non-empty 'keys' list"),
        (Reply(body=b'["keys"]'), "no non-empty 'keys' list"),
        (Reply(body=json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).encode()), "secret"),
        (Reply(body=json.dumps({"keys": [{"kty": "RSA", "n": "AQAB"}]}).encode()), "usable RSA"),
        (Reply(body=b" " * (1024 * 1024 + 1)), "larger than"),
        (Reply(body=b" " * (1024 * 1024 + 1), content_length=False), "larger than"),
        (Reply(status=302, headers={"Location": "http://evil.test/jwks"}), "redirect"),
    ],
    ids=[
        "http-500",
        "bad-json",
        "empty-keys",
        "not-an-object",
        "secret-key",
        "broken-key",
        "oversize",
        "oversize-streamed",
        "redirect",
    ],
)
def test_bad_refresh_keeps_the_last_good_keys(
    server: JwksServer,
    tls: Tls,
    registry: JwksRegistry,
    k1: testing.SigningKey,
    outcomes: Outcomes,
    *,
    reply: Reply,
    error: str,
) -> None:
    method = JwtMethod([remote_issuer(server.url, tls.ca_pem)], jwks=registry)
    fetcher = registry.fetchers()[0]
    assert fetcher.wait_ready(5)
    good = fetcher.snapshot
    server.reply = reply
    fetcher.request_refresh()
    until(lambda: fetcher.error_count == 1, "the refresh to fail")
    assert error in fetcher.last_error
    assert fetcher.snapshot is good
    assert authenticate(method, token(k1, "bob")) is not None
    assert outcomes.seen[:2] == [(server.url, "success"), (server.url, "error")]


def test_private_key_in_document_is_refused(
    server: JwksServer, tls: Tls, registry: JwksRegistry, k1: testing.SigningKey
) -> None:
    fetcher = registry.fetcher(remote_issuer(server.url, tls.ca_pem))
    assert fetcher.wait_ready(5)
    private = {**k1.key.as_dict(private=True), "kid": "k1"}
    assert "d" in private
    server.reply = Reply(body=json.dumps({"keys": [private]}).encode())
    fetcher.request_refresh()
    until(lambda: fetcher.error_count == 1, "the refresh to fail")
    assert "private or secret key material (d, dp, dq, p, q, qi)" in fetcher.last_error
    assert fetcher.kids() == ("k1",)
    assert fetcher.snapshot is not None
    assert "d" not in fetcher.snapshot.jwks["keys"][0]


def test_server_down_keeps_the_last_good_keys(
    server: JwksServer, tls: Tls, registry: JwksRegistry, k1: testing.SigningKey
) -> None:
    method = JwtMethod([remote_issuer(server.url, tls.ca_pem)], jwks=registry)
    fetcher = registry.fetchers()[0]
    assert fetcher.wait_ready(5)
    server.stop()
    fetcher.request_refresh()
    until(lambda: fetcher.error_count == 1, "the refresh to fail")
    assert "connection refused" in fetcher.last_error
    assert authenticate(method, token(k1)) is not None


def test_server_certificate_from_another_ca_is_refused(
    server: JwksServer, tls: Tls, registry: JwksRegistry
) -> None:
    fetcher = registry.fetcher(remote_issuer(server.url, tls.other_ca_pem))
    until(lambda: fetcher.error_count >= 1, "the fetch to fail")
    assert "TLS verification of the server failed" in fetcher.last_error
    assert fetcher.snapshot is None
    assert server.count == 0  # refused during the handshake: no request was sent


def test_server_hostname_is_checked(
    tls: Tls, registry: JwksRegistry, k1: testing.SigningKey
) -> None:
    # Signed by the right CA, but for "localhost" only, while the URL names 127.0.0.1.
    wrong = JwksServer(tls.wrong_name_cert_file, tls.wrong_name_key_file)
    wrong.serve(k1)
    try:
        fetcher = registry.fetcher(remote_issuer(wrong.url, tls.ca_pem))
        until(lambda: fetcher.error_count >= 1, "the fetch to fail")
        assert "TLS verification of the server failed" in fetcher.last_error
        assert "127.0.0.1" in fetcher.last_error
        assert (fetcher.snapshot, wrong.count) == (None, 0)
    finally:
        wrong.stop()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/jwks.json",
        "ftp://idp.example.test/jwks.json",
        "idp.example.test/jwks.json",
        "https://user:pw@idp.example.test/jwks.json",
        "https:///jwks.json",
        "https://idp.example.test/jwks.json\r\nX: y",
    ],
)
def test_only_plain_https_urls_are_accepted(url: str, registry: JwksRegistry) -> None:
    with pytest.raises(JwksConfigError):
        JwksFetcher(url, start=False)
    with pytest.raises(JwksConfigError, match="issuer idp"):
        compile_policy(remote_policy(remote_issuer(url, "")), jwks=registry)
    assert registry.fetchers() == []


def test_http_url_error_says_https(registry: JwksRegistry) -> None:
    with pytest.raises(JwksConfigError, match=r"not an https:// URL"):
        registry.fetcher(remote_issuer("http://127.0.0.1:8080/jwks.json", ""))


def test_bad_ca_bundle_and_missing_registry_are_config_errors(server: JwksServer) -> None:
    with pytest.raises(JwksConfigError, match="CA bundle"):
        JwksFetcher(server.url, ca_pem="not a certificate", start=False)
    with pytest.raises(JwksConfigError, match="no JwksRegistry"):
        compile_policy(remote_policy(remote_issuer(server.url, "")))
    assert server.count == 0


def test_reload_keeps_the_fetcher_and_its_keys(
    server: JwksServer, tls: Tls, registry: JwksRegistry, k1: testing.SigningKey
) -> None:
    issuer = remote_issuer(server.url, tls.ca_pem)
    first = remote_policy(issuer)
    compile_policy(first, jwks=registry)
    registry.retain(first.issuers)
    fetcher = registry.fetcher(issuer)
    assert fetcher.wait_ready(5)
    # A reload: another policy (one more binding), the same issuer, compiled anew.
    second = remote_policy(issuer, Binding("bob-reads", "orders-reader", subjects=("bob",)))
    assert second.version != first.version
    compiled = compile_policy(second, jwks=registry)
    registry.retain(second.issuers)
    assert registry.fetchers() == [fetcher]
    assert not fetcher.stopped
    (method,) = (m for m in compiled.user_methods if isinstance(m, JwtMethod))
    assert authenticate(method, token(k1)) is not None  # keys at once, no new fetch
    time.sleep(0.3)
    assert server.count == 1  # nothing fetched beyond the schedule (next in 300 s)
    # Shorter intervals in the new policy reach the kept fetcher.
    faster = remote_issuer(server.url, tls.ca_pem, refresh=1)
    registry.retain((faster,))
    assert fetcher.refresh_seconds == 1
    until(lambda: server.count >= 2, "the periodic refresh at the new interval")
    # A policy without the issuer stops its fetcher.
    registry.retain(())
    assert registry.fetchers() == []
    assert fetcher.stopped


def test_cli_fetch_once_is_synchronous_and_reports_failures(
    server: JwksServer, tls: Tls, k1: testing.SigningKey
) -> None:
    issuer = remote_issuer(server.url, tls.ca_pem)
    jwks = JwksRegistry(background=False)
    fetcher = jwks.fetcher(issuer)
    time.sleep(0.2)
    assert server.count == 0  # no background thread
    compiled = explain.compile_with_keys(remote_policy(issuer), jwks)
    assert (server.count, fetcher.kids()) == (1, ("k1",))
    (method,) = (m for m in compiled.user_methods if isinstance(m, JwtMethod))
    assert authenticate(method, token(k1)) is not None
    explain.compile_with_keys(remote_policy(issuer), jwks)
    assert server.count == 1  # keys already there: not fetched again

    server.stop()
    with pytest.raises(explain.InputError) as caught:
        explain.compile_with_keys(remote_policy(issuer))
    message = str(caught.value)
    assert f"issuer idp: cannot fetch its keys from {server.url}: connection refused" in message
    assert "jwks_ca_file" in message
    with pytest.raises(JwksFetchError):
        JwksFetcher(server.url, ca_pem=tls.ca_pem, start=False).fetch_once()


def test_parse_jwks_ignores_unknown_key_types(k1: testing.SigningKey) -> None:
    document = {"keys": [{"kty": "future", "x": "1"}, k1.public_jwk()]}
    assert parse_jwks(json.dumps(document).encode()) == {"keys": [k1.public_jwk()]}
    with pytest.raises(JwksFetchError, match="no RSA, EC or OKP key"):
        parse_jwks(b'{"keys": [{"kty": "future"}]}')
    with pytest.raises(JwksFetchError, match="not a JSON object"):
        parse_jwks(b'{"keys": ["k1"]}')
