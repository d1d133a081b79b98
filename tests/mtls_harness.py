"""Real parts for the mTLS integration tests: an in-process xDS server with the PKI, real
Envoy processes per node group (gateways and sidecars), a recording ext_authz server,
and real TLS clients and servers (Python ``ssl``).

The xDS server and the authz stand-in run on an asyncio loop in a background thread
(:class:`BackgroundLoop`), so tests are plain synchronous functions that can share one
mesh (a module-scoped fixture) and make blocking HTTPS requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import selectors
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import status_pb2

from authz.transport import ServerTls, TlsMaterial
from meshward.pki import CertificateAuthority, CredentialStore, IssuedCert
from meshward.policy.model import Policy
from tests.envoy_harness import EnvoyProcess, free_port
from xds_server.bootstrap import render_bootstrap
from xds_server.credentials import CredentialSource
from xds_server.service import XdsService
from xds_server.translator import AUTHZ_GROUP

T = TypeVar("T")

ALL_TYPES = ("cds", "eds", "sds", "lds", "rds")


class BackgroundLoop:
    """An asyncio event loop on its own thread; :meth:`run` a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        async def wrapped() -> T:
            return fn()

        return self.run(wrapped(), timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass(frozen=True)
class SeenCheck:
    """What Envoy sent authz for one request."""

    context: dict[str, str]
    principal: str
    headers: dict[str, str]


class RecordingAuthz(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """ext_authz stand-in: allows everything and records each CheckRequest."""

    def __init__(self) -> None:
        self.checks: list[SeenCheck] = []
        self._lock = threading.Lock()

    async def Check(  # noqa: N802
        self, request: external_auth_pb2.CheckRequest, context: Any
    ) -> external_auth_pb2.CheckResponse:
        attributes = request.attributes
        with self._lock:
            self.checks.append(
                SeenCheck(
                    dict(attributes.context_extensions),
                    attributes.source.principal,
                    dict(attributes.request.http.headers),
                )
            )
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))

    def snapshot(self) -> list[SeenCheck]:
        with self._lock:
            return list(self.checks)


class SourceTls(ServerTls):
    """authz's TLS from the xDS server's :class:`CredentialSource`: before each handshake
    it takes the authz SVID being served (so rotations apply, as in real authz)."""

    def __init__(self, source: CredentialSource) -> None:
        super().__init__()
        self._source = source
        self._refresh()

    def _refresh(self) -> None:
        current = self._source.current
        if current is not None and AUTHZ_GROUP in current.svids:
            cert = current.svids[AUTHZ_GROUP]
            self.set(TlsMaterial(bytes(cert.chain_pem), bytes(cert.key_pem), current.bundle_pem))

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        self._refresh()
        return super().fetch()


def authz_tls_from_ca(ca: CertificateAuthority, spiffe_id: str) -> ServerTls:
    """Static authz TLS: an SVID for ``spiffe_id`` from ``ca`` (e.g. the CA that a
    ``meshward xds`` process created), trusting ``ca``'s bundle."""
    svid = ca.issue_svid(spiffe_id)
    return ServerTls(TlsMaterial.parse(svid.chain_pem, svid.key_pem, ca.bundle_pem))


async def start_authz(
    port: int, tls: ServerTls | None = None
) -> tuple[grpc.aio.Server, RecordingAuthz]:
    """The recording authz on ``port``: mTLS with ``tls``, else plaintext."""
    servicer = RecordingAuthz()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    if tls is not None:
        assert server.add_secure_port(f"127.0.0.1:{port}", tls.server_credentials()) == port
    else:
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    return server, servicer


def write_pem(directory: Path, name: str, cert: IssuedCert) -> tuple[Path, Path]:
    """Write ``cert``'s chain and key as ``<name>.crt`` / ``<name>.key`` (tests only)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.chain_pem)
    key_path.write_bytes(cert.key_pem)
    key_path.chmod(0o600)
    return cert_path, key_path


def client_context(
    cafile: Path,
    *,
    cert: tuple[Path, Path] | None = None,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
    alpn: Sequence[str] | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A TLS client context trusting ``cafile``, optionally with a client certificate."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = check_hostname
    if minimum is not None and minimum < ssl.TLSVersion.TLSv1_2:
        # OpenSSL 3 refuses TLS < 1.2 at its default security level: lower it so the
        # *server* is what refuses the old version.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        if minimum is not None:
            context.minimum_version = minimum
        if maximum is not None:
            context.maximum_version = maximum
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    if alpn is not None:
        context.set_alpn_protocols(list(alpn))
    return context


def https_request(
    port: int,
    path: str,
    context: ssl.SSLContext,
    *,
    server_hostname: str = "localhost",
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTPS/1.1 request to 127.0.0.1:port (SNI and Host ``server_hostname``)."""
    conn = http.client.HTTPSConnection(server_hostname, port, context=context, timeout=timeout)
    # Resolve to loopback whatever the name: connect explicitly.
    conn.sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=timeout),
        server_hostname=server_hostname,
    )
    try:
        conn.request("GET", path, headers={"Host": server_hostname, **(headers or {})})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def tls_exchange(
    port: int,
    context: ssl.SSLContext,
    payload: bytes = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    *,
    server_hostname: str | None = None,
    timeout: float = 5.0,
) -> tuple[str, bytes]:
    """Handshake, send ``payload``, read until EOF. Returns (outcome, bytes read):
    outcome is ``"ok"`` or the ``ssl``/socket error that ended it (e.g. a TLS alert).
    Under TLS 1.3 a server's rejection of the client certificate arrives *after* the
    client-side handshake, on the first read: so callers check the bytes, not only
    whether the handshake raised."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    received = b""
    try:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.sendall(payload)
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    return "ok", received
                received += chunk
    except (ssl.SSLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}", received


def plaintext_exchange(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send ``payload`` on a plain TCP connection and read until EOF (or reset)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except OSError:
            pass
    return received


class TlsServer:
    """A TLS server on 127.0.0.1:``port`` presenting ``cert`` (e.g. an impostor on a
    sidecar's port). It answers every HTTP request ``200 impostor`` and counts TCP
    connections, completed handshakes and requests."""

    def __init__(self, port: int, cert: tuple[Path, Path]) -> None:
        self.port = port
        self.connections = 0
        self.handshakes = 0
        self.requests = 0
        self.errors: list[str] = []
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(str(cert[0]), str(cert[1]))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            with self._context.wrap_socket(conn, server_side=True) as tls:
                self.handshakes += 1
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = tls.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                self.requests += 1
                tls.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nconnection: close\r\n\r\nimpostor"
                )
        except (ssl.SSLError, OSError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(5)


@dataclass
class MtlsMesh:
    """An in-process XdsService with the PKI, a recording authz, and real Envoys."""

    policy: Policy
    work: Path
    svid_lifetime_seconds: int = 3600
    server_lifetime_seconds: int = 24 * 3600
    authz_port: int = field(default_factory=free_port)
    loop: BackgroundLoop = field(default_factory=BackgroundLoop)
    envoys: dict[str, EnvoyProcess] = field(default_factory=dict)
    service: XdsService | None = None
    authz: RecordingAuthz | None = None
    ca: CertificateAuthority | None = None
    _authz_server: grpc.aio.Server | None = None

    @property
    def ca_dir(self) -> Path:
        return self.work / "ca"

    @property
    def bundle(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def xds(self) -> XdsService:
        assert self.service is not None
        return self.service

    def start(self, groups: dict[str, str]) -> MtlsMesh:
        """Start authz, xDS and one Envoy per ``group → api type`` (GRPC/DELTA_GRPC)."""
        from datetime import timedelta

        self.ca = CertificateAuthority.load_or_create(self.ca_dir, self.policy.mesh.trust_domain)
        store = CredentialStore(
            self.ca,
            svid_lifetime=timedelta(seconds=self.svid_lifetime_seconds),
            server_lifetime=timedelta(seconds=self.server_lifetime_seconds),
        )

        async def boot() -> int:
            source = CredentialSource(store)
            self.service = XdsService(
                self.policy,
                [("127.0.0.1", self.authz_port)],
                credentials=source,
                rotation_poll_seconds=1.0,
            )
            # Envoy → authz is mTLS: the stand-in serves the authz SVID the xDS server issued.
            self._authz_server, self.authz = await start_authz(self.authz_port, SourceTls(source))
            return await self.service.start()

        self.loop.run(boot())
        for group, api_type in groups.items():
            self._spawn_envoy(group, api_type)
        for envoy in self.envoys.values():
            envoy.wait_live(20)
        self.wait_applied(self.version())
        return self

    def _spawn_envoy(self, group: str, api_type: str) -> EnvoyProcess:
        path = self.work / f"envoy-{group}.yaml"
        path.write_text(
            render_bootstrap(f"{group}-1", group, 0, "127.0.0.1", self.xds.port, api_type=api_type)
        )
        envoy = EnvoyProcess(path, 0)
        envoy.start()
        self.envoys[group] = envoy
        return envoy

    def start_envoy(self, group: str, api_type: str = "GRPC") -> EnvoyProcess:
        """Start one more Envoy (node group ``group``) and wait until it is LIVE."""
        envoy = self._spawn_envoy(group, api_type)
        envoy.wait_live(20)
        return envoy

    def version(self) -> str:
        return self.loop.call(lambda: self.xds.version)

    def status(self) -> dict[str, Any]:
        return self.loop.call(self.xds.status)

    def wait_applied(self, version: str, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until every Envoy's node applied (ACKed every type of) ``version``."""
        deadline = time.monotonic() + timeout
        nodes: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            nodes = self.status()["nodes"]
            groups = {n["group"]: n for n in nodes}
            if set(self.envoys) <= set(groups) and all(
                groups[g]["applied_version"] == version for g in self.envoys
            ):
                return groups
            time.sleep(0.05)
        raise AssertionError(f"not every node applied {version}: {nodes}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- envoy {g}\n{e.log_text(3000)}" for g, e in self.envoys.items())

    def stop(self) -> None:
        for envoy in self.envoys.values():
            envoy.stop()

        async def down() -> None:
            if self.service is not None:
                await self.service.stop(0.2)
            if self._authz_server is not None:
                await self._authz_server.stop(0.2)

        try:
            self.loop.run(down())
        finally:
            self.loop.close()


class HttpsTraffic:
    """Continuous HTTPS GETs until stopped: ``keepalive`` threads reuse one connection,
    ``fresh`` threads open a new TLS connection (a new handshake) for every request.

    Records (monotonic time, status, error) per request; an exception is status 0.
    """

    def __init__(
        self,
        port: int,
        path: str,
        context: ssl.SSLContext,
        *,
        keepalive: int = 1,
        fresh: int = 1,
        max_seconds: float = 120.0,
    ) -> None:
        self.port = port
        self.path = path
        self.context = context
        self.results: list[tuple[float, int, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_seconds
        self._threads = [
            threading.Thread(target=self._run, args=(True,), daemon=True) for _ in range(keepalive)
        ] + [threading.Thread(target=self._run, args=(False,), daemon=True) for _ in range(fresh)]

    def __enter__(self) -> HttpsTraffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def _connect(self) -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection("localhost", self.port, context=self.context, timeout=5)
        conn.sock = self.context.wrap_socket(
            socket.create_connection(("127.0.0.1", self.port), timeout=5),
            server_hostname="localhost",
        )
        return conn

    def _run(self, keepalive: bool) -> None:
        conn: http.client.HTTPSConnection | None = None
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            error = ""
            try:
                if conn is None:
                    conn = self._connect()
                conn.request("GET", self.path, headers={"Host": "localhost"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if not keepalive or resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                status, error = 0, f"{type(exc).__name__}: {exc}"
                if conn is not None:
                    conn.close()
                conn = None
            with self._lock:
                self.results.append((time.monotonic(), status, error))
            time.sleep(0.01)
        if conn is not None:
            conn.close()

    def statuses(self) -> dict[int, int]:
        with self._lock:
            out: dict[int, int] = {}
            for _, status, _ in self.results:
                out[status] = out.get(status, 0) + 1
            return out

    def failures(self) -> list[tuple[float, int, str]]:
        with self._lock:
            return [r for r in self.results if r[1] != 200]


class TlsRelay:
    """A plaintext → mTLS relay, so a stock grpcio client can call authz over mTLS.

    grpcio's Python client always checks the server's host name, and an SVID has only a
    URI SAN (no DNS name), which is what Envoy checks instead. The relay listens on a
    local port; for each connection it opens TLS 1.3 (ALPN ``h2``) to ``target`` with
    the client ``cert`` (PEM chain + key; ``None``: no client certificate), verifies the
    server against ``bundle`` *without* a host name, and pipes bytes both ways. Use
    ``grpc.insecure_channel(relay.address)``: what authz sees is the relay's TLS peer.
    A failed handshake closes the client's connection (the call fails UNAVAILABLE).
    """

    def __init__(
        self, target_port: int, bundle_pem: bytes, cert: tuple[bytes, bytes] | None
    ) -> None:
        import tempfile

        self.target_port = target_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.check_hostname = False
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.load_verify_locations(cadata=bundle_pem.decode())
        self.context.set_alpn_protocols(["h2"])
        if cert is not None:
            with tempfile.TemporaryDirectory() as tmp:
                chain, key = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
                chain.write_bytes(cert[0])
                key.write_bytes(cert[1])
                self.context.load_cert_chain(chain, key)
        self.handshake_errors: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            raw = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            upstream = self.context.wrap_socket(raw)
            upstream.settimeout(None)
        except (OSError, ssl.SSLError) as exc:
            self.handshake_errors.append(str(exc))
            client.close()
            return

        # One thread per connection: an SSL socket must not be read and written from
        # two threads at once.
        peers = {client: upstream, upstream: client}
        try:
            with selectors.DefaultSelector() as selector:
                for sock in peers:
                    selector.register(sock, selectors.EVENT_READ)
                while True:
                    if upstream.pending():
                        ready: list[Any] = [upstream]
                    else:
                        ready = [key.fileobj for key, _ in selector.select(timeout=60)]
                        if not ready:
                            return
                    for sock in ready:
                        data = sock.recv(65536)
                        if not data:
                            return
                        peers[sock].sendall(data)
        except (OSError, ssl.SSLError) as exc:
            self.handshake_errors.append(str(exc))
        finally:
            for sock in peers:
                with contextlib.suppress(OSError):
                    sock.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
