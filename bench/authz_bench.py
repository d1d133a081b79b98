"""Check throughput and latency: meshward's AuthzService against a do-nothing server.

Both servers run in this process on the same grpcio settings (sync server, the same
number of worker threads, the same options); the load comes from a separate process
(multiprocessing, spawn) holding a fixed number of calls in flight over one HTTP/2
connection, as Envoy does. Each target gets a short warm-up, then ``--seconds`` of
measurement. meshward runs the demo-like policy with valid RS256 JWTs for a mix of
allowed and denied subjects, tracing on (a provider without exporter, so spans are
made and dropped) and decision logs formatted as JSON into /dev/null.

Prints a table and the ratios; it asserts nothing about speed.

    .venv/bin/python bench/authz_bench.py --seconds 3 --concurrency 16
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHOD = "/envoy.service.auth.v3.Authorization/Check"


@dataclass
class Result:
    name: str
    checks: int
    errors: int
    seconds: float
    latencies: list[float]
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.checks / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


# -- load generator (child process) ----------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    port: int
    requests: list[bytes]
    concurrency: int
    warmup: float
    seconds: float


def _load(spec: LoadSpec, out: Any) -> None:
    """Keep ``concurrency`` calls in flight; report calls finished inside the window."""
    import asyncio

    import grpc

    port, requests, concurrency = spec.port, spec.requests, spec.concurrency
    warmup, seconds = spec.warmup, spec.seconds

    async def run() -> tuple[int, int, list[float]]:
        latencies: list[float] = []
        errors = 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(METHOD)  # bytes in, bytes out: no client parsing
            await channel.channel_ready()
            start = time.perf_counter() + warmup
            end = start + seconds

            async def worker(offset: int) -> None:
                nonlocal errors
                i = offset
                while True:
                    began = time.perf_counter()
                    if began >= end:
                        return
                    try:
                        await call(requests[i % len(requests)])
                    except grpc.RpcError:
                        errors += 1
                    finished = time.perf_counter()
                    if began >= start and finished <= end:
                        latencies.append(finished - began)
                    i += concurrency

            async def mark_window() -> None:
                await asyncio.sleep(max(0.0, start - time.perf_counter()))
                out.put("start")  # the parent samples its CPU clock here …

            await asyncio.gather(mark_window(), *(worker(k) for k in range(concurrency)))
        return len(latencies), errors, latencies  # … and again when this arrives

    out.put(asyncio.run(run()))


def measure(name: str, port: int, requests: list[bytes], args: argparse.Namespace) -> Result:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    process = context.Process(
        target=_load,
        args=(LoadSpec(port, requests, args.concurrency, args.warmup, args.seconds), out),
        daemon=True,
    )
    process.start()
    # Server CPU (this process) over the measured window only.
    if out.get(timeout=args.warmup + 60) != "start":
        raise RuntimeError("load generator did not start")
    before = _cpu()
    checks, errors, latencies = out.get(timeout=args.seconds + 60)
    after = _cpu()
    process.join(10)
    return Result(name, checks, errors, args.seconds, latencies, after - before)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- servers (this process) -----------------------------------------------------------


def start_baseline(workers: int) -> tuple[Any, int]:
    """A Check server that parses the request and answers OK, on AuthzService's settings."""
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2
    from google.rpc import status_pb2

    ok = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))

    def check(request: Any, context: Any) -> Any:
        return ok

    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            check,
            request_deserializer=external_auth_pb2.CheckRequest.FromString,
            response_serializer=external_auth_pb2.CheckResponse.SerializeToString,
        )
    }
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="baseline"),
        options=[("grpc.so_reuseport", 0)],
    )
    service = "envoy.service.auth.v3.Authorization"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def workload(count: int) -> tuple[Any, list[bytes], dict[str, int]]:
    """The demo-like policy and CheckRequests with valid RS256 tokens for a subject mix."""
    from tests import authz_helpers as testing

    key = testing.rsa_key("bench")
    policy = testing.demo_policy(testing.jwks(key))
    # (subject, groups, method, path, route, service): who is allowed is in the comment.
    shapes: list[tuple[str, list[str], str, str, str, str]] = [
        ("alice", [], "POST", "/orders/{i}", "orders-api", "orders"),  # allow (admin)
        ("bob", ["staff"], "GET", "/orders/{i}", "orders-api", "orders"),  # allow
        ("carol", ["customers"], "GET", "/catalog/items/{i}", "catalog-api", "catalog"),  # allow
        ("carol", ["customers"], "GET", "/orders/{i}", "orders-api", "orders"),  # forbidden
        ("bob", ["staff"], "DELETE", "/orders/{i}", "orders-api", "orders"),  # forbidden
    ]
    requests: list[bytes] = []
    for i in range(count):
        subject, groups, method, path, route, service = shapes[i % len(shapes)]
        token = key.sign(testing.claims(subject, groups, jti=f"bench-{i}"))  # distinct tokens
        headers = {
            "authorization": f"Bearer {token}",
            "x-request-id": f"bench-{i}",
            "traceparent": f"00-{i + 1:032x}-{i + 1:016x}-01",
            "user-agent": "bench/1.0",
            "accept": "*/*",
        }
        message = testing.check_request(
            method, path.format(i=i), headers, route=route, service=service, gateway="edge"
        )
        requests.append(message.SerializeToString())
    return policy, requests, {"requests": len(requests), "shapes": len(shapes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per target")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per target")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    parser.add_argument("--workers", type=int, default=4, help="server worker threads (both)")
    parser.add_argument("--requests", type=int, default=50, help="distinct CheckRequests")
    parser.add_argument("--no-log", action="store_true", help="disable decision logs")
    args = parser.parse_args(argv)

    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    from authz.server import AuthzService
    from meshward.logs import JsonFormatter

    if not args.no_log:
        sink = logging.FileHandler(os.devnull)
        sink.setFormatter(JsonFormatter())
        decision_logger = logging.getLogger("meshward.decision")
        decision_logger.addHandler(sink)
        decision_logger.setLevel(logging.INFO)
        decision_logger.propagate = False

    policy, requests, info = workload(args.requests)
    provider = TracerProvider()  # spans are made (sampled) but exported nowhere
    registry = CollectorRegistry()
    authz = AuthzService(
        policy, provider.get_tracer("bench"), workers=args.workers, registry=registry
    )
    authz_port = authz.start()
    baseline, baseline_port = start_baseline(args.workers)

    print(
        f"# {info['requests']} CheckRequests ({info['shapes']} subject/route shapes, RS256), "
        f"concurrency {args.concurrency}, workers {args.workers}, "
        f"{args.seconds:g}s per target after {args.warmup:g}s warm-up, "
        f"decision logs {'off' if args.no_log else 'on (/dev/null)'}, cpus {os.cpu_count()}",
        flush=True,
    )
    targets = [("baseline", baseline_port), ("meshward", authz_port)]
    results = [measure(name, port, requests, args) for name, port in targets]
    baseline.stop(1).wait()
    authz.stop(1)
    provider.shutdown()

    print(f"{'target':<10} {'checks/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'CPU µs/check':>13} {'checks':>8} {'errors':>7}")  # fmt: skip
    for r in results:
        cpu = 1e6 * r.cpu_seconds / r.checks if r.checks else float("nan")
        print(
            f"{r.name:<10} {r.rate:>10.0f} {1e3 * r.percentile(0.5):>8.2f} "
            f"{1e3 * r.percentile(0.99):>8.2f} {cpu:>13.0f} {r.checks:>8} {r.errors:>7}"
        )
    base, mesh = results
    print(f"throughput ratio meshward/baseline: {mesh.rate / base.rate:.2f}")
    print(f"p99 ratio: {mesh.percentile(0.99) / base.percentile(0.99):.2f}")
    allowed = registry.get_sample_value(
        "meshward_authz_decisions_total", {"decision": "allow", "reason": "allowed"}
    )
    denied = registry.get_sample_value(
        "meshward_authz_decisions_total", {"decision": "deny", "reason": "forbidden"}
    )
    print(f"# meshward decisions: allowed {allowed or 0:.0f}, forbidden {denied or 0:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
