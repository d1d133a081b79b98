"""The small HTTP side door every meshward process has: ``/healthz`` and ``/metrics``.

It runs on its own thread (``ThreadingHTTPServer``) so it answers even while the
service's own loop is busy. Metrics come from the service's own Prometheus
``CollectorRegistry`` (no global registry: several services may share a process in
tests). Extra JSON endpoints (for example ``/status``) are plain callables.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port); raises ValueError naming the input."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"listen address {listen!r} is not HOST:PORT (for example 127.0.0.1:9000)")
    return host.strip("[]"), int(port)


class StatusServer:
    """Serves ``/healthz`` (200 when ``health()`` is true, else 503), ``/metrics`` and
    any JSON ``routes`` given, on ``listen`` (port 0 picks a free port)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        health: Callable[[], bool],
        listen: str = "127.0.0.1:0",
        routes: dict[str, Callable[[], Any]] | None = None,
    ) -> None:
        self._registry = registry
        self._health = health
        self._routes = dict(routes or {})
        self._address = parse_listen(listen)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("status server is not started")
        return int(self._server.server_address[1])

    def start(self) -> int:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    ok = outer._health()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n", "text/plain")
                elif path == "/metrics":
                    self._send(200, generate_latest(outer._registry), CONTENT_TYPE_LATEST)
                elif path in outer._routes:
                    body = json.dumps(outer._routes[path](), indent=2, default=str).encode()
                    self._send(200, body + b"\n", "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(self._address, Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="status-http", daemon=True
        )
        self._thread.start()
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
