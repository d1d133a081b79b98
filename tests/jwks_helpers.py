"""A real HTTPS JWKS server and the issuers, policies and tokens that use it (tests)."""

from __future__ import annotations

import contextlib
import http.server
import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from meshward.pki.ca import CertificateAuthority
from meshward.policy.model import Binding, Issuer, Policy
from tests import authz_helpers as testing

T = TypeVar("T")

ISSUER = "https://idp.example.test"


# --- a real HTTPS JWKS server -------------------------------------------------------


@dataclass
class Reply:
    """What the server answers (replaced whole, so a request sees one or the other)."""

    status: int = 200
    body: bytes = b'{"keys": []}'
    headers: dict[str, str] = field(default_factory=dict)
    #: False: no Content-Length, the body ends when the connection closes.
    content_length: bool = True


class JwksServer:
    """A real HTTPS server (TLS with ``cert_file``/``key_file``) serving one JWKS URL.

    Records the monotonic time of every request it answers.
    """

    def __init__(self, cert_file: Path, key_file: Path, port: int = 0) -> None:
        self.reply = Reply()
        self.requests: list[float] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner.requests.append(time.monotonic())
                reply = owner.reply
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.content_length:
                    self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client gave up (size cap)
                    self.wfile.write(reply.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/.well-known/jwks.json"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def serve(self, *keys: testing.SigningKey) -> None:
        self.reply = Reply(body=json.dumps(testing.jwks(*keys)).encode())

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass(frozen=True)
class Tls:
    ca_pem: str
    cert_file: Path
    key_file: Path
    #: A certificate for ``localhost`` only (no 127.0.0.1 SAN).
    wrong_name_cert_file: Path
    wrong_name_key_file: Path
    #: A CA that did not sign the server's certificate.
    other_ca_pem: str


def make_tls(directory: Path) -> Tls:
    """A CA, server certificates for 127.0.0.1 and for localhost, and another CA."""
    ca = CertificateAuthority.generate("jwks.test")
    files = []
    for names, stem in ((["127.0.0.1"], "server"), (["localhost"], "wrong-name")):
        issued = ca.issue_server(names)
        (directory / f"{stem}.crt").write_bytes(issued.chain_pem)
        (directory / f"{stem}.key").write_bytes(issued.key_pem)
        files += [directory / f"{stem}.crt", directory / f"{stem}.key"]
    other = CertificateAuthority.generate("other.test")
    return Tls(
        ca.bundle_pem.decode(),
        files[0],
        files[1],
        files[2],
        files[3],
        other.bundle_pem.decode(),
    )


def remote_issuer(url: str, ca_pem: str, *, refresh: int = 300, min_refresh: int = 0) -> Issuer:
    return Issuer(
        name="idp",
        issuer=ISSUER,
        audiences=(testing.DEMO_AUDIENCE,),
        jwks={},
        jwks_uri=url,
        jwks_ca_pem=ca_pem,
        jwks_refresh_seconds=refresh,
        jwks_min_refresh_seconds=min_refresh,
    )


def remote_policy(issuer: Issuer, *extra: Binding) -> Policy:
    base = testing.demo_policy(testing.jwks(testing.ec_key("inline")))
    return testing.rebuilt(base, issuers=(issuer,), bindings=(*base.bindings, *extra))


def token(key: testing.SigningKey, subject: str = "alice", **header: Any) -> str:
    return key.sign(testing.claims(subject, issuer=ISSUER), header or None)


def until(predicate: Callable[[], T], what: str, timeout: float = 5.0) -> T:
    """Poll ``predicate`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
