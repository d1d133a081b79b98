"""bench/authz_bench.py still measures something real: a short run on the fast engine.

Every target (baseline, floor, meshward) answers every call without an error in both
loads; meshward and the floor decided, logged and traced every Check they served (the
OTLP sink counted the spans); each row reports the server's busy share; the ratio lines
name the floor and meshward against the baseline, with the ``1/CPU`` comparison.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_short_run_with_the_floor(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "authz_bench.py"), "--engine", "fast",
         "--floor", "--seconds", "0.5", "--warmup", "0.2", "--rounds", "1",
         "--requests", "200", "--rate", "200"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=240, check=False,
    )  # fmt: skip
    output = result.stdout
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr}\n{output}"

    row = re.compile(
        r"^(closed, 16 in flight|open, 200/s)\s+(\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+"
        r"([\d.]+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(\d+)$",
        re.M,
    )
    rows = {(m.group(1).split(",")[0], m.group(2)): m for m in row.finditer(output)}
    for mode in ("closed", "open"):
        for target in ("baseline/fast", "floor/fast", "meshward/fast"):
            match = rows.get((mode, target))
            assert match, f"no {mode} row for {target}:\n{output}"
            assert int(match.group(3)) > 0, match.group(0)  # checks/s
            assert int(match.group(7)) > 0, match.group(0)  # CPU µs per Check
            assert 0 < int(match.group(8)) <= 200, match.group(0)  # busy %
            assert match.group(10) == "0", match.group(0)  # errors

    served = {}
    for target in ("meshward/fast", "floor/fast"):
        match = re.search(
            rf"^# {re.escape(target)}: (\d+) decisions, (\d+) decision-log lines .*0 dropped",
            output,
            re.M,
        )
        assert match, f"no decision count for {target}:\n{output}"
        assert int(match.group(1)) > 0 and match.group(1) == match.group(2), match.group(0)
        served[target] = int(match.group(1))
    spans = re.search(r"^# (\d+) spans received by the OTLP sink", output, re.M)
    assert spans and int(spans.group(1)) == sum(served.values()), output

    for pair in ("floor/fast / baseline/fast", "meshward/fast / baseline/fast"):
        assert re.search(
            rf"^{re.escape(pair)}\s+throughput\s+[\d.]+\s+p99 at 200/s\s+[\d.]+\s+"
            r"1/CPU at 200/s\s+[\d.]+",
            output,
            re.M,
        ), f"no ratio line for {pair}:\n{output}"
