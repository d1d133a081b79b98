"""meshward behind a real Envoy against Envoy's own jwt_authn + rbac, on one policy.

One Envoy (``--concurrency 1``) answers every allowed request itself
(``direct_response``: no upstream is measured) and enforces one small policy
(``bench/envoy_bench_policy.yaml``: one RS256 issuer with a JWKS file, two routes, RBAC
on method + path by the token's ``groups``; DELETE granted to nobody) four ways:

(a) **none** — no authorization (``bench/envoy_plain.yaml``), the reference;
(b) **native** — Envoy's ``jwt_authn`` + ``rbac`` filters, hand-written to enforce the
    same policy (``bench/envoy_native.yaml``);
(c) **meshward stock** / (d) **meshward fast** — ext_authz to ``meshward authz --policy
    DIR --engine stock|fast`` wired as meshward's translator does
    (``bench/envoy_ext_authz.yaml``), with span export (OTLP/gRPC, every Check traced:
    Envoy samples 100 % and sends a sampled ``traceparent`` in the Check's gRPC
    metadata) and the decision log to a file on;
(e) **ceiling** — the same Envoy config as (c)/(d), its ext_authz pointed at a
    do-nothing Check server on the fast engine (``bench/authz_bench.py``'s baseline:
    answers OK without reading the request; it enforces nothing). What Envoy's own
    ext_authz path allows with an authz that costs nothing: no ext_authz service can
    make (d) faster than (e) on this machine.

Every variant's Envoy traces every request (OpenTelemetry tracer, 100 % sampled, spans in
batches of up to 512 to the same OTLP sink process, which counts and drops them), so the
only difference between variants is how requests are authorized.

Requests: a fixed list (~70 % allowed, ~15 % 403: valid token without a grant, ~15 %
401: no token, expired token, token signed by an unknown key) that wrk's Lua script
cycles through, identical for every variant. Before each measured run every distinct
request is sent once through that variant (which also warms the token caches) and its
status compared with the policy's answer; (b), (c) and (d) must agree request by request,
and the status mix under load must match the list's — a loud warning says when not.

Load: ``wrk`` (Debian ``wrk``), closed loop, one thread, ``--connections`` keep-alive
HTTP/1.1 connections: req/s, p50, p99 (from wrk's own latency histogram, through the
Lua ``done()`` hook), variants alternating over ``--rounds`` (medians). Then a fixed
offered load of ``--rate`` req/s (open loop) for (d) and, as a reference, (b):
``h2load --rps`` (Debian ``nghttp2-client``) over h2c with up to 64 streams per
connection, so a request is sent when it is due even while others are outstanding (no
coordinated omission) — it sends one writer token and the allowed GET paths of the list
(h2load cannot vary headers per request). Its per-request log gives p50/p99.

CPU placement (2 cores here): Envoy alone on one CPU; authz, the load generator, the
OTLP sink and this script on the other (``taskset``; ``--no-pin`` to let the scheduler
place them). With 3+ CPUs authz gets a CPU of its own.

Prints a table (req/s, p50, p99; the CPU µs per request of Envoy, authz and wrk; how busy
each CPU was, with every process on it, ours or not: this machine may be shared; the
status mix), the p99 at the fixed load, what authz traced and logged,
``ceiling/native: X.XX`` (req/s of (e) / (b)) and, as the last line, ``fast/native:
X.XX`` (req/s of (d) / (b)). It asserts nothing about speed.

    .venv/bin/python bench/envoy_bench.py --seconds 5 --rounds 3
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.authz_bench import Server, ServerSpec, _otlp_sink
from bench.authz_scaleout_bench import _wait_http, free_port
from meshward.envoy_binary import EnvoyNotFoundError, find_envoy

HERE = Path(__file__).resolve().parent
POLICY_FILE = HERE / "envoy_bench_policy.yaml"
ISSUER = "https://sso.bench.example"
AUDIENCE = "meshward-bench"
KID = "bench-sso-1"

NONE, NATIVE, STOCK, FAST = "none", "native", "meshward stock", "meshward fast"
CEILING = "ext_authz ceiling"
VARIANTS = (NONE, NATIVE, STOCK, FAST, CEILING)
LABELS = {
    NONE: "(a) none",
    NATIVE: "(b) native",
    STOCK: "(c) stock",
    FAST: "(d) fast",
    CEILING: "(e) ceiling",
}
TEMPLATES = {
    NONE: HERE / "envoy_plain.yaml",
    NATIVE: HERE / "envoy_native.yaml",
    STOCK: HERE / "envoy_ext_authz.yaml",
    FAST: HERE / "envoy_ext_authz.yaml",
    CEILING: HERE / "envoy_ext_authz.yaml",
}
ENGINES = {STOCK: "stock", FAST: "fast"}
ENFORCING = (NATIVE, STOCK, FAST)
#: What each tool is and where it comes from (checked before anything starts).
TOOLS = {
    "wrk": "apt-get install -y wrk",
    "h2load": "apt-get install -y nghttp2-client",
    "taskset": "apt-get install -y util-linux",
}


# == the workload =======================================================================


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: str | None
    expect: int  # what the policy answers
    kind: str


@dataclass
class Workload:
    policy_dir: Path
    jwks_path: Path
    policy_version: str
    requests: list[Request]
    open_loop_token: str
    open_loop_paths: list[str]


def build_workload(directory: Path, rng: random.Random) -> Workload:
    """The policy directory (the policy file + a fresh JWKS), tokens and the request list."""
    from joserfc import jwt
    from joserfc.jwk import RSAKey

    from meshward.policy.loader import load_policy

    (directory / "keys").mkdir(parents=True)
    shutil.copy(POLICY_FILE, directory / "mesh.yaml")
    key = RSAKey.generate_key(2048, parameters={"kid": KID})
    rogue = RSAKey.generate_key(2048, parameters={"kid": "bench-sso-rotated"})
    jwks_path = directory / "keys" / "bench-jwks.json"
    jwks = {"keys": [{**key.as_dict(private=False), "kid": KID, "use": "sig", "alg": "RS256"}]}
    jwks_path.write_text(json.dumps(jwks))
    policy = load_policy(directory)

    now = int(time.time())

    def token(sub: str, groups: list[str], *, exp: int = 86400, signer: Any = key) -> str:
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "groups": groups,
                  "iat": now - 60, "exp": now + exp}  # fmt: skip
        header = {"alg": "RS256", "kid": signer.kid, "typ": "JWT"}
        return str(jwt.encode(header, claims, signer, algorithms=["RS256"]))

    readers = [token(f"reader-{i}", ["readers"]) for i in range(15)]
    writers = [token(f"writer-{i}", ["writers", "staff"]) for i in range(10)]
    customers = [token(f"customer-{i}", ["customers"]) for i in range(5)]
    expired = [token(f"reader-x{i}", ["readers"], exp=-3600) for i in range(3)]
    unknown_key = [token(f"reader-r{i}", ["readers"], signer=rogue) for i in range(3)]

    def bearer(t: str) -> dict[str, str]:
        return {"authorization": f"Bearer {t}"}

    def order() -> str:
        return f"/orders/{rng.randrange(1, 100_000)}"

    body = '{"item":"book","qty":1}'
    # (count per 100, method, path, token pool, body, expected status, kind)
    mix: list[tuple[int, str, Any, list[str] | None, str | None, int, str]] = [
        (40, "GET", order, readers + writers, None, 200, "GET /orders/{id} reader|writer"),
        (10, "GET", lambda: "/orders", readers, None, 200, "GET /orders reader"),
        (8, "POST", lambda: "/orders", writers, body, 200, "POST /orders writer"),
        (4, "PUT", order, writers, body, 200, "PUT /orders/{id} writer"),
        (8, "GET", lambda: f"/catalog/items/{rng.randrange(1, 500)}", customers + readers,
         None, 200, "GET /catalog/items/{id}"),
        (5, "POST", lambda: "/orders", readers, body, 403, "POST /orders reader"),
        (5, "DELETE", order, writers, None, 403, "DELETE /orders/{id} writer"),
        (5, "GET", order, customers, None, 403, "GET /orders/{id} customer"),
        (9, "GET", order, None, None, 401, "no token"),
        (3, "GET", order, expired, None, 401, "expired token"),
        (3, "GET", order, unknown_key, None, 401, "unknown signing key"),
    ]  # fmt: skip
    requests: list[Request] = []
    for count, method, path, pool, payload, expect, kind in mix:
        for _ in range(count):
            headers = {"user-agent": "meshward-envoy-bench", "accept": "*/*"}
            if pool is not None:
                headers |= bearer(rng.choice(pool))
            if payload is not None:
                headers["content-type"] = "application/json"
            requests.append(Request(method, path(), headers, payload, expect, kind))
    rng.shuffle(requests)
    open_paths = [r.path for r in requests if r.method == "GET" and r.expect == 200][:40]
    return Workload(
        directory, jwks_path, policy.version, requests, writers[0], sorted(set(open_paths))
    )


# == processes ==========================================================================


@dataclass(frozen=True)
class Placement:
    """CPU lists (``taskset -c`` syntax) per role; None: not pinned."""

    envoy: str | None
    authz: str | None
    load: str | None

    def prefix(self, role: str) -> list[str]:
        cpus = getattr(self, role)
        return ["taskset", "-c", cpus] if cpus is not None else []

    def describe(self) -> str:
        if self.envoy is None:
            return "CPU placement: none (the scheduler places every process)"
        return (
            f"CPU placement (taskset): Envoy on CPU {self.envoy}; meshward authz on CPU "
            f"{self.authz}; wrk/h2load, the OTLP sink and this script on CPU {self.load}"
        )


def placement(pin: bool) -> Placement:
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return Placement(None, None, None)
    if len(cpus) == 2:
        return Placement(str(cpus[0]), str(cpus[1]), str(cpus[1]))
    return Placement(str(cpus[0]), str(cpus[1]), ",".join(map(str, cpus[2:])))


@dataclass
class Authz:
    """One ``meshward authz`` process on one engine."""

    engine: str
    port: int
    status_port: int
    decision_log: Path
    log: Path
    process: subprocess.Popen[bytes]

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise SystemExit(
                f"meshward authz --engine {self.engine} exited (code {code}); {self.log}:\n{tail}"
            )

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.status_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            name, value = line.rsplit(" ", 1)
            family = name.split("{", 1)[0]
            out[family] = out.get(family, 0.0) + float(value)
        return out


def start_authz(
    engine: str, workload: Workload, work: Path, otlp_port: int, where: Placement
) -> Authz:
    port, status_port = free_port(), free_port()
    meshward = Path(sys.executable).with_name("meshward")
    log = work / f"authz-{engine}.log"
    decision_log = work / f"decisions-{engine}.log"
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    command = [
        *where.prefix("authz"), str(meshward), "authz", "--policy", str(workload.policy_dir),
        "--engine", engine, "--listen", f"127.0.0.1:{port}",
        "--status-listen", f"127.0.0.1:{status_port}", "--log-level", "warning",
        "--decision-log", str(decision_log),
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    return Authz(engine, port, status_port, decision_log, log, process)


class Envoy:
    """One Envoy process for one run of one variant."""

    def __init__(self, work: Path, name: str, where: Placement) -> None:
        self.ports = {"admin": free_port(), "listen": free_port()}
        slug = name.replace(" ", "-")
        self.path = work / f"envoy-{slug}.yaml"
        self.log = work / f"envoy-{slug}.log"
        self.where = where
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, config: str) -> None:
        self.path.write_text(config)
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [*self.where.prefix("envoy"), find_envoy(), "-c", str(self.path),
                 "--concurrency", "1", "--disable-hot-restart", "--log-level", "error"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait_http(f"http://127.0.0.1:{self.ports['admin']}/ready", b"LIVE", 20, "envoy", self.log)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['listen']}"

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


def cpu_times() -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies of every CPU since boot, from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(f) for f in fields[:8]]
            idle = ticks[3] + ticks[4]  # idle + iowait
            out[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return out


def busy_percent(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> str:
    """How busy each CPU was between two :func:`cpu_times` (every process on it)."""
    parts = []
    for cpu in sorted(after):
        busy = after[cpu][0] - before[cpu][0]
        total = after[cpu][1] - before[cpu][1]
        parts.append(f"{100 * busy / total:.0f}" if total else "?")
    return "/".join(parts)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def envoy_config(variant: str, envoy: Envoy, workload: Workload, ports: dict[str, int]) -> str:
    fields = {
        "admin_port": envoy.ports["admin"],
        "listen_port": envoy.ports["listen"],
        "collector_port": ports["otlp"],
        "jwks_path": str(workload.jwks_path),
        "policy_version": workload.policy_version,
        "authz_port": ports.get(variant, 0),
    }
    return string.Template(TEMPLATES[variant].read_text()).substitute(fields)


# == checking what each variant enforces ================================================


def statuses_of(url: str, requests: list[Request]) -> list[int]:
    """Send every request once (one keep-alive connection); the status of each."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    out = []
    try:
        for request in requests:
            connection.request(request.method, request.path, request.body, request.headers)
            response = connection.getresponse()
            response.read()
            out.append(response.status)
    finally:
        connection.close()
    return out


def warn(message: str) -> None:
    banner = "!" * 78
    text = f"{banner}\n!!! WARNING: {message}\n{banner}"
    print(text, flush=True)
    print(text, file=sys.stderr, flush=True)


# == load ===============================================================================


def wrk_script(requests: list[Request], path: Path) -> None:
    """Cycle through the requests; count statuses; print one JSON line from done()."""

    def lua(text: str | None) -> str:
        return "nil" if text is None else json.dumps(text)  # JSON strings are Lua strings

    lines = ["local spec = {}"]
    for r in requests:
        fields = ", ".join(f"[{lua(k)}] = {lua(v)}" for k, v in r.headers.items())
        lines.append(
            f"spec[#spec + 1] = {{{lua(r.method)}, {lua(r.path)}, {{{fields}}}, {lua(r.body)}}}"
        )
    lines += [
        "local threads = {}",
        "setup = function(thread) threads[#threads + 1] = thread end",
        "local r = {}",
        "local i = 0",
        "statuses = {}",
        # Formatted in init(): wrk.host (the Host header) is not known at load time.
        "init = function(args)",
        "  for _, s in ipairs(spec) do r[#r + 1] = wrk.format(s[1], s[2], s[3], s[4]) end",
        "end",
        "request = function()",
        "  i = i % #r + 1",
        "  return r[i]",
        "end",
        "response = function(status, headers, body)",
        "  statuses[status] = (statuses[status] or 0) + 1",
        "end",
        "done = function(summary, latency, requests)",
        "  local parts = {}",
        "  for _, t in ipairs(threads) do",
        "    for status, n in pairs(t:get('statuses')) do",
        "      parts[#parts + 1] = string.format('\"%d\": %d', status, n)",
        "    end",
        "  end",
        "  local e = summary.errors",
        '  io.write(string.format(\'WRK_RESULT {"requests": %d, "duration_us": %d, \'',
        '    .. \'"p50_us": %d, "p99_us": %d, "socket_errors": %d, "statuses": {%s}}\\n\',',
        "    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),",
        "    e.connect + e.read + e.write + e.timeout, table.concat(parts, ', ')))",
        "end",
    ]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class Run:
    rate: float
    p50: float  # ms
    p99: float  # ms
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    envoy_us: float = 0.0  # Envoy's CPU per request
    authz_us: float = 0.0  # authz's CPU per request (meshward variants)
    wrk_us: float = 0.0  # the load generator's CPU per request
    busy: str = ""  # each CPU's busy % during the run (all processes, ours or not)


def run_wrk(url: str, script: Path, seconds: int, connections: int, where: Placement) -> Run:
    command = [*where.prefix("load"), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
               "-s", str(script), url]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    match = re.search(r"^WRK_RESULT (.*)$", out, re.MULTILINE)
    if match is None:
        raise SystemExit(f"unexpected wrk output:\n{out}")
    result = json.loads(match.group(1))
    return Run(
        rate=result["requests"] / (result["duration_us"] / 1e6),
        wrk_us=1e6 * wrk_cpu / max(result["requests"], 1),
        p50=result["p50_us"] / 1000,
        p99=result["p99_us"] / 1000,
        statuses=Counter({int(k): v for k, v in result["statuses"].items()}),
        errors=result["socket_errors"],
    )


def run_h2load(
    url: str,
    workload: Workload,
    *,
    rate: int,
    seconds: int,
    warmup: int,
    work: Path,
    where: Placement,
) -> Run:
    """Open loop at ``rate`` req/s: 4 h2c connections x rate/4 req/s, 64 streams each."""
    clients = 4
    uris = work / "h2load-uris.txt"
    uris.write_text("".join(f"{url}{p}\n" for p in workload.open_loop_paths))
    log = work / "h2load.log"
    command = [
        *where.prefix("load"), "h2load", "-t1", f"-c{clients}", "-m64",
        f"--rps={rate / clients:g}", f"-D{seconds}s", f"--warm-up-time={warmup}s",
        "-H", f"authorization: Bearer {workload.open_loop_token}",
        "-H", "user-agent: meshward-envoy-bench", f"--log-file={log}", "-i", str(uris),
    ]  # fmt: skip
    for attempt in range(3):
        log.unlink(missing_ok=True)
        out = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=seconds + 60
        )
        text = log.read_text() if log.exists() else ""
        rows = [line.split("\t") for line in text.splitlines() if line.strip()]
        if out.returncode == 0 and len(rows) >= rate * seconds / 2:
            break
        # Seen once: h2load 1.52 (--rps, -D) finishing after sending nothing.
        print(f"# h2load sent {len(rows)} requests (attempt {attempt + 1}); again", flush=True)
    else:
        raise SystemExit(f"h2load failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    starts = [int(r[0]) for r in rows]
    latencies = sorted(int(r[2]) / 1000 for r in rows)
    statuses = Counter(int(r[1]) for r in rows)
    span = (max(starts) - min(starts)) / 1e6 or 1.0

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return Run(len(rows) / span, pct(0.50), pct(0.99), statuses, statuses.pop(-1, 0))


# == the bench ==========================================================================


def mix_text(statuses: Counter[int]) -> str:
    total = sum(statuses.values())
    if not total:
        return "(none)"
    return " ".join(f"{s}:{100 * n / total:.0f}%" for s, n in sorted(statuses.items()))


def check_tools() -> str | None:
    for tool, install in TOOLS.items():
        if shutil.which(tool) is None:
            return f"bench/envoy_bench.py needs {tool}: {install}"
    try:
        find_envoy()
    except EnvoyNotFoundError as error:
        return f"bench/envoy_bench.py needs Envoy: {error}"
    return None


def _sink(conn: Connection, cpus: set[int] | None) -> None:
    """The OTLP sink of bench/authz_bench.py; Ctrl-C is for the parent, which stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _otlp_sink(conn, cpus)


def _terminate(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt


@dataclass
class Bench:
    """Everything a run of one variant needs: the workload and the long-lived processes."""

    args: argparse.Namespace
    work: Path
    where: Placement
    workload: Workload
    script: Path
    authz: dict[str, Authz]
    ports: dict[str, int]
    #: (e)'s do-nothing Check server.
    ceiling: Server
    runs: dict[str, list[Run]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    fixed: dict[str, list[Run]] = field(default_factory=lambda: {NATIVE: [], FAST: []})
    answers: dict[str, list[int]] = field(default_factory=dict)

    def measure(self, variant: str) -> None:
        """One Envoy for ``variant``: the policy check, warm-up, wrk, (h2load)."""
        args = self.args
        if variant in self.authz:
            self.authz[variant].check_alive()
        envoy = Envoy(self.work, variant, self.where)
        try:
            envoy.start(envoy_config(variant, envoy, self.workload, self.ports))
            got = statuses_of(envoy.url, self.workload.requests)  # also warms caches
            if self.answers.get(variant, got) != got:
                warn(f"{LABELS[variant]} answered differently from one round to the next")
            self.answers[variant] = got
            if args.warmup:
                run_wrk(envoy.url, self.script, args.warmup, args.connections, self.where)
            pids = [envoy.pid]
            if variant in self.authz:
                pids.append(self.authz[variant].process.pid)
            elif variant == CEILING:
                pids.append(self.ceiling.pid)
            before = [cpu_seconds(pid) for pid in pids]
            machine = cpu_times()
            run = run_wrk(envoy.url, self.script, args.seconds, args.connections, self.where)
            if variant in self.authz:
                self.authz[variant].check_alive()
            run.busy = busy_percent(machine, cpu_times())
            used = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
            done = max(run.rate * args.seconds, 1.0)
            run.envoy_us = 1e6 * used[0] / done
            run.authz_us = 1e6 * used[1] / done if len(used) > 1 else 0.0
            self.runs[variant].append(run)
            if variant in self.fixed:
                self.fixed[variant].append(
                    run_h2load(
                        envoy.url, self.workload, rate=args.rate, seconds=args.seconds,
                        warmup=args.warmup, work=self.work, where=self.where,
                    )
                )  # fmt: skip
        finally:
            envoy.stop()

    def check_agreement(self) -> None:
        """Loud warnings unless (b), (c), (d) answered every request as the policy says,
        and every variant's status mix under load is the request list's."""
        requests = self.workload.requests
        want = Counter(r.expect for r in requests)
        agree = True
        for variant in ENFORCING:
            wrong = [
                (r, got)
                for r, got in zip(requests, self.answers[variant], strict=True)
                if got != r.expect
            ]
            if wrong:
                agree = False
                sample = "; ".join(
                    f"{r.kind} {r.method} {r.path}: {got} (policy: {r.expect})"
                    for r, got in wrong[:5]
                )
                warn(
                    f"{LABELS[variant]} does not enforce the policy on {len(wrong)} of "
                    f"{len(requests)} requests: {sample}"
                )
        for variant in (NONE, CEILING):
            if any(s != 200 for s in self.answers[variant]):
                warn(
                    f"{LABELS[variant]} did not answer 200 to every request: "
                    f"{Counter(self.answers[variant])}"
                )
        if agree:
            print(
                f"# (b), (c), (d) agree with the policy on all {len(requests)} distinct "
                f"requests, one by one ({mix_text(want)})",
                flush=True,
            )
        for variant in VARIANTS:
            total = _statuses(self.runs[variant])
            share = want if variant in ENFORCING else Counter({200: len(requests)})
            n = sum(total.values())
            off = not n or any(
                abs(total[s] / n - share[s] / len(requests)) > 0.02 for s in set(total) | set(share)
            )
            if off:
                warn(
                    f"{LABELS[variant]} under load answered {mix_text(total)}, the request "
                    f"list calls for {mix_text(share)}"
                )

    def report(self) -> dict[str, float]:
        """The table and the fixed-load lines; the median req/s of each variant."""
        print(
            "# Envoy, authz, wrk: their CPU µs per request (user + system, every thread); "
            "busy %: each CPU's busy time during the run, every process on it (ours or not; "
            "median run)",
            flush=True,
        )
        print(
            f"{'variant':<12} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'Envoy':>6} {'authz':>6}"
            f" {'wrk':>5} {'busy %':>8}  status mix (all rounds)"
        )
        rate: dict[str, float] = {}
        for variant in VARIANTS:
            rs = self.runs[variant]
            rate[variant] = statistics.median(r.rate for r in rs)
            p50 = statistics.median(r.p50 for r in rs)
            p99 = statistics.median(r.p99 for r in rs)
            envoy_us = statistics.median(r.envoy_us for r in rs)
            authz_us = statistics.median(r.authz_us for r in rs)
            wrk_us = statistics.median(r.wrk_us for r in rs)
            busy = sorted(rs, key=lambda r: r.rate)[len(rs) // 2].busy
            measured = variant in self.authz or variant == CEILING
            authz_text = f"{authz_us:>6.0f}" if measured else f"{'-':>6}"
            errors = sum(r.errors for r in rs)
            extra = f"  socket errors {errors}" if errors else ""
            print(
                f"{LABELS[variant]:<12} {rate[variant]:>8.0f} {p50:>7.2f} {p99:>7.2f} "
                f"{envoy_us:>6.0f} {authz_text} {wrk_us:>5.0f} {busy:>8}  "
                f"{mix_text(_statuses(rs))}{extra}",
                flush=True,
            )
        for variant, rs in self.fixed.items():
            failed = sum(r.errors for r in rs)
            print(
                f"fixed load {self.args.rate} req/s, {LABELS[variant]}: p99 "
                f"{statistics.median(r.p99 for r in rs):.2f} ms, p50 "
                f"{statistics.median(r.p50 for r in rs):.2f} ms (achieved "
                f"{statistics.median(r.rate for r in rs):.0f} req/s; {mix_text(_statuses(rs))}"
                f"{f'; {failed} failed' if failed else ''})",
                flush=True,
            )
        return rate

    def report_telemetry(self) -> None:
        """What authz exported and logged over the whole bench."""
        for variant, process in self.authz.items():
            deadline = time.monotonic() + 10
            while True:  # until the span batches and the decision log have caught up
                m = process.metrics()
                with process.decision_log.open("rb") as log:
                    chunks = iter(lambda: log.read(1 << 20), b"")
                    lines = sum(chunk.count(b"\n") for chunk in chunks)
                decisions = m.get("meshward_authz_decisions_total", 0)
                spans = m.get("meshward_authz_spans_exported_total", 0)
                if (lines >= decisions and spans >= decisions) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            print(
                f"# {LABELS[variant]}: {decisions:.0f} decisions, {spans:.0f} spans "
                f"exported ({m.get('meshward_authz_spans_dropped_total', 0):.0f} dropped, "
                f"{m.get('meshward_authz_spans_queued', 0):.0f} queued), {lines} decision-log "
                "lines",
                flush=True,
            )


def _statuses(runs: list[Run]) -> Counter[int]:
    total: Counter[int] = Counter()
    for run in runs:
        total.update(run.statuses)
    return total


def print_header(bench: Bench) -> None:
    args, workload = bench.args, bench.workload
    print(
        f"# one Envoy (--concurrency 1, direct_response upstream), policy "
        f"{workload.policy_version} (bench/envoy_bench_policy.yaml: RS256 JWT, RBAC on "
        f"method + path by group); {len(workload.requests)} distinct requests: "
        f"{mix_text(Counter(r.expect for r in workload.requests))}",
        flush=True,
    )
    print(
        "# every variant's Envoy traces every request (OpenTelemetry, 100 % sampled, "
        "batches of 512 to an OTLP sink); (c)/(d) also export authz's decision span for "
        "every Check and write the decision log to a file; (b) native: jwt_authn "
        "(token cache on) + rbac, no access log; (e) ceiling: (c)/(d)'s Envoy config "
        "with ext_authz to a do-nothing Check server (fast engine, enforces nothing)",
        flush=True,
    )
    print(
        f"# closed loop: wrk -t1 -c{args.connections} -d{args.seconds}s after "
        f"{args.warmup}s warm-up, {args.rounds} alternating round(s) (medians); fixed load: "
        f"h2load --rps, {args.rate} req/s over 4 h2c connections, {args.seconds}s after "
        f"{args.warmup}s warm-up (one writer token, allowed GETs)",
        flush=True,
    )
    one, five, fifteen = os.getloadavg()
    print(
        f"# {bench.where.describe()}; cpus {os.cpu_count()}, load average "
        f"{one:.2f} {five:.2f} {fifteen:.2f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk before each run")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per variant")
    parser.add_argument("--rate", type=int, default=1000, help="fixed offered load, req/s")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="no taskset")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.rounds < 1 or args.warmup < 0 or args.rate < 4:
        parser.error("--seconds and --rounds must be >= 1, --warmup >= 0, --rate >= 4")
    missing = check_tools()
    if missing is not None:
        print(missing, file=sys.stderr)
        return 2

    where = placement(args.pin)
    load_cpus = {int(c) for c in where.load.split(",")} if where.load else None
    affinity = os.sched_getaffinity(0)
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
    previous = signal.signal(signal.SIGTERM, _terminate)
    work = Path(tempfile.mkdtemp(prefix="meshward-envoy-bench-"))
    context = multiprocessing.get_context("spawn")
    sink_conn, sink_child = context.Pipe()
    sink = context.Process(target=_sink, args=(sink_child, load_cpus), daemon=True)
    authz: dict[str, Authz] = {}
    ceiling: Server | None = None
    try:
        workload = build_workload(work / "policy", random.Random(args.seed))
        script = work / "requests.lua"
        wrk_script(workload.requests, script)
        sink.start()
        ports = {"otlp": sink_conn.recv()}
        for variant, engine in ENGINES.items():
            authz[variant] = start_authz(engine, workload, work, ports["otlp"], where)
        for variant, process in authz.items():
            _wait_http(
                f"http://127.0.0.1:{process.status_port}/healthz", None, 60,
                f"meshward authz --engine {process.engine}", process.log,
            )  # fmt: skip
            ports[variant] = process.port
        authz_cpus = {int(c) for c in where.authz.split(",")} if where.authz else None
        ceiling = Server(ServerSpec("baseline", "fast", 1, "", "", "", authz_cpus))
        ports[CEILING] = ceiling.port
        bench = Bench(args, work, where, workload, script, authz, ports, ceiling)
        print_header(bench)
        for _ in range(args.rounds):
            for variant in VARIANTS:
                bench.measure(variant)
        bench.check_agreement()
        rate = bench.report()
        bench.report_telemetry()
        sink_conn.send("stop")
        received = sink_conn.recv() if sink_conn.poll(10) else "?"
        sink.join(5)
        print(
            f"# OTLP sink received {received} spans (Envoy's and authz's); load average at "
            f"the end {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        print(f"ceiling/native: {rate[CEILING] / rate[NATIVE]:.2f}", flush=True)
        print(f"fast/native: {rate[FAST] / rate[NATIVE]:.2f}", flush=True)
    except KeyboardInterrupt:
        print("# interrupted", file=sys.stderr)
        return 130
    finally:
        for process in authz.values():
            if process.process.poll() is None:
                process.process.terminate()
        for process in authz.values():
            _stop(process.process)
        if ceiling is not None and ceiling.process.is_alive():
            ceiling.stop()
        if sink.is_alive():
            try:
                sink_conn.send("stop")
                if sink_conn.poll(5):
                    sink_conn.recv()
            except OSError:
                pass
            sink.join(5)
            if sink.is_alive():
                sink.kill()
        signal.signal(signal.SIGTERM, previous)
        os.sched_setaffinity(0, affinity)
        if args.keep:
            print(f"# kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
