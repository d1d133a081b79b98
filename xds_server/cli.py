"""``meshward xds``: run the xDS control plane for a policy directory.

Loads the policy (errors go to stderr as ``file:line: message``, exit 2), serves ADS on
``--listen`` and ``/healthz``, ``/metrics``, ``/status`` on ``--status-listen``, and
stops cleanly on SIGTERM/SIGINT. SIGHUP reloads the policy; a bad policy is logged and
the last good one keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from meshward.http_status import StatusServer, parse_listen
from meshward.logs import setup
from xds_server.service import XdsService

DEFAULT_LISTEN = "127.0.0.1:18000"
DEFAULT_STATUS_LISTEN = "127.0.0.1:18001"
DEFAULT_AUTHZ = "127.0.0.1:9191"

#: Exit codes: 0 clean stop, 1 runtime failure (e.g. port in use), 2 bad input.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``xds`` subcommand to the ``meshward`` CLI."""
    parser = subparsers.add_parser(
        "xds",
        help="run the xDS control plane (ADS) for a policy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--policy", default="policies", metavar="DIR", help="policy directory")
    parser.add_argument(
        "--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT", help="ADS gRPC address"
    )
    parser.add_argument(
        "--authz",
        action="append",
        default=None,
        metavar="HOST:PORT",
        help=f"ext_authz endpoint, repeatable (default {DEFAULT_AUTHZ})",
    )
    parser.add_argument(
        "--status-listen",
        default=DEFAULT_STATUS_LISTEN,
        metavar="HOST:PORT",
        help="address of /healthz, /metrics and /status",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    log = setup(args.log_level, "meshward.xds")
    # Imported here: the loader is optional at import time of the CLI.
    from meshward.policy.errors import PolicyError
    from meshward.policy.loader import load_policy

    try:
        authz = [parse_listen(a) for a in (args.authz or [DEFAULT_AUTHZ])]
        parse_listen(args.listen)
        parse_listen(args.status_listen)
    except ValueError as exc:
        print(f"meshward xds: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE

    async def serve() -> int:
        service = XdsService(policy, authz, listen=args.listen)
        try:
            port = await service.start()
        except (OSError, RuntimeError) as exc:
            log.error("cannot start xds server", extra={"listen": args.listen, "error": str(exc)})
            return EXIT_FAILURE
        loop = asyncio.get_running_loop()

        def status_from_thread() -> dict[str, Any]:
            async def snapshot() -> dict[str, Any]:
                return service.status()

            return asyncio.run_coroutine_threadsafe(snapshot(), loop).result(timeout=5)

        status = StatusServer(
            service.registry,
            service.healthy,
            listen=args.status_listen,
            routes={"/status": status_from_thread},
        )
        try:
            status_port = status.start()
        except OSError as exc:
            log.error(
                "cannot start status server",
                extra={"listen": args.status_listen, "error": str(exc)},
            )
            await service.stop()
            return EXIT_FAILURE

        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        async def reload() -> None:
            try:
                new_policy = load_policy(args.policy)
                await service.set_policy(new_policy)
            except PolicyError as exc:
                log.error(
                    "policy reload rejected; the last good policy keeps serving",
                    extra={"errors": str(exc).splitlines(), "version": service.version},
                )
            except ValueError as exc:
                log.error("policy reload failed in translation", extra={"error": str(exc)})

        reloads: set[asyncio.Task[None]] = set()

        def on_hup() -> None:
            task = asyncio.create_task(reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        log.info(
            "xds server listening",
            extra={
                "listen": f"{parse_listen(args.listen)[0]}:{port}",
                "status": f"{parse_listen(args.status_listen)[0]}:{status_port}",
                "version": service.version,
                "gateways": [g.name for g in policy.gateways],
                "authz": [f"{h}:{p}" for h, p in authz],
            },
        )
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            log.info("xds server stopping")
            await service.stop()
            status.stop()
        return EXIT_OK

    return asyncio.run(serve())
