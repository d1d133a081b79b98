"""bench/envoy_bench.py still measures something real, with real Envoy, authz, wrk, h2load.

A one-second run of every variant: the four variants answer, the three enforcing ones
agree with the policy request by request (no warning), authz traced and logged every
decision, the fixed-load run happened, the last line is the ratio, and nothing is left
behind (processes, temporary files). Needs ``wrk`` and ``h2load`` (Debian packages
``wrk`` and ``nghttp2-client``): without them the bench exits 2 and this test fails,
naming the package.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def test_one_short_run_of_every_variant(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "envoy_bench.py"),
         "--seconds", "1", "--rounds", "1", "--warmup", "0"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=180, check=False,
    )  # fmt: skip
    output = result.stdout
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr}\n{output}"
    assert "WARNING" not in output + result.stderr, output

    # The policy check passed for (b), (c), (d), request by request.
    assert re.search(r"^# \(b\), \(c\), \(d\) agree with the policy on all 100 ", output, re.M)
    # One row per variant: req/s, p50, p99, CPU per request (Envoy, authz, wrk), busy %
    # per CPU, status mix.
    rows = {}
    for label in ("(a) none", "(b) native", "(c) stock", "(d) fast"):
        match = re.search(
            rf"^{re.escape(label)}\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\S+)\s+(\d+)\s+([\d/?]+)\s+(.*)$",
            output,
            re.M,
        )
        assert match, f"no row for {label}:\n{output}"
        rows[label] = match
        assert int(match.group(1)) > 0
        assert 0 < float(match.group(2)) <= float(match.group(3))
    assert rows["(a) none"].group(8) == "200:100%"
    for label in ("(b) native", "(c) stock", "(d) fast"):
        assert rows[label].group(8) == "200:70% 401:15% 403:15%", rows[label].group(0)
    assert rows["(a) none"].group(5) == "-"
    assert int(rows["(d) fast"].group(5)) > 0  # authz's CPU was measured

    # The fixed offered load reached (d) and was answered.
    fixed = re.search(
        r"^fixed load 1000 req/s, \(d\) fast: p99 ([\d.]+) ms, p50 ([\d.]+) ms "
        r"\(achieved (\d+) req/s; 200:100%\)$",
        output,
        re.M,
    )
    assert fixed, output
    assert 0 < float(fixed.group(2)) <= float(fixed.group(1))
    assert 500 < int(fixed.group(3)) < 1500

    # Every decision was traced (span exported) and logged, on both engines.
    for label in ("(c) stock", "(d) fast"):
        match = re.search(
            rf"^# {re.escape(label)}: (\d+) decisions, (\d+) spans exported "
            r"\(0 dropped, 0 queued\), (\d+) decision-log lines$",
            output,
            re.M,
        )
        assert match, output
        decisions, spans, lines = map(int, match.groups())
        assert decisions > 100
        assert spans == decisions == lines

    # The last line is the ratio.
    assert re.fullmatch(r"fast/native: \d+\.\d\d", output.rstrip("\n").splitlines()[-1])

    # Nothing left behind: no process running from the work directory, no files.
    assert _processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []
