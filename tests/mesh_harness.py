"""Runs the real local mesh (`meshward up`) for integration tests, plus counting upstreams.

Everything is real: `meshward up` starts the xDS server, authz and Envoy as separate
processes; the upstream services run in the test process so a test can see exactly
which requests reached them (and that denied ones did not).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]


class RecordingUpstream:
    """An HTTP upstream on 127.0.0.1 that records every request it serves."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.requests: list[SeenRequest] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                with lock:
                    outer.requests.append(
                        SeenRequest(
                            self.command, self.path, {k.lower(): v for k, v in self.headers.items()}
                        )
                    )
                body = json.dumps({"service": name, "path": self.path}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = do_PUT = _answer  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> RecordingUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, timeout: float = 10.0
) -> HttpResult:
    """One HTTP request; non-2xx statuses are results, not exceptions."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return HttpResult(
                resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
            )
    except urllib.error.HTTPError as err:
        return HttpResult(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


class OutputLines:
    """A process's stdout, read line by line on a thread, to wait on."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def _first(
        self, predicate: Callable[[str], bool], timeout: float, until_exit: bool
    ) -> int | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, line in enumerate(self.lines):
                    if predicate(line):
                        return i
                left = deadline - time.monotonic()
                if left <= 0 or (until_exit and self.process.poll() is not None):
                    return None
                self._cond.wait(left)

    def wait(self, pattern: str, timeout: float = 15.0) -> int | None:
        """Index of the first line matching ``pattern`` (regex), waiting for it."""
        return self._first(lambda line: re.search(pattern, line) is not None, timeout, False)

    def wait_line(
        self, predicate: Callable[[str], bool], timeout: float = 10.0, *, until_exit: bool = False
    ) -> str | None:
        """The first line ``predicate`` accepts, waiting for it (with ``until_exit``,
        None as soon as the process has exited without one)."""
        found = self._first(predicate, timeout, until_exit)
        return None if found is None else self.lines[found]

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


@dataclass
class Mesh:
    """A running `meshward up` process and what its banner told us."""

    process: subprocess.Popen[str]
    state_dir: Path
    output: OutputLines = field(init=False)

    def __post_init__(self) -> None:
        self.output = OutputLines(self.process)

    @property
    def lines(self) -> list[str]:
        """What ``meshward up`` printed so far, a line each."""
        return self.output.lines

    @classmethod
    def start(
        cls,
        policy_dir: Path,
        state_dir: Path,
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
        args: tuple[str, ...] = (),
    ) -> Mesh:
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["PYTHONPATH"] = str(ROOT)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshward",
                "up",
                "--policy",
                str(policy_dir),
                "--state-dir",
                str(state_dir),
                "--no-upstreams",
                "--bootstrap-template",
                str(ROOT / "envoy" / "bootstrap.yaml"),
                *args,
            ],
            cwd=state_dir.parent,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        mesh = cls(proc, state_dir)
        if not mesh.wait_line(lambda line: line.startswith("Decisions ("), timeout):
            out = "\n".join(mesh.lines)
            mesh.stop()
            raise AssertionError(
                f"meshward up did not come up in {timeout}s:\n{out}\n{mesh.logs()}"
            )
        return mesh

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str | None:
        """The first output line ``predicate`` accepts, waiting for it (None once
        ``meshward up`` has exited without one)."""
        return self.output.wait_line(predicate, timeout, until_exit=True)

    def banner_value(self, pattern: str) -> str:
        for line in self.lines:
            m = re.search(pattern, line)
            if m:
                return m.group(1)
        raise AssertionError(f"{pattern!r} not in meshward up output:\n" + "\n".join(self.lines))

    def logs(self) -> str:
        out = []
        for path in sorted((self.state_dir / "logs").glob("*.log")):
            out.append(f"--- {path.name}\n{path.read_text()[-4000:]}")
        return "\n".join(out)

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
