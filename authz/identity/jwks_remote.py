"""Issuer keys fetched from an HTTPS JWKS URL (an issuer's ``jwks_uri``).

One :class:`JwksFetcher` per (URL, CA bundle) keeps the current key set of that URL
as an immutable :class:`JwksSnapshot`, replaced atomically (one reference swap) on
every fetch that brings a different, valid document. One :class:`JwksRegistry` per
authz process maps (URL, CA) → fetcher, so a policy reload that keeps an issuer keeps
its fetcher, its keys and its schedule; :meth:`JwksRegistry.retain` stops the fetchers
the new policy no longer references.

Protocol and its subtleties:

* **Never on the request path.** Each fetcher fetches on its own daemon thread; the
  first fetch starts as soon as the fetcher exists. A Check only *reads* the current
  snapshot. A token whose ``kid`` is not in it is denied at once (``unknown_key``) and
  merely *asks* for a refresh (:meth:`JwksFetcher.request_refresh`: a flag and an
  event, no I/O, no waiting): authz will also run on a single-threaded event loop,
  where one Check waiting for an IdP would stall every other Check, and a client whose
  token names a brand-new key simply succeeds on its next request.
* **Refreshes asked by tokens are rate limited**: at most one fetch per
  ``jwks_min_refresh_seconds`` (counted from the start of the previous fetch, whatever
  caused it); a request inside the window is deferred to its end, not dropped. A
  flood of tokens with random ``kid`` values must not turn authz into a tool that
  hammers the IdP (or exhausts authz's own threads and sockets).
* Periodic refresh every ``jwks_refresh_seconds``. A failed fetch keeps the last good
  keys (an IdP outage must not log everyone out) and is retried with exponential
  back-off from ``max(1 s, jwks_min_refresh_seconds)``, never longer than the refresh
  interval; failures are counted (:attr:`JwksFetcher.error_count`,
  :attr:`JwksFetcher.last_error`, and the ``on_fetch`` callback feeding metrics).
* **HTTPS only** — ``http://`` is refused, loopback included (tests use real TLS with
  a test CA). The server is verified with the issuer's ``jwks_ca_pem`` (or the
  system's CAs when empty), hostname checked, TLS 1.2 or later. Each fetch has a
  timeout (5 s per socket operation; reading stops once 5 s have passed), a response
  cap (1 MiB, ``Content-Length`` or not), and no redirects are followed (a 3xx is a
  failed fetch naming the ``Location``: configure the final URL). Proxy environment
  variables are not used.
* A document is accepted only when it is a JSON object with a non-empty ``keys``
  list of JSON objects, none carrying private or secret key material (``d``, ``p``,
  ``q``, ``dp``, ``dq``, ``qi``, ``oth``, ``k``), every RSA/EC/OKP key importable by
  joserfc, and at least one such key. Keys of other types are ignored (RFC 7517 §5).
  Anything else is a failed fetch: the previous keys stay.

CLIs (``meshward explain``, ``meshward test``) want keys before they decide and use
:meth:`JwksRegistry.fetch_once` on a registry built with ``background=False``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from joserfc.errors import JoseError
from joserfc.jwk import import_key

from meshward import __version__
from meshward.policy.model import Issuer

_log = logging.getLogger("meshward.authz.jwks")

#: Seconds allowed for each socket operation and for a whole fetch.
DEFAULT_TIMEOUT = 5.0
#: Largest JWKS document accepted (bytes).
DEFAULT_MAX_BYTES = 1 << 20
#: Key types a JWS verification key can have here; other types are ignored.
_SIGNING_KEY_TYPES = frozenset({"RSA", "EC", "OKP"})
#: JWK members that only private or symmetric (secret) keys have.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

#: ``on_fetch(url, outcome)`` with outcome ``"success"`` or ``"error"``.
FetchCallback = Callable[[str, str], None]


class JwksConfigError(ValueError):
    """A ``jwks_uri`` issuer that cannot be fetched as configured (bad URL, bad CA
    bundle, or no :class:`JwksRegistry` to fetch with)."""


class JwksFetchError(Exception):
    """One fetch failed; the message says why (safe to log: no key material)."""


@dataclass(frozen=True, slots=True)
class JwksSnapshot:
    """One accepted key set. Never mutated: a new document makes a new snapshot."""

    #: ``{"keys": [...]}``: the document's usable public keys (JWK objects).
    jwks: dict[str, Any]
    #: The ``kid`` of each key (keys without one are left out).
    kids: tuple[str, ...]
    #: SHA-256 of the canonical JSON of :attr:`jwks`: same content, same snapshot.
    digest: str
    #: Wall-clock time of the fetch that first brought this content.
    fetched_at: float


def parse_jwks(body: bytes) -> dict[str, Any]:
    """The usable public keys of a JWKS document, as ``{"keys": [...]}``.

    Raises :class:`JwksFetchError` for anything but a JWKS of public keys (module
    docstring).
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:  # JSON and UTF-8 errors
        raise JwksFetchError(f"response is not JSON ({error})") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not keys:
        raise JwksFetchError("response is not a JWKS document (no non-empty 'keys' list)")
    usable: list[dict[str, Any]] = []
    for index, entry in enumerate(keys):
        if not isinstance(entry, dict):
            raise JwksFetchError(f"key #{index} is not a JSON object")
        secret = sorted(_PRIVATE_MEMBERS.intersection(entry))
        if secret:
            raise JwksFetchError(
                f"key #{index} contains private or secret key material ({', '.join(secret)}); "
                "a JWKS URL must publish only public keys"
            )
        if entry.get("kty") not in _SIGNING_KEY_TYPES:
            continue  # RFC 7517 §5: ignore key types that are not understood
        try:
            import_key(entry)
        except (JoseError, ValueError, TypeError, KeyError) as error:
            raise JwksFetchError(
                f"key #{index} is not a usable {entry['kty']} key ({type(error).__name__})"
            ) from None
        usable.append(entry)
    if not usable:
        raise JwksFetchError("no RSA, EC or OKP key in the JWKS document")
    return {"keys": usable}


def _snapshot(document: dict[str, Any]) -> JwksSnapshot:
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    kids = tuple(k["kid"] for k in document["keys"] if isinstance(k.get("kid"), str))
    # A copy made from the canonical text: nothing else holds a reference into it.
    return JwksSnapshot(
        jwks=json.loads(canonical),
        kids=kids,
        digest=hashlib.sha256(canonical.encode()).hexdigest(),
        fetched_at=time.time(),
    )


def _https_target(url: str) -> tuple[str, int, str]:
    """(host, port, request target) of an ``https://`` URL; JwksConfigError otherwise."""
    if any(c <= " " or c == "\x7f" for c in url):
        raise JwksConfigError(f"jwks_uri {url!r} contains spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme.lower() != "https":
        raise JwksConfigError(
            f"jwks_uri {url!r} is not an https:// URL; keys are only fetched over HTTPS "
            "(give the issuer's https:// JWKS URL, or a jwks_file)"
        )
    if parts.username is not None or parts.password is not None:
        raise JwksConfigError(f"jwks_uri {url!r} carries credentials; remove the 'user@' part")
    try:
        port = parts.port or 443
    except ValueError:
        raise JwksConfigError(f"jwks_uri {url!r} has an invalid port") from None
    if not parts.hostname:
        raise JwksConfigError(f"jwks_uri {url!r} has no host")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, target


def _tls_context(ca_pem: str, url: str) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cadata=ca_pem or None)
    except (ssl.SSLError, ValueError) as error:
        raise JwksConfigError(
            f"jwks_uri {url}: the CA bundle is not usable PEM certificates ({error}); "
            "jwks_ca_file must hold the PEM certificate(s) of the CA that signed the "
            "JWKS server's certificate"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # create_default_context already requires a certificate and checks the hostname;
    # said again so that no later edit can loosen it silently.
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    return context


def _describe(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS verification of the server failed: {error.verify_message or error}"
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    return f"{type(error).__name__}: {error}"


class JwksFetcher:
    """Keeps the key set published at one HTTPS URL (see the module docstring).

    Built with ``start=True`` (the default) its thread starts at once and fetches
    immediately. Readers use :attr:`snapshot` (``None`` until the first successful
    fetch); they never wait for the network.
    """

    def __init__(
        self,
        url: str,
        *,
        ca_pem: str = "",
        refresh_seconds: float = 300.0,
        min_refresh_seconds: float = 10.0,
        timeout: float = DEFAULT_TIMEOUT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_fetch: FetchCallback | None = None,
        start: bool = True,
    ) -> None:
        self.url = url
        self._host, self._port, self._target = _https_target(url)
        self._context = _tls_context(ca_pem, url)
        self.ca_pem = ca_pem
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._refresh = 0.0
        self._min_refresh = 0.0
        self.set_intervals(refresh_seconds, min_refresh_seconds)
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._on_fetch = on_fetch
        # The published state. The snapshot reference is swapped in one assignment,
        # so readers need no lock; counters are only written under _state_lock.
        self._snapshot: JwksSnapshot | None = None
        self._state_lock = threading.Lock()
        self._fetch_count = 0
        self._error_count = 0
        self._last_error = ""
        self._last_success: float | None = None
        self._ready = threading.Event()
        # Scheduling (background thread).
        self._fetch_lock = threading.Lock()  # one fetch at a time (thread or fetch_once)
        self._refresh_requested = False
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    def __repr__(self) -> str:
        return f"JwksFetcher({self.url!r}, kids={self.kids()!r}, errors={self._error_count})"

    # -- reading (any thread, never blocks) ---------------------------------------

    @property
    def snapshot(self) -> JwksSnapshot | None:
        """The current key set; ``None`` until a fetch succeeded."""
        return self._snapshot

    def kids(self) -> tuple[str, ...]:
        snapshot = self._snapshot
        return snapshot.kids if snapshot is not None else ()

    @property
    def fetch_count(self) -> int:
        """Fetches attempted (successful or not)."""
        return self._fetch_count

    @property
    def error_count(self) -> int:
        """Fetches that failed."""
        return self._error_count

    @property
    def last_error(self) -> str:
        """Why the last failed fetch failed; empty when none has."""
        return self._last_error

    @property
    def last_success(self) -> float | None:
        """Wall-clock time of the last successful fetch (changed content or not)."""
        return self._last_success

    @property
    def refresh_seconds(self) -> float:
        return self._refresh

    @property
    def min_refresh_seconds(self) -> float:
        return self._min_refresh

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait (≤ ``timeout`` s) for the first successful fetch; True once there is one.

        For CLIs and tests only: a Check never waits.
        """
        return self._ready.wait(timeout)

    def status(self) -> dict[str, Any]:
        """A JSON-able view (for ``/status`` pages and logs)."""
        return {
            "jwks_uri": self.url,
            "kids": list(self.kids()),
            "fetches": self._fetch_count,
            "errors": self._error_count,
            "last_error": self._last_error or None,
            "last_success": self._last_success,
        }

    # -- control -------------------------------------------------------------------

    def set_intervals(self, refresh_seconds: float, min_refresh_seconds: float) -> None:
        """Change the periodic and the minimum on-demand refresh intervals (seconds)."""
        if refresh_seconds <= 0 or min_refresh_seconds < 0:
            raise JwksConfigError(
                f"jwks_uri {self.url}: refresh interval must be > 0 and the minimum "
                f"refresh interval >= 0 (got {refresh_seconds}, {min_refresh_seconds})"
            )
        self._refresh = float(refresh_seconds)
        self._min_refresh = float(min_refresh_seconds)
        self._wake.set()  # the thread recomputes its schedule

    def request_refresh(self) -> None:
        """Ask for a fetch soon (a token named an unknown key). Never blocks or fails;
        the fetch happens once the minimum refresh interval since the previous fetch
        has passed."""
        if self._refresh_requested:
            return  # already pending: a flood costs one attribute read per token
        self._refresh_requested = True
        self._wake.set()

    def start(self) -> None:
        """Start the background thread (idempotent); it fetches at once."""
        if self._thread is not None or self._stop.is_set():
            return
        self._thread = threading.Thread(target=self._run, name=f"jwks-{self._host}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 0.0) -> None:
        """Stop the thread; wait for it ≤ ``timeout`` s (a fetch in flight is abandoned:
        its result is never published)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and timeout > 0:
            self._thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def fetch_once(self) -> JwksSnapshot:
        """Fetch now, on the calling thread (CLIs); publish and return the key set.

        Raises :class:`JwksFetchError` (the last good keys stay); the caller reports
        it, so nothing is logged.
        """
        if not self._attempt(log=False):
            raise JwksFetchError(self._last_error)
        snapshot = self._snapshot
        assert snapshot is not None  # set by a successful attempt
        return snapshot

    # -- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        last_start = -float("inf")  # first fetch: immediately
        failures = 0
        jitter = 1.0
        while not self._stop.is_set():
            # Recomputed every time round: interval changes apply to the pending wait.
            if failures == 0:
                due = last_start + self._refresh
            else:
                base = max(1.0, self._min_refresh)
                backoff = min(self._refresh, base * 2 ** min(failures - 1, 30))
                due = last_start + backoff * jitter
            if self._refresh_requested:
                due = min(due, last_start + self._min_refresh)
            now = time.monotonic()
            if now < due:
                self._wake.wait(due - now)
                self._wake.clear()
                continue  # recompute: a request, an interval change or stop
            self._refresh_requested = False  # asked during this fetch → next window
            last_start = time.monotonic()
            if self._attempt():
                failures = 0
            else:
                failures += 1
                jitter = random.uniform(0.8, 1.0)  # noqa: S311 - jitter, not crypto

    def _attempt(self, *, log: bool = True) -> bool:
        """One fetch: download, validate, publish. True on success."""
        with self._fetch_lock:
            try:
                document = parse_jwks(self._download())
            except JwksFetchError as error:
                self._record(error=str(error), log=log)
                return False
            if self._stop.is_set() and self._thread is not None:
                return False  # stopped while fetching: publish nothing
            self._record(document=document, log=log)
            return True

    def _record(
        self, *, document: dict[str, Any] | None = None, error: str = "", log: bool = True
    ) -> None:
        changed = None
        with self._state_lock:
            self._fetch_count += 1
            if document is None:
                self._error_count += 1
                self._last_error = error
                failures = self._error_count
            else:
                current = self._snapshot
                fresh = _snapshot(document)
                if current is None or current.digest != fresh.digest:
                    self._snapshot = changed = fresh
                self._last_success = time.time()
        if document is None and log:
            _log.warning(
                "jwks fetch failed; the last good keys stay",
                extra={"jwks_uri": self.url, "error": error, "errors": failures},
            )
        elif changed is not None and log:
            _log.info("jwks keys updated", extra={"jwks_uri": self.url, "kids": list(changed.kids)})
        if document is not None:
            self._ready.set()
        if self._on_fetch is not None:
            try:
                self._on_fetch(self.url, "error" if document is None else "success")
            except Exception:  # a metrics callback must never stop the fetcher
                _log.exception("jwks on_fetch callback failed", extra={"jwks_uri": self.url})

    def _download(self) -> bytes:
        """GET the URL; the body of a 200 response. Raises :class:`JwksFetchError`."""
        deadline = time.monotonic() + self._timeout
        connection = http.client.HTTPSConnection(
            self._host, self._port, timeout=self._timeout, context=self._context
        )
        try:
            connection.request(
                "GET",
                self._target,
                headers={
                    "Accept": "application/jwk-set+json, application/json",
                    "User-Agent": f"meshward-authz/{__version__}",
                },
            )
            response = connection.getresponse()
            if 300 <= response.status < 400:
                location = response.getheader("Location", "")
                raise JwksFetchError(
                    f"HTTP {response.status} redirect to {location!r} not followed; "
                    "configure the final URL as jwks_uri"
                )
            if response.status != 200:
                raise JwksFetchError(f"HTTP {response.status} {response.reason}".rstrip())
            declared = response.getheader("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > self._max_bytes:
                raise JwksFetchError(f"response larger than {self._max_bytes} bytes")
            chunks: list[bytes] = []
            size = 0
            while True:
                if time.monotonic() > deadline:
                    raise JwksFetchError(f"timed out after {self._timeout:g} s")
                chunk = response.read(min(65536, self._max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > self._max_bytes:
                    raise JwksFetchError(f"response larger than {self._max_bytes} bytes")
            return b"".join(chunks)
        except (OSError, http.client.HTTPException) as error:
            raise JwksFetchError(_describe(error)) from None
        finally:
            connection.close()


def _key(issuer: Issuer) -> tuple[str, str]:
    return issuer.jwks_uri, issuer.jwks_ca_pem


class JwksRegistry:
    """The process's fetchers, by (URL, CA bundle); shared by every compiled policy.

    :meth:`fetcher` gets or creates (and starts, unless ``background=False``) the one
    for an issuer; :meth:`retain` after a policy swap stops the ones the policy no
    longer uses and applies its intervals; :meth:`close` on exit. ``on_fetch`` is
    called after every fetch (metrics).
    """

    def __init__(
        self,
        *,
        background: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_fetch: FetchCallback | None = None,
    ) -> None:
        self._background = background
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._on_fetch = on_fetch
        self._fetchers: dict[tuple[str, str], JwksFetcher] = {}
        self._lock = threading.Lock()

    def fetcher(self, issuer: Issuer) -> JwksFetcher:
        """The fetcher of ``issuer``'s ``jwks_uri`` (created on first use).

        Raises :class:`JwksConfigError` for an issuer without ``jwks_uri``, a URL that
        is not ``https://`` or an unusable CA bundle.
        """
        if not issuer.jwks_uri:
            raise JwksConfigError(f"issuer {issuer.name} has no jwks_uri")
        with self._lock:
            fetcher = self._fetchers.get(_key(issuer))
            if fetcher is None:
                try:
                    fetcher = JwksFetcher(
                        issuer.jwks_uri,
                        ca_pem=issuer.jwks_ca_pem,
                        refresh_seconds=issuer.jwks_refresh_seconds,
                        min_refresh_seconds=issuer.jwks_min_refresh_seconds,
                        timeout=self._timeout,
                        max_bytes=self._max_bytes,
                        on_fetch=self._on_fetch,
                        start=self._background,
                    )
                except JwksConfigError as error:
                    raise JwksConfigError(f"issuer {issuer.name}: {error}") from None
                self._fetchers[_key(issuer)] = fetcher
            return fetcher

    def retain(self, issuers: Iterable[Issuer]) -> None:
        """Keep the fetchers of ``issuers`` (the policy now served), stop the others.

        A kept fetcher takes the shortest intervals of the issuers sharing it.
        """
        wanted: dict[tuple[str, str], tuple[float, float]] = {}
        for issuer in issuers:
            if issuer.jwks_uri:
                refresh, minimum = wanted.get(_key(issuer), (float("inf"), float("inf")))
                wanted[_key(issuer)] = (
                    min(refresh, issuer.jwks_refresh_seconds),
                    min(minimum, issuer.jwks_min_refresh_seconds),
                )
        with self._lock:
            dropped = [k for k in self._fetchers if k not in wanted]
            stopped = [self._fetchers.pop(k) for k in dropped]
            kept = [(self._fetchers[k], wanted[k]) for k in wanted if k in self._fetchers]
        for fetcher in stopped:
            fetcher.stop()
            _log.info("jwks fetcher stopped (issuer removed)", extra={"jwks_uri": fetcher.url})
        for fetcher, (refresh, minimum) in kept:
            if (refresh, minimum) != (fetcher.refresh_seconds, fetcher.min_refresh_seconds):
                fetcher.set_intervals(refresh, minimum)

    def fetch_once(self, issuers: Iterable[Issuer]) -> None:
        """Synchronously fetch the keys of every ``jwks_uri`` issuer that has none yet.

        For CLIs that decide once. Raises :class:`JwksFetchError` naming the issuer,
        the URL and the fix, or :class:`JwksConfigError`.
        """
        for issuer in issuers:
            if not issuer.jwks_uri:
                continue
            fetcher = self.fetcher(issuer)
            if fetcher.snapshot is not None:
                continue
            try:
                fetcher.fetch_once()
            except JwksFetchError as error:
                raise JwksFetchError(
                    f"issuer {issuer.name}: cannot fetch its keys from {issuer.jwks_uri}: "
                    f"{error}. Check that the URL is reachable from here and serves the "
                    "issuer's public JWKS over HTTPS (with a private CA, set jwks_ca_file), "
                    "or give the keys in a jwks_file"
                ) from None

    def fetchers(self) -> list[JwksFetcher]:
        with self._lock:
            return list(self._fetchers.values())

    def status(self) -> list[dict[str, Any]]:
        return [f.status() for f in self.fetchers()]

    def close(self, timeout: float = 1.0) -> None:
        """Stop every fetcher (waiting ≤ ``timeout`` s in all)."""
        with self._lock:
            fetchers = list(self._fetchers.values())
            self._fetchers.clear()
        deadline = time.monotonic() + timeout
        for fetcher in fetchers:
            fetcher.stop()
        for fetcher in fetchers:
            fetcher.stop(max(0.0, deadline - time.monotonic()))
