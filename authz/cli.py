"""``meshward authz``: run the ext_authz service until SIGTERM/SIGINT.

Exit codes: 0 after a clean stop, 2 for input errors (policy rejected, bad flags),
1 when the service cannot start (address in use, broken install). SIGHUP reloads the
policy directory; a policy that does not load is logged and the last good one keeps
serving.
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
import sys
from types import FrameType
from typing import Any

#: How long in-flight Checks may take to finish on shutdown (seconds).
SHUTDOWN_GRACE = 5.0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``authz`` subcommand to the ``meshward`` CLI."""
    parser = subparsers.add_parser(
        "authz",
        help="run the ext_authz (Envoy Authorization/Check) service",
        description="Serve envoy.service.auth.v3.Authorization/Check for the policy in "
        "--policy, with /healthz and /metrics on --status-listen. OTLP trace export is "
        "on when OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set.",
    )
    parser.add_argument("--policy", default="policies", metavar="DIR", help="policy directory")
    parser.add_argument(
        "--listen", default="127.0.0.1:9191", metavar="HOST:PORT", help="gRPC listen address"
    )
    parser.add_argument(
        "--workers", type=_positive_int, default=4, metavar="N", help="gRPC worker threads"
    )
    parser.add_argument(
        "--status-listen",
        default="127.0.0.1:9192",
        metavar="HOST:PORT",
        help="address of /healthz and /metrics",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    from authz.server import AuthzService, ListenError
    from authz.tracing import TracingSetupError, setup_tracer_provider
    from meshward.http_status import StatusServer, parse_listen
    from meshward.logs import setup
    from meshward.policy.errors import PolicyError
    from meshward.policy.loader import load_policy

    log = setup(args.log_level, "meshward.authz")
    for flag, value in (("--listen", args.listen), ("--status-listen", args.status_listen)):
        try:
            parse_listen(value)
        except ValueError as error:
            print(f"meshward authz: {flag}: {error}", file=sys.stderr)
            return 2
    try:
        policy = load_policy(args.policy)
    except PolicyError as error:
        print(f"meshward authz: policy {args.policy} rejected:\n{error}", file=sys.stderr)
        return 2
    try:
        provider = setup_tracer_provider("meshward-authz")
    except TracingSetupError as error:
        print(f"meshward authz: {error}", file=sys.stderr)
        return 1

    service = AuthzService(
        policy,
        provider.get_tracer("meshward.authz"),
        listen=args.listen,
        workers=args.workers,
    )
    status = StatusServer(
        service.registry, service.serving, args.status_listen, routes={"/status": service.status}
    )
    events: queue.SimpleQueue[str] = queue.SimpleQueue()
    previous = _install_signal_handlers(events)
    try:
        try:
            port = service.start()
            status_port = status.start()
        except (ListenError, OSError) as error:
            print(f"meshward authz: {error}", file=sys.stderr)
            return 1
        log.info(
            "authz started",
            extra={"port": port, "status_port": status_port, "policy_version": policy.version},
        )
        while True:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                continue
            if event == "stop":
                break
            _reload(service, args.policy, load_policy, PolicyError, log)
        log.info("authz stopping")
        return 0
    finally:
        service.stop(SHUTDOWN_GRACE)
        status.stop()
        provider.shutdown()  # flushes batched spans
        _restore_signal_handlers(previous)


def _reload(
    service: Any, path: str, load_policy: Any, policy_error: type[Exception], log: logging.Logger
) -> None:
    try:
        policy = load_policy(path)
    except policy_error as error:
        log.error(
            "policy rejected; the last good policy keeps serving",
            extra={"errors": str(error).splitlines(), "policy_version": service.policy_version},
        )
        return
    service.set_policy(policy)


_SIGNALS = {signal.SIGTERM: "stop", signal.SIGINT: "stop", signal.SIGHUP: "reload"}


def _install_signal_handlers(events: queue.SimpleQueue[str]) -> dict[int, Any]:
    def handler(signum: int, frame: FrameType | None) -> None:
        events.put(_SIGNALS[signal.Signals(signum)])

    return {int(sig): signal.signal(sig, handler) for sig in _SIGNALS}


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
