"""A small demo upstream service: answers every request with JSON describing it.

It shows what reached the upstream after meshward decided: the method, the path and
the identity headers authz added (``x-meshward-subject``, and
``x-meshward-workload``: the SPIFFE ID of the mTLS peer, i.e. the gateway, as its
sidecar verified it). ``TCP_NODELAY`` and a large listen backlog keep it from
measuring Nagle's algorithm instead of the mesh.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from meshward.http_status import parse_listen


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True


def make_server(name: str, listen: str) -> ThreadingHTTPServer:
    """A demo upstream called ``name`` bound to ``listen`` (not yet serving)."""
    counter = {"requests": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            with lock:
                counter["requests"] += 1
                count = counter["requests"]
            body = (
                json.dumps(
                    {
                        "service": name,
                        "method": self.command,
                        "path": self.path,
                        "subject": self.headers.get("x-meshward-subject"),
                        "workload": self.headers.get("x-meshward-workload"),
                        "decision_id": self.headers.get("x-meshward-decision-id"),
                        "request_count": count,
                    }
                ).encode()
                + b"\n"
            )
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _answer  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:
            return

    return _Server(parse_listen(listen), Handler)


def serve(name: str, listen: str) -> int:
    """Serve until interrupted (the ``meshward demo-upstream`` command)."""
    import signal

    server = make_server(name, listen)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
