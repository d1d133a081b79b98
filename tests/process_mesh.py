"""The mesh as separately controllable real processes, for fault tests.

Unlike `meshward up` (which restarts what dies), this harness lets a test kill and
restart the xDS server, authz or Envoy on its own terms, on fixed ports, and read
the xDS server's `/status`.

The xDS server keeps its CA in ``work/ca`` (``--ca-dir``) unless ``xds_args`` name
another (``--ca-dir`` or ``--ca-cert``/``--ca-key``); :attr:`ProcessMesh.bundle` is the
CA certificate clients trust. ``sidecars`` lists sidecar node groups
(``<service>-sidecar``) to start an Envoy for, after the gateways'.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.envoy_harness import EnvoyProcess, free_port
from xds_server.bootstrap import render_bootstrap

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ProcessMesh:
    """xDS server + authz (fed over ADS) + one Envoy per gateway, each restartable."""

    policy_dir: Path
    work: Path
    gateways: list[str]
    xds_args: tuple[str, ...] = ()
    api_type: str = "GRPC"
    sidecars: list[str] = field(default_factory=list)
    xds_port: int = field(default_factory=free_port)
    xds_status_port: int = field(default_factory=free_port)
    authz_port: int = field(default_factory=free_port)
    authz_status_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    envoys: dict[str, EnvoyProcess] = field(default_factory=dict)

    def _spawn(self, name: str, args: list[str]) -> None:
        self.procs[name] = spawn_meshward(self.work / f"{name}.log", args)

    @property
    def ca_dir(self) -> Path:
        """The built-in CA directory the xDS server uses (``--ca-dir``)."""
        args = list(self.xds_args)
        if "--ca-dir" in args:
            return Path(args[args.index("--ca-dir") + 1])
        return self.work / "ca"

    @property
    def bundle(self) -> Path:
        """The CA certificate (PEM) that clients of TLS gateways trust."""
        args = list(self.xds_args)
        if "--ca-cert" in args:
            return Path(args[args.index("--ca-cert") + 1])
        return self.ca_dir / "ca.crt"

    def start_xds(self) -> None:
        ca_args: list[str] = []
        if not {"--ca-dir", "--ca-cert"} & set(self.xds_args):
            ca_args = ["--ca-dir", str(self.ca_dir)]
        self._spawn(
            "xds",
            [
                "xds",
                "--policy",
                str(self.policy_dir),
                "--listen",
                f"127.0.0.1:{self.xds_port}",
                "--status-listen",
                f"127.0.0.1:{self.xds_status_port}",
                "--authz",
                f"127.0.0.1:{self.authz_port}",
                "--debounce-ms",
                "50",
                *ca_args,
                *self.xds_args,
            ],
        )
        wait_http(f"http://127.0.0.1:{self.xds_status_port}/healthz", what="xds")

    def start_authz(self, wait: bool = True) -> None:
        self._spawn(
            "authz",
            [
                "authz",
                "--xds",
                f"127.0.0.1:{self.xds_port}",
                "--listen",
                f"127.0.0.1:{self.authz_port}",
                "--status-listen",
                f"127.0.0.1:{self.authz_status_port}",
                "--node-id",
                "authz-test",
            ],
        )
        if wait:
            wait_http(f"http://127.0.0.1:{self.authz_status_port}/healthz", what="authz")

    def start_envoy(self, gateway: str) -> EnvoyProcess:
        """Start an Envoy for node group ``gateway`` (a gateway or a sidecar group)."""
        path = self.work / f"envoy-{gateway}.yaml"
        admin = free_port()
        path.write_text(
            render_bootstrap(
                node_id=f"{gateway}-test",
                node_cluster=gateway,
                admin_port=admin,
                xds_host="127.0.0.1",
                xds_port=self.xds_port,
                template=ROOT / "envoy" / "bootstrap.yaml",
                api_type=self.api_type,
            )
        )
        envoy = EnvoyProcess(path, admin)
        envoy.start()
        envoy.wait_live(20)
        self.envoys[gateway] = envoy
        return envoy

    def start(self) -> ProcessMesh:
        self.start_xds()
        self.start_authz()
        for group in [*self.gateways, *self.sidecars]:
            self.start_envoy(group)
        return self

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        proc.send_signal(sig)
        proc.wait(10)

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.xds_status_port}/status", timeout=5
        ) as resp:
            return dict(json.loads(resp.read()))

    def metrics(self, which: str = "xds") -> str:
        port = self.xds_status_port if which == "xds" else self.authz_status_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def logs(self) -> str:
        out = [
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.work.glob("*.log"))
        ]
        out += [f"--- envoy {gw}\n{e.log_text(3000)}" for gw, e in self.envoys.items()]
        return "\n".join(out)

    def stop(self) -> None:
        for envoy in self.envoys.values():
            envoy.stop()
        stop_processes(self.procs.values())


def spawn_meshward(log_path: Path, args: list[str]) -> subprocess.Popen[bytes]:
    """``meshward ARGS`` as a real process, its output appended to ``log_path``."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "meshward", *args],
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def stop_processes(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process still running, then wait (SIGKILL after 10 s each)."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_http(url: str, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{what} not healthy at {url} within {timeout}s")


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(step)
    return False


class Traffic:
    """Continuous requests on keep-alive connections until stopped (bounded in time).

    Records (monotonic time, status) per request; a connection error is status 0.
    """

    def __init__(
        self,
        port: int,
        path: str,
        headers: dict[str, str],
        connections: int = 2,
        max_seconds: float = 60.0,
    ) -> None:
        self.port = port
        self.path = path
        self.headers = headers
        self.results: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._max = max_seconds
        self._threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(connections)
        ]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def _run(self) -> None:
        deadline = time.monotonic() + self._max
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", self.path, headers=self.headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                status = 0
                if conn is not None:
                    conn.close()
                conn = None
            with self._lock:
                self.results.append((time.monotonic(), status))
            time.sleep(0.005)
        if conn is not None:
            conn.close()

    def between(self, start: float, end: float) -> Counter[int]:
        with self._lock:
            return Counter(s for t, s in self.results if start <= t <= end)

    def all(self) -> Counter[int]:
        with self._lock:
            return Counter(s for _, s in self.results)


def wait_log(proc: subprocess.Popen[str], msg: str, timeout: float = 20.0) -> dict[str, Any]:
    """Read ``proc``'s JSON log lines (stderr) until one whose message starts with
    ``msg``; fails with everything read when the process ends or time runs out."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        record = json.loads(line)
        if record["msg"].startswith(msg):
            return dict(record)
    raise AssertionError(f"no {msg!r} line; exit={proc.poll()} stderr={''.join(seen)}")
