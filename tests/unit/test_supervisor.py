"""The `meshward up` supervisor: real child processes restarted on crash, stopped on exit."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from meshward.supervisor import Child, Supervisor


def _wait(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_lines_are_routed_logged_and_crashes_restarted(tmp_path: Path) -> None:
    lines: list[tuple[str, str]] = []
    events: list[str] = []
    lock = threading.Lock()

    def on_line(child: Child, line: str) -> None:
        with lock:
            lines.append((child.name, line))

    sup = Supervisor(on_line, events.append)
    # Prints a line and exits 3: the supervisor must restart it (with back-off), twice.
    crasher = sup.start(
        Child(
            "crasher",
            [sys.executable, "-c", "print('hello', flush=True); raise SystemExit(3)"],
            log_path=tmp_path / "crasher.log",
            max_restarts=2,
        )
    )
    try:
        assert _wait(lambda: any("giving up" in e for e in events), timeout=15), events
        assert crasher.restarts == 2
        assert sum(1 for name, line in lines if (name, line) == ("crasher", "hello")) == 3
        assert (tmp_path / "crasher.log").read_text().count("hello") == 3
        assert any("exited with code 3; restarting" in e for e in events)
    finally:
        sup.stop()


def test_stop_terminates_then_kills(tmp_path: Path) -> None:
    sup = Supervisor(lambda child, line: None, lambda event: None)
    polite = sup.start(Child("polite", [sys.executable, "-c", "import time; time.sleep(60)"]))
    stubborn = sup.start(
        Child(
            "stubborn",
            [
                sys.executable,
                "-c",
                (
                    "import signal, time\n"
                    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                    "print('ready', flush=True)\n"
                    "time.sleep(60)\n"
                ),
            ],
        )
    )
    assert _wait(lambda: polite.running() and stubborn.running())
    time.sleep(0.3)  # let the stubborn child install its handler
    started = time.monotonic()
    sup.stop(timeout=1.0)
    assert time.monotonic() - started < 5
    assert not polite.running() and not stubborn.running()
    assert stubborn.process is not None and stubborn.process.returncode == -9
    assert polite.process is not None and polite.process.returncode == -15
