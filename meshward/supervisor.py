"""Process supervision for ``meshward up``: start, watch, restart, stop.

Each child is a real OS process (as in production, not threads in one interpreter).
Its stderr is read line by line on a thread and handed to a callback (``meshward up``
turns authz decision lines into one printed line each and files the rest into per-
process logs). A child that exits while the mesh is running is restarted with an
exponential back-off; one that keeps crashing is given up on with a clear message.
:meth:`Supervisor.stop` sends SIGTERM to every child (reverse start order), waits,
then SIGKILLs stragglers, so Ctrl-C never leaves a process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

LineHandler = Callable[["Child", str], None]


@dataclass
class Child:
    """One supervised process: how to start it and its current state."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    max_restarts: int = 5
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    _log: IO[str] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    """Starts children and keeps them running until :meth:`stop`."""

    def __init__(self, on_line: LineHandler, on_event: Callable[[str], None]) -> None:
        self._children: list[Child] = []
        self._on_line = on_line
        self._on_event = on_event
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._monitor: threading.Thread | None = None

    @property
    def children(self) -> list[Child]:
        return list(self._children)

    def start(self, child: Child) -> Child:
        """Start ``child`` now and supervise it from here on."""
        with self._lock:
            self._children.append(child)
            self._spawn(child)
        if self._monitor is None:
            self._monitor = threading.Thread(target=self._watch, name="supervisor", daemon=True)
            self._monitor.start()
        return child

    def _spawn(self, child: Child) -> None:
        env = dict(os.environ)
        env.update(child.env)
        if child.log_path is not None and child._log is None:
            child.log_path.parent.mkdir(parents=True, exist_ok=True)
            child._log = child.log_path.open("a", encoding="utf-8", buffering=1)
        child.process = subprocess.Popen(
            child.argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
        )
        reader = threading.Thread(
            target=self._read, args=(child, child.process), name=f"log-{child.name}", daemon=True
        )
        reader.start()

    def _read(self, child: Child, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if child._log is not None:
                child._log.write(line + "\n")
            try:
                self._on_line(child, line)
            except Exception as exc:  # a display problem must never kill supervision
                self._on_event(f"{child.name}: could not display a log line: {exc}")

    def _watch(self) -> None:
        backoff: dict[str, float] = {}
        while not self._stopping.wait(0.2):
            with self._lock:
                dead = [c for c in self._children if c.process and c.process.poll() is not None]
            for child in dead:
                assert child.process is not None
                code = child.process.returncode
                if child.restarts >= child.max_restarts:
                    self._on_event(
                        f"{child.name} exited with code {code} and was restarted "
                        f"{child.restarts} times; giving up (see {child.log_path})"
                    )
                    child.process = None
                    continue
                delay = backoff.get(child.name, 0.5)
                self._on_event(f"{child.name} exited with code {code}; restarting in {delay:.1f}s")
                if self._stopping.wait(delay):
                    return
                backoff[child.name] = min(delay * 2, 10.0)
                child.restarts += 1
                with self._lock:
                    if not self._stopping.is_set():
                        self._spawn(child)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every child (last started first), then SIGKILL after ``timeout``."""
        self._stopping.set()
        with self._lock:
            children = list(reversed(self._children))
        for child in children:
            if child.running():
                assert child.process is not None
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._on_event(f"{child.name} did not stop within {timeout:.0f}s; killing it")
                child.process.kill()
                child.process.wait()
        for child in children:
            if child._log is not None:
                child._log.close()
                child._log = None
