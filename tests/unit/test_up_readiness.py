"""`meshward up` readiness: an Envoy counts as ready to decide only once its authz
cluster has an endpoint (read from its admin /clusters page)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from meshward.up import _authz_endpoints

CLUSTERS = """\
meshward-otlp-collector::127.0.0.1:4317::health_flags::healthy
meshward_authz::default_priority::max_connections::1024
meshward_authz::127.0.0.1:9191::cx_active::1
meshward_authz::127.0.0.1:9191::health_flags::healthy
meshward_authz::127.0.0.1:9192::health_flags::/failed_outlier_check
meshward_authz_other::127.0.0.1:9000::health_flags::healthy
"""


@pytest.fixture
def admin() -> Iterator[dict[str, str]]:
    page = {"body": CLUSTERS}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = page["body"].encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    page["url"] = f"http://127.0.0.1:{server.server_address[1]}/clusters"
    yield page
    server.shutdown()
    server.server_close()


def test_counts_each_endpoint_of_the_authz_cluster_once(admin: dict[str, str]) -> None:
    # Two hosts (one ejected still counts as an endpoint); stats lines and a cluster
    # whose name only starts the same are not endpoints.
    assert _authz_endpoints(admin["url"]) == 2


def test_no_endpoint_before_eds_and_zero_when_unreachable(admin: dict[str, str]) -> None:
    admin["body"] = "meshward_authz::default_priority::max_connections::1024\n"
    assert _authz_endpoints(admin["url"]) == 0
    assert _authz_endpoints("http://127.0.0.1:1/clusters") == 0
