"""Driving the real docker-compose mesh from tests: build, up, health, exec, kill, logs.

:class:`ComposeProject` wraps one compose project (``-p NAME -f docker-compose.yml``)
with either ``docker compose`` (v2, preferred when it works) or ``docker-compose`` (v1).
Every command it runs raises :class:`ComposeError` with the command's output on failure,
so a failing test says what Docker said.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"


class ComposeError(RuntimeError):
    """A docker or compose command failed, or the mesh did not become healthy."""


def run(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    check: bool = True,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in the repository, capturing text output; ``ComposeError`` on failure."""
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=REPO,
            env=None if env is None else {**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ComposeError(f"`{' '.join(cmd)}` did not finish in {timeout:.0f}s") from exc
    if check and proc.returncode != 0:
        raise ComposeError(
            f"`{' '.join(cmd)}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}".rstrip()
        )
    return proc


def docker_engine_problem() -> str | None:
    """Why no Docker engine can be used here, or ``None`` when ``docker info`` works."""
    if shutil.which("docker") is None:
        return "the `docker` command is not installed"
    try:
        proc = run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30, check=False)
    except ComposeError as exc:
        return str(exc)
    if proc.returncode != 0:
        return f"`docker info` failed: {(proc.stderr or proc.stdout).strip()}"
    return None


#: ``MESHWARD_COMPOSE=v1`` or ``v2`` forces a compose tool (CI runs the suite with each).
COMPOSE_ENV = "MESHWARD_COMPOSE"


def compose_command() -> list[str]:
    """``docker compose`` when the v2 plugin works, else ``docker-compose`` (v1);
    ``$MESHWARD_COMPOSE`` (``v1``/``v2``) picks one, and its absence is an error."""
    forced = os.environ.get(COMPOSE_ENV, "").strip()
    if forced == "v2":
        if run(["docker", "compose", "version"], timeout=30, check=False).returncode != 0:
            raise ComposeError(f"{COMPOSE_ENV}=v2 but `docker compose` (the v2 plugin) fails")
        return ["docker", "compose"]
    if forced == "v1":
        if shutil.which("docker-compose") is None:
            raise ComposeError(f"{COMPOSE_ENV}=v1 but `docker-compose` is not installed")
        return ["docker-compose"]
    if forced:
        raise ComposeError(f"{COMPOSE_ENV}={forced!r}: use v1 or v2 (or unset it)")
    try:
        if run(["docker", "compose", "version"], timeout=30, check=False).returncode == 0:
            return ["docker", "compose"]
    except ComposeError:
        pass
    if shutil.which("docker-compose") is not None:
        return ["docker-compose"]
    raise ComposeError(
        "neither `docker compose` (v2 plugin) nor `docker-compose` (v1) is installed: "
        "install one (e.g. `apt-get install docker-compose`)"
    )


@dataclass(frozen=True)
class ContainerState:
    service: str
    status: str  # created, running, exited, ...
    health: str  # healthy, unhealthy, starting, or "" without a health check
    exit_code: int


class ComposeProject:
    """One compose project of the repository's ``docker-compose.yml``."""

    def __init__(self, name: str, env: Mapping[str, str]) -> None:
        self.name = name
        self.env = dict(env)
        self.base = [*compose_command(), "-p", name, "-f", str(COMPOSE_FILE)]

    def compose(
        self, *args: str, timeout: float = 180.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run([*self.base, *args], env=self.env, timeout=timeout, check=check)

    def up(self) -> None:
        self.compose("up", "-d", timeout=300)

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=180)

    def logs(self) -> str:
        proc = self.compose("logs", "--no-color", "--timestamps", timeout=120, check=False)
        return proc.stdout + proc.stderr

    def exec(self, service: str, *cmd: str, timeout: float = 30.0) -> str:
        """``cmd``'s standard output inside ``service``'s container."""
        return self.compose("exec", "-T", service, *cmd, timeout=timeout).stdout

    def kill(self, *services: str) -> None:
        self.compose("kill", "-s", "SIGKILL", *services)

    def start(self, *services: str) -> None:
        self.compose("start", *services)

    def states(self) -> list[ContainerState]:
        """Every container of the project, exited ones too (`docker compose ps` would
        hide those in v2)."""
        ids = run(
            ["docker", "ps", "--all", "--quiet", "--filter",
             f"label=com.docker.compose.project={self.name}"],
        ).stdout.split()  # fmt: skip
        if not ids:
            return []
        fmt = (
            '{{index .Config.Labels "com.docker.compose.service"}}|{{.State.Status}}|'
            "{{if .State.Health}}{{.State.Health.Status}}{{end}}|{{.State.ExitCode}}"
        )
        out = run(["docker", "inspect", "--format", fmt, *ids]).stdout
        states = []
        for line in out.splitlines():
            service, status, health, code = line.split("|")
            states.append(ContainerState(service, status, health, int(code)))
        return sorted(states, key=lambda s: s.service)

    def wait_healthy(self, services: Sequence[str] | None = None, timeout: float = 120.0) -> None:
        """Wait until every container (or those of ``services``) is healthy, or exited 0
        when it has no health check (one-shot jobs); fail fast on a crash."""
        deadline = time.monotonic() + timeout
        pending: list[str] = []
        while time.monotonic() < deadline:
            states = [s for s in self.states() if services is None or s.service in services]
            pending = []
            for s in states:
                if s.health == "unhealthy" or (s.status == "exited" and s.exit_code != 0):
                    raise ComposeError(
                        f"service {s.service} is {s.health or s.status} "
                        f"(exit code {s.exit_code}); see its logs"
                    )
                done = s.health == "healthy" or (not s.health and s.status == "exited")
                if not done:
                    pending.append(f"{s.service} ({s.health or s.status})")
            seen = {s.service for s in states}
            missing = [] if services is None else [s for s in services if s not in seen]
            if states and not pending and not missing:
                return
            time.sleep(1.0)
        raise ComposeError(f"not healthy after {timeout:.0f}s: {', '.join(pending) or 'none'}")
