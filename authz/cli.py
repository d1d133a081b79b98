"""``meshward authz``: run the ext_authz service until SIGTERM/SIGINT.

The policy comes from a directory (``--policy DIR``, the default, for standalone use)
or from the xDS server (``--xds HOST:PORT``, see :mod:`authz.policy_source`). With
``--xds`` the gRPC server starts at once but fails closed until the first policy
*and* its SVID arrive: health NOT_SERVING, ``/healthz`` 503, Checks denied with 503
``no_policy`` (and no TLS handshake completes before the SVID).

Transport: with ``--xds`` authz always serves mTLS with the SVID and trust bundle the
xDS server sends (``spiffe://<td>/ns/<ns>/sa/meshward-authz``; rotated without a
restart), requiring a client certificate with a SPIFFE ID of the trust domain
(:mod:`authz.transport`). With ``--policy`` it serves plaintext unless
``--tls-cert``, ``--tls-key`` and ``--tls-ca`` are given (static mTLS, same checks).

Decision log (:mod:`authz.decision_log`): by default one JSON line per decision on
stderr among the process log; ``--decision-log -`` puts exactly one compact JSON line
per decision on stdout, ``--decision-log PATH`` appends them to a file (created 0600)
rotated at ``--decision-log-max-bytes`` keeping ``--decision-log-backups`` old files.

Serving engine (``--engine``, :mod:`authz.server`): ``auto`` (default; or the value of
``MESHWARD_AUTHZ_ENGINE``) runs the fast single-threaded engine on grpcio's completion
queue when its private-API guard passes, else the stock grpcio server with one warning
saying why; ``fast`` refuses to start (exit 1) when the guard fails; ``stock`` is the
stock server. ``--workers`` only sizes the stock server's thread pool.

CPU pinning (``--cpu 0`` or ``--cpu 0,2-3``): the process and every thread it starts
run only on those CPUs (``os.sched_setaffinity``, Linux), set before any thread starts.
One authz process per free core, each pinned, is how authz scales on one host (each is
its own endpoint of the authz cluster); a CPU that does not exist or is not available
to the process, or a platform without affinity, exits 2 naming ``--cpu``.

Exit codes: 0 after a clean stop, 2 for input errors (policy rejected, bad flags),
1 when the service cannot start (address in use, decision log not writable, broken
install, ``--engine fast`` unavailable). SIGHUP reloads the
policy directory (ignored with ``--xds``); a policy that does not load is logged and
the last good one keeps serving. ``/status`` shows the policy version and source.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import re
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from authz.policy_source import XdsPolicySource

#: How long in-flight Checks may take to finish on shutdown (seconds).
SHUTDOWN_GRACE = 5.0
#: The policy directory when neither --policy nor --xds is given.
DEFAULT_POLICY_DIR = "policies"
#: The environment variable that sets the default of --engine (else ``auto``).
ENGINE_ENV = "MESHWARD_AUTHZ_ENGINE"
#: The --engine choices (:data:`authz.server.ENGINES`, kept here so --help needs no gRPC).
ENGINE_CHOICES = ("auto", "fast", "stock")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


#: The smallest --decision-log-max-bytes (a file must hold a few whole lines).
MIN_DECISION_LOG_BYTES = 4096
MAX_DECISION_LOG_BACKUPS = 100
_SIZE = re.compile(r"(\d+)\s*(k|kib|m|mib|g|gib)?", re.IGNORECASE)
_UNIT = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _log_bytes(text: str) -> int:
    """A size in bytes, optionally with a binary unit: ``4096``, ``512KiB``, ``100M``."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: give bytes, or a number with KiB, MiB or GiB"
        )
    unit = (match.group(2) or "")[:1].lower()
    value = int(match.group(1)) * _UNIT.get(unit, 1)
    if value < MIN_DECISION_LOG_BYTES:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_DECISION_LOG_BYTES} bytes, not {value}"
        )
    return value


def _log_backups(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_DECISION_LOG_BACKUPS:
        raise argparse.ArgumentTypeError(
            f"must be between 0 and {MAX_DECISION_LOG_BACKUPS}, not {value}"
        )
    return value


def _cpu_list(text: str) -> frozenset[int]:
    """``0``, ``0,2``, ``0-3,6``: a set of CPU numbers (as ``taskset -c`` reads them)."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a CPU list: give CPU numbers like 0 or 0,2 or 0-3"
            )
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise argparse.ArgumentTypeError(f"{part.strip()!r}: a range goes low-high")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


class CpuPinningError(Exception):
    """``--cpu`` cannot be honoured; the message names the flag and the fix."""


def pin_to_cpus(cpus: frozenset[int]) -> None:
    """Restrict this process (the calling thread and every thread started after) to
    ``cpus``. Call before any thread starts: Linux affinity is per thread, inherited."""
    shown = ",".join(str(c) for c in sorted(cpus))
    set_affinity = getattr(os, "sched_setaffinity", None)
    get_affinity = getattr(os, "sched_getaffinity", None)
    if set_affinity is None or get_affinity is None:
        raise CpuPinningError(
            f"--cpu {shown}: this platform cannot pin a process to CPUs "
            "(os.sched_setaffinity is Linux-only); drop --cpu"
        )
    available = _available_cpus()
    missing = sorted(cpus - available) if available else []
    if missing:
        raise CpuPinningError(
            f"--cpu {shown}: CPU {','.join(map(str, missing))} does not exist or is not "
            f"available to this process (available: {_cpu_ranges(available)})"
        )
    try:
        set_affinity(0, cpus)
    except OSError as error:
        raise CpuPinningError(
            f"--cpu {shown}: cannot pin to these CPUs ({error.strerror}); "
            f"give CPUs of {_cpu_ranges(available) if available else 'this machine'}"
        ) from None
    pinned = set(get_affinity(0))
    if pinned != set(cpus):
        raise CpuPinningError(
            f"--cpu {shown}: the kernel pinned to {_cpu_ranges(pinned)} instead; give CPUs "
            f"available to this process ({_cpu_ranges(available)})"
        )


def _available_cpus() -> set[int]:
    """CPUs this process may run on: its cgroup/cpuset's, else the online ones (the
    current affinity may be narrower than what it may widen to, so it is not used)."""
    for path in ("/sys/fs/cgroup/cpuset.cpus.effective", "/sys/devices/system/cpu/online"):
        try:
            with open(path, encoding="ascii") as file:
                text = file.read().strip()
        except OSError:
            continue
        if text:
            try:
                return set(_cpu_list(text))
            except argparse.ArgumentTypeError:
                continue
    get_affinity = getattr(os, "sched_getaffinity", None)
    return set(get_affinity(0)) if get_affinity is not None else set()


def _cpu_ranges(cpus: set[int] | frozenset[int]) -> str:
    """``{0, 1, 2, 5}`` → ``0-2,5``."""
    out: list[str] = []
    for cpu in sorted(cpus):
        if out and out[-1].rpartition("-")[2] == str(cpu - 1):
            out[-1] = f"{out[-1].partition('-')[0]}-{cpu}"
        else:
            out.append(str(cpu))
    return ",".join(out)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``authz`` subcommand to the ``meshward`` CLI."""
    parser = subparsers.add_parser(
        "authz",
        help="run the ext_authz (Envoy Authorization/Check) service",
        description="Serve envoy.service.auth.v3.Authorization/Check for the policy in "
        "--policy or the one the xDS server at --xds serves, with /healthz, /metrics and "
        "/status on --status-listen. OTLP trace export is on when "
        "OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--policy",
        default=None,
        metavar="DIR",
        help=f"policy directory (default: {DEFAULT_POLICY_DIR})",
    )
    source.add_argument(
        "--xds",
        default=None,
        metavar="HOST:PORT",
        help="get the policy from this meshward xDS server over ADS instead of a directory",
    )
    parser.add_argument(
        "--node-id",
        default=None,
        metavar="ID",
        help="ADS node id with --xds (default: authz-<hostname>-<pid>)",
    )
    parser.add_argument(
        "--listen", default="127.0.0.1:9191", metavar="HOST:PORT", help="gRPC listen address"
    )
    parser.add_argument(
        "--engine",
        choices=ENGINE_CHOICES,
        default=None,
        help="serving engine: 'fast' (one thread on grpcio's completion queue, faster than "
        "the stock server; private grpcio API behind a start-up check), 'stock' (grpcio's "
        "sync server) or 'auto' (fast when its check passes, else stock). "
        f"Default: ${ENGINE_ENV}, else auto",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=4,
        metavar="N",
        help="gRPC worker threads of the stock engine",
    )
    parser.add_argument(
        "--cpu",
        type=_cpu_list,
        default=None,
        metavar="N[,M...]",
        help="pin the process to these CPUs (e.g. 0 or 0,2-3; Linux): one authz process "
        "per free core, each its own endpoint of the authz cluster",
    )
    parser.add_argument(
        "--status-listen",
        default="127.0.0.1:9192",
        metavar="HOST:PORT",
        help="address of /healthz, /metrics and /status",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="with --policy: serve mTLS with this certificate chain (needs --tls-key, --tls-ca)",
    )
    parser.add_argument("--tls-key", metavar="PEM", help="the unencrypted key of --tls-cert")
    parser.add_argument(
        "--tls-ca", metavar="PEM", help="CA bundle client certificates must chain to"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--decision-log",
        default=None,
        metavar="{-|PATH}",
        help="where the one-JSON-line-per-decision audit log goes: '-' for stdout (only "
        "decision lines there), or a file to append to (created 0600, rotated by size). "
        "Default: stderr, among the process log lines",
    )
    parser.add_argument(
        "--decision-log-max-bytes",
        type=_log_bytes,
        default=None,
        metavar="SIZE",
        help="with --decision-log PATH: rotate before the file would exceed SIZE bytes "
        f"(KiB/MiB/GiB allowed; at least {MIN_DECISION_LOG_BYTES}; default 100MiB)",
    )
    parser.add_argument(
        "--decision-log-backups",
        type=_log_backups,
        default=None,
        metavar="N",
        help="with --decision-log PATH: rotated files to keep, PATH.1 … PATH.N "
        f"(0-{MAX_DECISION_LOG_BACKUPS}; default 5)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    if args.cpu is not None:
        # First of all: threads started later (gRPC, exporters) inherit the affinity.
        try:
            pin_to_cpus(args.cpu)
        except CpuPinningError as error:
            print(f"meshward authz: {error}", file=sys.stderr)
            return 2
    from authz.server import AuthzService, EngineUnavailableError, ListenError
    from authz.tracing import TracingSetupError, setup_tracer_provider, span_export_of
    from meshward.http_status import StatusServer, parse_listen
    from meshward.logs import setup
    from meshward.policy.errors import PolicyError
    from meshward.policy.loader import load_policy
    from meshward.policy.model import Policy

    log = setup(args.log_level, "meshward.authz")
    addresses = [("--listen", args.listen), ("--status-listen", args.status_listen)]
    if args.xds is not None:
        addresses.append(("--xds", args.xds))
    for flag, value in addresses:
        try:
            parse_listen(value)
        except ValueError as error:
            print(f"meshward authz: {flag}: {error}", file=sys.stderr)
            return 2
    engine = args.engine if args.engine is not None else os.environ.get(ENGINE_ENV) or "auto"
    if engine not in ENGINE_CHOICES:
        print(
            f"meshward authz: {ENGINE_ENV}={engine!r}: choose one of {', '.join(ENGINE_CHOICES)}",
            file=sys.stderr,
        )
        return 2
    if args.node_id is not None and args.xds is None:
        print("meshward authz: --node-id only applies with --xds HOST:PORT", file=sys.stderr)
        return 2
    tls_files = [args.tls_cert, args.tls_key, args.tls_ca]
    if any(tls_files) and args.xds is not None:
        print(
            "meshward authz: --tls-cert/--tls-key/--tls-ca only apply with --policy "
            "(with --xds the SVID comes from the xDS server)",
            file=sys.stderr,
        )
        return 2
    if any(tls_files) and not all(tls_files):
        print("meshward authz: give --tls-cert, --tls-key and --tls-ca together", file=sys.stderr)
        return 2
    rotation = (args.decision_log_max_bytes, args.decision_log_backups)
    if any(v is not None for v in rotation) and args.decision_log in (None, "-"):
        print(
            "meshward authz: --decision-log-max-bytes/--decision-log-backups only apply "
            "with --decision-log PATH",
            file=sys.stderr,
        )
        return 2
    from pathlib import Path

    from authz.transport import ServerTls, TlsMaterialError, load_pem_files

    tls: ServerTls | None = None
    if args.xds is not None:
        tls = ServerTls()  # the SVID arrives over ADS
    elif all(tls_files):
        try:
            tls = ServerTls(
                load_pem_files(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_ca))
            )
        except TlsMaterialError as error:
            print(f"meshward authz: {error}", file=sys.stderr)
            return 2
    policy_dir = args.policy if args.policy is not None else DEFAULT_POLICY_DIR
    policy: Policy | None = None
    if args.xds is None:
        try:
            policy = load_policy(policy_dir)
        except PolicyError as error:
            print(f"meshward authz: policy {policy_dir} rejected:\n{error}", file=sys.stderr)
            return 2
    try:
        provider = setup_tracer_provider("meshward-authz")
    except TracingSetupError as error:
        print(f"meshward authz: {error}", file=sys.stderr)
        return 1

    from authz.decision_log import (
        DEFAULT_BACKUPS,
        DEFAULT_MAX_BYTES,
        DecisionLog,
        DecisionLogError,
    )

    try:
        decision_log = DecisionLog(
            destination=args.decision_log,
            max_bytes=args.decision_log_max_bytes or DEFAULT_MAX_BYTES,
            backups=(
                DEFAULT_BACKUPS if args.decision_log_backups is None else args.decision_log_backups
            ),
        )
    except DecisionLogError as error:
        provider.shutdown()
        print(f"meshward authz: {error}", file=sys.stderr)
        return 1
    try:
        service = AuthzService(
            policy,  # None with --xds: fail closed until the xDS server sends one
            provider.get_tracer("meshward.authz"),
            listen=args.listen,
            workers=args.workers,
            tls=tls,
            decision_log=decision_log,
            engine=engine,
            span_export=span_export_of(provider),
        )
    except EngineUnavailableError as error:
        decision_log.close()
        provider.shutdown()
        print(f"meshward authz: --engine fast: {error}", file=sys.stderr)
        return 1
    xds: XdsPolicySource | None = None

    def status_page() -> dict[str, Any]:
        page = {**service.status(), "source": "xds" if args.xds else "file"}
        if xds is not None:
            page["xds"] = xds.status()
        else:
            page["policy_dir"] = policy_dir
        return page

    status = StatusServer(
        service.registry, service.serving, args.status_listen, routes={"/status": status_page}
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
        if args.xds is not None:
            from authz.policy_source import XdsPolicySource

            xds = XdsPolicySource(
                service,
                args.xds,
                authz_listen=_with_port(args.listen, port),
                node_id=args.node_id,
                registry=service.registry,
                tls_sink=service,
            )
            xds.start()
        log.info(
            "authz started",
            extra={
                "port": port,
                "status_port": status_port,
                "policy_version": service.policy_version,
                "policy_source": "xds" if xds is not None else "file",
                "xds": args.xds,
                "node": xds.node.id if xds is not None else None,
                "transport": "mtls" if tls is not None else "plaintext",
                "engine": service.engine,
                "decision_log": decision_log.destination,
                "cpus": sorted(args.cpu) if args.cpu is not None else None,
            },
        )
        while True:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                continue
            if event == "stop":
                break
            if xds is not None:
                log.info("SIGHUP ignored: the policy comes from the xDS server")
                continue
            _reload(service, policy_dir, load_policy, PolicyError, log)
        log.info("authz stopping")
        return 0
    finally:
        if xds is not None:
            xds.stop()
        service.stop(SHUTDOWN_GRACE)
        decision_log.close()  # flushed by stop() once serving; here also when start failed
        status.stop()
        provider.shutdown()  # flushes batched spans
        _restore_signal_handlers(previous)


def _with_port(listen: str, port: int) -> str:
    """``listen`` with its port replaced by the bound ``port`` (``--listen HOST:0``)."""
    from meshward.http_status import parse_listen

    host, _ = parse_listen(listen)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
