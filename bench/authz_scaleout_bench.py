"""Scale-out: one Envoy in front of 1 versus 2 meshward authz processes.

A real Envoy (``--concurrency 1``; ``bench/authz_scaleout_envoy.yaml``) runs ext_authz as
meshward's translator configures it (HTTP/2 gRPC cluster ``meshward_authz``, V3, fail
closed) and answers allowed requests itself (``direct_response``), so no upstream is
measured; its routes are the edge gateway of the generated policy of
``bench/authz_bench.py`` (same generator: 10 services, 3 issuers, 50 roles, 200
bindings, 20 API keys), each carrying the route context the translator writes.
The authz processes are ``meshward authz --policy DIR`` (engine ``auto``: the fast
engine when its start-up guard passes), with what production has on: OTLP span
export (to a sink process that counts and drops spans), the decision log to a file,
metrics. The ``meshward_authz`` cluster lists one or both
processes as endpoints (round robin over Envoy's HTTP/2 connection to each).

Load comes from ``wrk`` (Debian package ``wrk``; one thread, keep-alive connections)
with a Lua script rotating through JWT (the three issuers, 500 distinct tokens) and
API-key requests, allowed and denied (mTLS-only requests need a TLS listener and are
left out here). A reference run has ext_authz disabled on every route: Envoy and wrk
alone on this machine.

On a 2-core machine Envoy, wrk and the authz processes share the cores (nothing is
pinned), so the gain from a second authz process is bounded by the CPU left over, not by
authz. Prints req/s and p50/p99 per variant (median of alternating rounds), how the
decisions split across the processes, and the ratio 2/1.

    .venv/bin/python bench/authz_scaleout_bench.py --seconds 5 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import shutil
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.authz_bench import _otlp_sink, build_requests, generate_policy
from meshward import route_context
from meshward.envoy_binary import find_envoy

TEMPLATE = Path(__file__).with_name("authz_scaleout_envoy.yaml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, expect: bytes | None, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if expect is None or response.read().strip() == expect:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise SystemExit(f"{what} did not become ready ({url}); see {log}:\n{tail}")


@dataclass
class Authz:
    """One ``meshward authz`` process."""

    port: int
    status_port: int
    process: subprocess.Popen[bytes]

    def decisions(self) -> float:
        """Sum of ``meshward_authz_decisions_total`` from its ``/metrics``."""
        url = f"http://127.0.0.1:{self.status_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("meshward_authz_decisions_total{")
        )


def start_authz(policy_dir: Path, work: Path, index: int, otlp_port: int) -> Authz:
    port, status_port = free_port(), free_port()
    meshward = Path(sys.executable).with_name("meshward")
    log = work / f"authz-{index}.log"
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    command = [
        str(meshward), "authz", "--policy", str(policy_dir),
        "--listen", f"127.0.0.1:{port}", "--status-listen", f"127.0.0.1:{status_port}",
        "--log-level", "warning", "--decision-log", str(work / f"decisions-{index}.log"),
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    _wait_http(f"http://127.0.0.1:{status_port}/healthz", None, 30, f"authz {index}", log)
    return Authz(port, status_port, process)


def envoy_config(
    policy: object, authz: list[Authz], ports: dict[str, int], *, with_authz: bool
) -> str:
    gateway = next(g for g in policy.gateways if g.name == "edge")  # type: ignore[attr-defined]
    version = policy.version  # type: ignore[attr-defined]
    routes = []
    for route in gateway.routes:
        if with_authz:
            context = {
                route_context.ROUTE: route.name,
                route_context.SERVICE: route.service,
                route_context.GATEWAY: gateway.name,
                route_context.POLICY_VERSION: version,
            }
            per_route = {"check_settings": {"context_extensions": context}}
        else:
            per_route = {"disabled": True}
        entry = {
            "match": {"prefix": route.match.prefix},
            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
            "typed_per_filter_config": {
                "envoy.filters.http.ext_authz": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3."
                    "ExtAuthzPerRoute",
                    **per_route,
                }
            },
        }
        routes.append(" " * 24 + "- " + json.dumps(entry))  # JSON is YAML flow style
    endpoints = []
    for process in authz:
        address = {"socket_address": {"address": "127.0.0.1", "port_value": process.port}}
        endpoints.append(" " * 14 + "- " + json.dumps({"endpoint": {"address": address}}))
    return string.Template(TEMPLATE.read_text()).substitute(
        admin_port=ports["admin"],
        listen_port=ports["listen"],
        routes="\n".join(routes),
        authz_endpoints="\n".join(endpoints),
    )


class Envoy:
    def __init__(self, work: Path, name: str) -> None:
        self.ports = {"admin": free_port(), "listen": free_port()}
        self.path = work / f"envoy-{name}.yaml"
        self.log = work / f"envoy-{name}.log"

    def start(self, config: str) -> None:
        self.path.write_text(config)
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [find_envoy(), "-c", str(self.path), "--concurrency", "1",
                 "--disable-hot-restart", "--log-level", "error"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        admin = f"http://127.0.0.1:{self.ports['admin']}/ready"
        _wait_http(admin, b"LIVE", 20, "envoy", self.log)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()


def wrk_script(requests: list[tuple[str, str, dict[str, str]]], path: Path) -> None:
    """A wrk Lua script cycling through pre-formatted requests."""

    def lua(text: str) -> str:
        return json.dumps(text)  # a JSON string is a valid Lua string for ASCII text

    # Formatted in init(): wrk.host (the Host header) is not known at load time.
    lines = ["local spec = {}"]
    for method, target, headers in requests:
        fields = ", ".join(f"[{lua(k)}] = {lua(v)}" for k, v in headers.items())
        lines.append(f"spec[#spec + 1] = {{{lua(method)}, {lua(target)}, {{{fields}}}}}")
    lines += [
        "local r = {}",
        "local i = 0",
        "init = function(args)",
        "  for _, s in ipairs(spec) do r[#r + 1] = wrk.format(s[1], s[2], s[3]) end",
        "end",
        "request = function()",
        "  i = i % #r + 1",
        "  return r[i]",
        "end",
    ]
    path.write_text("\n".join(lines) + "\n")


def wrk(url: str, script: Path, seconds: float, connections: int) -> tuple[float, float, float]:
    """(req/s, p50 ms, p99 ms) from one wrk run (denied requests count: authz answered)."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True, timeout=seconds + 30,
    ).stdout  # fmt: skip
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise SystemExit(f"unexpected wrk output:\n{out}")
    errors = re.search(r"Socket errors:.*", out)
    if errors:
        print(f"# wrk: {errors.group(0)}", flush=True)

    def pct(label: str) -> float:
        found = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)\b", out)
        if found is None:
            raise SystemExit(f"unexpected wrk output:\n{out}")
        value, unit = float(found.group(1)), found.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return float(match.group(1)), pct("50"), pct("99")


def http_requests(work: object, count: int, rng: random.Random) -> list[tuple[str, str, dict]]:
    """JWT and API-key requests at the edge gateway (from the bench's CheckRequests)."""
    from envoy.service.auth.v3 import external_auth_pb2

    out: list[tuple[str, str, dict[str, str]]] = []
    for data, _ in build_requests(work, count, rng):  # type: ignore[arg-type]
        message = external_auth_pb2.CheckRequest.FromString(data)
        attributes = message.attributes
        http = attributes.request.http
        if (
            attributes.source.principal
            or attributes.context_extensions.get(route_context.GATEWAY) != "edge"
        ):
            continue  # mTLS-only or partner-gateway requests
        if http.method == "HEAD":
            continue  # wrk would wait for a body that a HEAD response never has
        headers = {
            k: v for k, v in http.headers.items() if k in ("authorization", "x-api-key",
                                                             "user-agent", "accept")
        }  # fmt: skip
        out.append((http.method, http.path, headers))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per variant")
    parser.add_argument("--requests", type=int, default=2000, help="distinct requests")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench/authz_scaleout_bench.py needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2

    work_dir = Path(tempfile.mkdtemp(prefix="meshward-scaleout-bench-"))
    rng = random.Random(args.seed)
    authz: list[Authz] = []
    context = multiprocessing.get_context("spawn")
    sink_conn, sink_child = context.Pipe()
    sink = context.Process(target=_otlp_sink, args=(sink_child, None), daemon=True)
    try:
        work = generate_policy(work_dir / "policy", rng)
        requests = http_requests(work, args.requests, rng)
        script = work_dir / "requests.lua"
        wrk_script(requests, script)
        sink.start()
        otlp_port = sink_conn.recv()
        authz = [start_authz(work.directory, work_dir, i, otlp_port) for i in range(2)]
        variants = {
            "1 authz process": (authz[:1], True),
            "2 authz processes": (authz, True),
            "Envoy alone (no ext_authz)": (authz[:1], False),
        }
        print(
            f"# Envoy --concurrency 1 + ext_authz (HTTP/2) -> meshward authz (engine auto, "
            f"OTLP export, decision log file, metrics); policy {work.policy.version}: "
            f"{len(work.policy.roles)} roles, {len(work.policy.bindings)} bindings, 3 issuers; "
            f"{len(requests)} JWT/API-key requests; wrk -t1 -c{args.connections} "
            f"{args.seconds:g}s; cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        print(
            f"# this machine has {os.cpu_count()} cores shared by Envoy, wrk and every authz "
            "process (nothing pinned): the second process can only use what they leave",
            flush=True,
        )
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
        shares: dict[str, list[list[float]]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, (endpoints, with_authz) in variants.items():
                envoy = Envoy(work_dir, f"{len(endpoints)}-{with_authz}")
                envoy.start(
                    envoy_config(work.policy, endpoints, envoy.ports, with_authz=with_authz)
                )
                try:
                    url = f"http://127.0.0.1:{envoy.ports['listen']}"
                    wrk(url, script, 1.0, args.connections)  # warm-up
                    before = [a.decisions() for a in authz]
                    results[name].append(wrk(url, script, args.seconds, args.connections))
                    shares[name].append(
                        [a.decisions() - b for a, b in zip(authz, before, strict=True)]
                    )
                finally:
                    envoy.stop()

        print(f"{'variant':<28} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7}  decisions per process")
        summary = {}
        for name, runs in results.items():
            rate = statistics.median(r[0] for r in runs)
            p50 = statistics.median(r[1] for r in runs)
            p99 = statistics.median(r[2] for r in runs)
            summary[name] = (rate, p99)
            split = [sum(s[i] for s in shares[name]) for i in range(len(authz))]
            total = sum(split)
            spread = " / ".join(f"{100 * n / total:.0f}%" for n in split) if total else "(none)"
            print(f"{name:<28} {rate:>8.0f} {p50:>7.2f} {p99:>7.2f}  {spread}")
        one, two = summary["1 authz process"], summary["2 authz processes"]
        print(f"scale-out ratio (2 processes / 1): {two[0] / one[0]:.2f} req/s, "
              f"p99 {two[1] / one[1]:.2f}")  # fmt: skip
        alone = summary["Envoy alone (no ext_authz)"][0]
        print(f"# 2 processes reach {100 * two[0] / alone:.0f}% of Envoy alone on this machine")
    finally:
        for a in authz:
            a.process.terminate()
        for a in authz:
            try:
                a.process.wait(10)
            except subprocess.TimeoutExpired:
                a.process.kill()
        if sink.is_alive():
            sink_conn.send("stop")
            sink_conn.recv()
            sink.join(5)
        if args.keep:
            print(f"# kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
