"""Decision tracing's cost: meshward authz with tracing on (every Check's span sampled
and exported over OTLP/gRPC) against tracing off (no exporter), in the same run.

"Off" is what an operator gets without an OTLP endpoint: no exporter, no span kept;
authz still reads the trace context, so decision-log lines keep their trace id.
Same workload, processes and measurements as ``bench/authz_bench.py`` (its policy
generator, CheckRequests, server and load processes are reused): a realistic policy
(50 roles, 200 bindings, 3 issuers), a JWT / API-key / mTLS mix, each call carrying a
sampled ``traceparent`` in its gRPC metadata as a tracing Envoy sends it, so with
tracing on every decision makes a span. Both servers have the decision log and metrics
on; they differ only in span export. The OTLP sink is a separate process that counts and
drops spans.

Prints, per engine, closed-loop throughput and CPU per Check, p99 at a fixed offered
load, the on/off ratios of each round (the two servers alternate within a round), then
``tracing on/off: X.XX``, the median of the rounds' throughput ratios (issue 6's
target: >= 0.9). On a shared 2-core VM a single round varies by ±15%, hence 7 rounds
by default. It asserts nothing about speed.

    .venv/bin/python bench/tracing_bench.py --engine fast --rounds 7
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import authz_bench as base  # the bench directory is not a package

#: Tracing off as an operator turns it off: no OTLP endpoint configured, so no exporter.
#: authz still takes the trace context for the decision log's trace id.
OFF = frozenset({"tracing"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("stock", "fast", "both"), default="fast")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args(argv)

    pin = not args.no_pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2
    server_cpus = {0} if pin else None
    load_cpus = {1} if pin else None
    engines = ["stock", "fast"] if args.engine == "both" else [args.engine]
    if "fast" in engines:
        from authz.engine_fast import fast_engine_unavailable

        reason = fast_engine_unavailable()
        if reason is not None:
            parser.error(f"the fast engine is unavailable here ({reason}); use --engine stock")

    work_dir = Path(tempfile.mkdtemp(prefix="meshward-tracing-bench-"))
    context = multiprocessing.get_context("spawn")
    sink_conn, sink_child = context.Pipe()
    sink = context.Process(target=base._otlp_sink, args=(sink_child, load_cpus), daemon=True)
    servers: dict[str, base.Server] = {}
    try:
        rng = random.Random(args.seed)
        work = base.generate_policy(work_dir / "policy", rng)
        requests = base.build_requests(work, args.requests, rng)
        sink.start()
        otlp = f"http://127.0.0.1:{sink_conn.recv()}"
        for engine in engines:
            for label, without in (("off", OFF), ("on", frozenset())):
                servers[f"tracing {label}/{engine}"] = base.Server(
                    base.ServerSpec(
                        "meshward", engine, args.workers, str(work.directory), otlp,
                        str(work_dir / f"decisions-{label}-{engine}.log"), server_cpus, without,
                    )
                )  # fmt: skip
        print(
            f"# {len(requests)} CheckRequests, every one with a sampled traceparent; "
            f"decision log + metrics on in both; cpus {os.cpu_count()}, load average "
            f"{os.getloadavg()[0]:.2f}"
            + (", servers pinned to CPU 0, load + OTLP sink to CPU 1" if pin else ", unpinned")
            + f"; {args.rounds} round(s) of {args.warmup:g}s warm-up + {args.seconds:g}s",
            flush=True,
        )
        results: list[base.Result] = []
        for _ in range(args.rounds):
            for mode in ("closed", "open"):
                for target, server in servers.items():
                    spec = base.LoadSpec(
                        server.port, requests, mode, args.concurrency, args.rate,
                        args.warmup, args.seconds, load_cpus,
                    )  # fmt: skip
                    results.append(base.measure(server.pid, server.port, spec, target))
        for server in servers.values():
            server.stop()
        servers.clear()
        sink_conn.send("stop")
        spans = sink_conn.recv()

        print(f"\n{'load':<22} {'target':<16} {'checks/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'CPU µs/check':>12}")  # fmt: skip
        for r in results:
            label = (
                f"closed, {args.concurrency}" if r.mode == "closed" else f"open, {args.rate:g}/s"
            )
            print(
                f"{label:<22} {r.target:<16} {r.rate:>9.0f} {1e3 * r.percentile(0.5):>7.2f} "
                f"{1e3 * r.percentile(0.99):>7.2f} {r.cpu_us:>12.0f}"
            )
        print(f"\n# {spans} spans received by the OTLP sink")

        def paired(mode: str, engine: str, what: str) -> list[float]:
            """Per round: on / off (rounds alternate the two servers, so a slow spell
            of the machine hits both of a pair)."""
            on = [r for r in results if r.mode == mode and r.target == f"tracing on/{engine}"]
            off = [r for r in results if r.mode == mode and r.target == f"tracing off/{engine}"]
            if what == "rate":
                return [a.rate / b.rate for a, b in zip(on, off, strict=True)]
            if what == "cpu":
                return [b.cpu_us / a.cpu_us for a, b in zip(on, off, strict=True)]
            return [a.percentile(0.99) / b.percentile(0.99) for a, b in zip(on, off, strict=True)]

        for engine in engines:
            rates = paired("closed", engine, "rate")
            print(
                f"{engine}: throughput on/off per round "
                + " ".join(f"{x:.2f}" for x in rates)
                + f"; CPU per check off/on {statistics.median(paired('closed', engine, 'cpu')):.2f}"
                + f"; p99 at {args.rate:g}/s on/off "
                + f"{statistics.median(paired('open', engine, 'p99')):.2f}"
            )
        for engine in engines:
            ratio = statistics.median(paired("closed", engine, "rate"))
            print(f"tracing on/off ({engine}): {ratio:.2f}   (median of rounds; target >= 0.9)")
    finally:
        for server in servers.values():
            server.stop()
        if sink.is_alive():
            sink.terminate()
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
