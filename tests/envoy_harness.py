"""Run a real Envoy for integration tests: start, wait for LIVE, admin queries, stop.

Envoy runs with ``--concurrency 1 --disable-hot-restart`` so several can run side by
side. Admin port 0 is supported: Envoy then writes the bound admin address to a file
(``--admin-address-path``) which :meth:`EnvoyProcess.wait_live` reads back.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import status_pb2

from meshward.envoy_binary import find_envoy

_Servicer = TypeVar("_Servicer", bound=external_auth_pb2_grpc.AuthorizationServicer)


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (tiny race: someone may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    host: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request to 127.0.0.1:port → (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Host": host, **(headers or {})})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


class EnvoyProcess:
    """One Envoy process from a bootstrap file. Always :meth:`stop` it (finally/fixture).

    Envoy's log goes to a private temporary directory, removed by :meth:`stop` unless
    ``keep_files``; read :meth:`log_text` before stopping to show it on failure.
    """

    def __init__(
        self,
        bootstrap_path: str | os.PathLike[str],
        admin_port: int,
        *,
        log_level: str = "warn",
        extra_args: tuple[str, ...] = (),
        keep_files: bool = False,
    ) -> None:
        self.bootstrap_path = Path(bootstrap_path)
        self.admin_port = admin_port
        self.log_level = log_level
        self.extra_args = extra_args
        self.keep_files = keep_files
        self._dir = Path(tempfile.mkdtemp(prefix="meshward-envoy-"))
        self.log_path = self._dir / "envoy.log"
        self._address_path = self._dir / "admin-address"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    def start(self) -> None:
        self._log_file = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            [
                find_envoy(),
                "-c",
                str(self.bootstrap_path),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                self.log_level,
                "--admin-address-path",
                str(self._address_path),
                *self.extra_args,
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def wait_live(self, timeout: float = 15.0) -> None:
        """Block until ``/ready`` says LIVE; raise with Envoy's log tail otherwise."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"envoy exited early:\n{self.log_text()}")
            if self.admin_port == 0 and self._address_path.exists():
                text = self._address_path.read_text().strip()
                if text:
                    self.admin_port = int(text.rsplit(":", 1)[1])
            if self.admin_port:
                try:
                    status, _, body = http_request(self.admin_port, "/ready", timeout=1.0)
                    last = f"{status} {body!r}"
                    if status == 200 and body.strip() == b"LIVE":
                        return
                except OSError as exc:
                    last = repr(exc)
            time.sleep(0.05)
        raise TimeoutError(f"envoy not LIVE after {timeout}s (last: {last}):\n{self.log_text()}")

    def admin(self, path: str, method: str = "GET") -> tuple[int, bytes]:
        status, _, body = http_request(self.admin_port, path, method=method)
        return status, body

    def config_dump(self, include_eds: bool = True) -> dict[str, Any]:
        path = "/config_dump?include_eds" if include_eds else "/config_dump"
        status, body = self.admin(path)
        if status != 200:
            raise RuntimeError(f"config_dump: {status} {body[:200]!r}")
        return dict(json.loads(body))

    def stats(self) -> dict[str, int]:
        """Counters and gauges from ``/stats`` (histograms left out)."""
        _, body = self.admin("/stats")
        out: dict[str, int] = {}
        for line in body.decode().splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def stop(self, timeout: float = 5.0) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout)
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if not self.keep_files:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EnvoyProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def config_section(dump: dict[str, Any], name: str) -> dict[str, Any]:
    """One section of ``/config_dump`` by its type's short name (``ListenersConfigDump``)."""
    for config in dump["configs"]:
        if config["@type"].rsplit(".", 1)[-1] == name:
            return dict(config)
    raise KeyError(f"{name} not in config_dump")


def active_listeners(dump: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name → ``active_state`` of each dynamic listener Envoy is serving."""
    listeners = config_section(dump, "ListenersConfigDump").get("dynamic_listeners", [])
    return {
        entry["name"]: entry["active_state"]
        for entry in listeners
        if entry.get("name") and "active_state" in entry
    }


def route_configs(dump: dict[str, Any]) -> dict[str, tuple[str, set[str]]]:
    """route config name → (version_info, names of its routes)."""
    configs = config_section(dump, "RoutesConfigDump").get("dynamic_route_configs", [])
    return {
        config["route_config"]["name"]: (
            config["version_info"],
            {
                route["name"]
                for vhost in config["route_config"].get("virtual_hosts", [])
                for route in vhost.get("routes", [])
            },
        )
        for config in configs
    }


def active_clusters(dump: dict[str, Any]) -> set[str]:
    clusters = config_section(dump, "ClustersConfigDump").get("dynamic_active_clusters", [])
    return {entry["cluster"]["name"] for entry in clusters}


def start_envoy(
    directory: Path,
    node_id: str,
    group: str,
    xds_port: int,
    *,
    api_type: str = "GRPC",
) -> EnvoyProcess:
    """Render a bootstrap from ``envoy/bootstrap.yaml`` and start an Envoy on it
    (admin port picked by Envoy). Call :meth:`EnvoyProcess.wait_live` next."""
    from xds_server.bootstrap import render_bootstrap

    bootstrap = directory / f"{node_id}.yaml"
    bootstrap.write_text(
        render_bootstrap(node_id, group, 0, "127.0.0.1", xds_port, api_type=api_type)
    )
    envoy = EnvoyProcess(bootstrap, 0)
    envoy.start()
    return envoy


class AllowAllAuthz(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """ext_authz stand-in: allows every request; records each Check's
    ``context_extensions`` and gRPC metadata."""

    def __init__(self) -> None:
        self.contexts: list[dict[str, str]] = []
        self.metadata: list[dict[str, str]] = []

    async def Check(  # noqa: N802
        self, request: external_auth_pb2.CheckRequest, context: Any
    ) -> external_auth_pb2.CheckResponse:
        self.contexts.append(dict(request.attributes.context_extensions))
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))


@asynccontextmanager
async def authz_server(servicer: _Servicer, port: int) -> AsyncIterator[_Servicer]:
    """Serve ``servicer`` (a stand-in ext_authz service) on 127.0.0.1:``port``."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    try:
        yield servicer
    finally:
        await server.stop(0.2)
