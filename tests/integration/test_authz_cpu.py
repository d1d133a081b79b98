"""``meshward authz --cpu``: the process (every thread) runs pinned; a CPU that does not
exist is an input error naming the flag."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.envoy_harness import free_port
from tests.process_mesh import wait_log

# Linux only, like the project: without os.sched_setaffinity these tests fail.
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _authz(*flags: str) -> subprocess.Popen[str]:
    """``meshward authz --xds`` at a port nothing serves: it starts at once (failing
    closed until a policy arrives), which is all this test needs."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshward",
            "authz",
            "--xds",
            f"127.0.0.1:{free_port()}",
            "--listen",
            "127.0.0.1:0",
            "--status-listen",
            f"127.0.0.1:{free_port()}",
            *flags,
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _allowed(status_path: Path) -> str:
    for line in status_path.read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list in {status_path}")


def test_cpu_pins_the_process_and_all_its_threads() -> None:
    cpu = min(os.sched_getaffinity(0))  # one this test process may use
    proc = _authz("--cpu", str(cpu))
    try:
        started = wait_log(proc, "authz started", 30.0)
        assert started["cpus"] == [cpu]
        threads = list(Path(f"/proc/{proc.pid}/task").glob("*/status"))
        assert len(threads) > 1  # gRPC, the ADS client, the status server...
        assert {_allowed(path) for path in threads} == {str(cpu)}
        assert _allowed(Path(f"/proc/{proc.pid}/status")) == str(cpu)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_unpinned_by_default() -> None:
    proc = _authz()
    try:
        assert wait_log(proc, "authz started", 30.0)["cpus"] is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("999", "--cpu 999: CPU 999 does not exist or is not available to this process"),
        ("0,999", "--cpu 0,999: CPU 999 does not exist"),
        ("zero", "argument --cpu: 'zero' is not a CPU list"),
        ("3-1", "argument --cpu: '3-1': a range goes low-high"),
    ],
)
def test_a_cpu_that_does_not_exist_exits_2_naming_the_flag(value: str, message: str) -> None:
    proc = _authz("--cpu", value)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    assert message in err, err
    assert "Traceback" not in err
