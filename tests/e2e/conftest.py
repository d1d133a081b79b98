"""The compose end-to-end suite's session fixture: the real docker-compose mesh.

Once per session: check that a Docker engine is reachable (if not, every test FAILS
with the reason: this suite is required, never skipped), build the images
(``docker/build-images.sh``, what ``make images`` runs; ``MESHWARD_E2E_BUILD=0`` skips
it), copy ``policies/`` to a temporary directory with a fresh demo signing key (the
repository's policies are never edited), ``up -d`` the project ``meshward-e2e`` with the
gateway published on a free port, and wait until every container is healthy.

At the end, always, ``down -v``; when any test failed (or the mesh never came up) the
containers' logs are saved first under ``.meshward/e2e-logs/<time>/`` and the path is
printed.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.compose import REPO, ComposeError, ComposeProject, docker_engine_problem, run

PROJECT = "meshward-e2e"
LOG_ROOT = REPO / ".meshward" / "e2e-logs"
_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Remember that a test of this session failed (its setup, call or teardown)."""
    outcome: Any = yield
    if outcome.get_result().failed:
        item.session.stash[_FAILED] = True


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class ComposeMesh:
    """The running compose mesh as an outside client sees it."""

    project: ComposeProject
    gateway_port: int
    ca_file: Path
    policies: Path
    state_dir: Path
    tokens: dict[str, str] = field(default_factory=dict)

    def token(self, sub: str, groups: str = "", ttl: int = 3600) -> str:
        """A demo JWT minted on the host with `meshward token` (the temporary key)."""
        proc = run(
            [sys.executable, "-m", "meshward", "token", "--sub", sub, "--groups", groups,
             "--ttl", str(ttl), "--state-dir", str(self.state_dir),
             "--jwks", str(self.policies / "keys" / "demo-jwks.json")],
        )  # fmt: skip
        return proc.stdout.strip()

    def request(
        self,
        method: str,
        path: str,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """One HTTPS request to the gateway's published port (trusting only the mesh CA)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        conn = http.client.HTTPSConnection("localhost", self.gateway_port, context=ctx, timeout=10)
        sent = dict(headers or {})
        if token is not None:
            sent["authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, headers=sent)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def admin(self, port: int, path: str) -> str:
        """GET an Envoy admin page (127.0.0.1:port in the shared network namespace)."""
        return self.project.exec(
            "xds", "python", "-c",
            "import sys, urllib.request; "
            "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())",
            f"http://127.0.0.1:{port}{path}",
        )  # fmt: skip

    def spans(self) -> list[dict[str, Any]]:
        """Every span the OTLP receiver container wrote so far."""
        text = self.project.exec("otlp-receiver", "cat", "/spans/spans.jsonl")
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line being written
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _policies_copy(dest: Path, state_dir: Path) -> Path:
    """``policies/`` copied to ``dest`` with a new demo key's JWKS, readable by the
    containers' unprivileged user."""
    policies = dest / "policies"
    shutil.copytree(REPO / "policies", policies, ignore=shutil.ignore_patterns("keys"))
    (policies / "keys").mkdir()
    run(
        [sys.executable, "-m", "meshward", "token", "--init", "--state-dir", str(state_dir),
         "--jwks", str(policies / "keys" / "demo-jwks.json")],
    )  # fmt: skip
    for path in [policies, *policies.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return policies


def _save_logs(project: ComposeProject, why: str) -> None:
    out = LOG_ROOT / time.strftime("%Y%m%d-%H%M%S")
    try:
        out.mkdir(parents=True, exist_ok=True)
        logs = project.logs()
        (out / "compose.log").write_text(logs)
        states = "\n".join(str(s) for s in project.states())
        (out / "containers.txt").write_text(states + "\n")
        # Where the saved files do not outlive the run (CI), the output keeps the gist.
        tail = "\n".join(logs.splitlines()[-60:])
        print(f"\n[e2e] containers:\n{states}\n[e2e] last log lines:\n{tail}", file=sys.__stderr__)
        try:
            spans = project.exec("otlp-receiver", "cat", "/spans/spans.jsonl")
            (out / "spans.jsonl").write_text(spans)
        except ComposeError:
            pass
    except (ComposeError, OSError) as exc:
        print(f"\n[e2e] {why}; saving the container logs failed: {exc}", file=sys.__stderr__)
        return
    print(f"\n[e2e] {why}: container logs saved in {out}", file=sys.__stderr__)


@pytest.fixture(scope="session")
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Generator[ComposeMesh, None, None]:
    problem = docker_engine_problem()
    if problem is not None:
        pytest.fail(
            f"the compose end-to-end suite needs a Docker engine and none is reachable: "
            f"{problem.rstrip('.?')}. Start one (e.g. `dockerd`) and run `make e2e` again; "
            "CI requires it.",
            pytrace=False,
        )
    if os.environ.get("MESHWARD_E2E_BUILD", "1") != "0":
        try:
            run([str(REPO / "docker" / "build-images.sh")], timeout=1200)
        except ComposeError as exc:
            pytest.fail(f"building the images failed: {exc}", pytrace=False)
    work = tmp_path_factory.mktemp("compose")
    state_dir = work / "state"
    policies = _policies_copy(work, state_dir)
    port = _free_port()
    project = ComposeProject(
        PROJECT, {"MESHWARD_POLICIES": str(policies), "MESHWARD_GATEWAY_PORT": str(port)}
    )
    project.down()  # a project an interrupted run left behind
    up_ok = False
    try:
        project.up()
        project.wait_healthy(timeout=180)
        ca_file = work / "ca.crt"
        ca_file.write_text(project.exec("xds", "cat", "/state/ca/ca.crt"))
        up_ok = True
        yield ComposeMesh(project, port, ca_file, policies, state_dir)
    finally:
        failed = not up_ok or request.session.stash.get(_FAILED, False)
        if failed:
            _save_logs(project, "the mesh did not come up" if not up_ok else "a test failed")
        try:
            project.down()
        except (ComposeError, subprocess.SubprocessError) as exc:
            print(f"\n[e2e] `down -v` failed: {exc}", file=sys.__stderr__)
