"""``meshward xds``: run the xDS control plane for a policy directory.

Loads the policy (errors go to stderr as ``file:line: message``, exit 2), serves ADS on
``--listen`` and ``/healthz``, ``/metrics``, ``/status`` on ``--status-listen``, and
stops cleanly on SIGTERM/SIGINT. Edits to the policy directory are picked up live
(debounced; ``--no-watch`` turns that off) and SIGHUP forces a reload; a bad edit is
rejected with its ``file:line`` errors and the last good policy keeps serving.

Certificates: the mesh CA is the built-in one in ``--ca-dir`` (created on first run for
the policy's ``mesh.trust_domain``: ``ca.crt`` and ``ca.key``, the only files written)
or the operator's ``--ca-cert``/``--ca-key``. SVIDs (``--svid-lifetime`` seconds) and
gateway server certificates are issued in memory, served to the proxies (and authz's own
SVID to authz, for the mTLS Envoy → authz hop) over SDS and
re-issued at half their lifetime.

The authz cluster: every ``meshward authz --xds`` replica registers itself by its ADS
stream (its ``--listen`` address; a ``0.0.0.0`` host becomes the IP it connects from)
and leaves when the stream ends; ``--authz`` adds static endpoints (an authz that does
not use ``--xds``). With neither, the cluster is empty and Envoy fails closed. Without
``--authz``, proxies get their first configuration once a replica registers (at most
6 s after start), so proxies reconnecting after a restart keep their authz endpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshward.http_status import StatusServer, parse_listen
from meshward.logs import setup
from xds_server.reloader import PolicyReloader
from xds_server.service import XdsService
from xds_server.translator import AUTHZ_FAILURE_STATUSES, DEFAULT_AUTHZ_FAILURE_STATUS

if TYPE_CHECKING:
    from xds_server.credentials import CredentialSource

DEFAULT_LISTEN = "127.0.0.1:18000"
DEFAULT_STATUS_LISTEN = "127.0.0.1:18001"
DEFAULT_CA_DIR = ".meshward/ca"
DEFAULT_SVID_LIFETIME = 3600
#: Below this renewal interval `meshward xds` warns at start (a push per renewal).
MIN_SENSIBLE_RENEWAL_SECONDS = 10.0

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
        help="a static endpoint of the authz cluster (an authz that does not use --xds), "
        "repeatable; replicas started with `meshward authz --xds` register themselves "
        "(default: none, only registered replicas)",
    )
    parser.add_argument(
        "--status-listen",
        default=DEFAULT_STATUS_LISTEN,
        metavar="HOST:PORT",
        help="address of /healthz, /metrics and /status",
    )
    parser.add_argument(
        "--authz-failure-status",
        type=int,
        choices=sorted(AUTHZ_FAILURE_STATUSES),
        default=DEFAULT_AUTHZ_FAILURE_STATUS,
        help="HTTP status Envoy answers when authz is unreachable (always fail closed; "
        f"default {DEFAULT_AUTHZ_FAILURE_STATUS})",
    )
    parser.add_argument(
        "--ca-dir",
        default=DEFAULT_CA_DIR,
        metavar="DIR",
        help="the built-in mesh CA (ca.crt, ca.key), created on first run for the "
        f"policy's trust domain (default {DEFAULT_CA_DIR})",
    )
    parser.add_argument(
        "--ca-cert",
        metavar="PEM",
        help="operator CA certificate (with --ca-key; replaces --ca-dir)",
    )
    parser.add_argument(
        "--ca-key", metavar="PEM", help="the unencrypted PEM private key of --ca-cert"
    )
    parser.add_argument(
        "--svid-lifetime",
        type=int,
        default=DEFAULT_SVID_LIFETIME,
        metavar="SECONDS",
        help="lifetime of workload certificates (SVIDs); re-issued at half-life "
        f"(default {DEFAULT_SVID_LIFETIME}; at least 60)",
    )
    parser.add_argument(
        "--no-watch", action="store_true", help="do not reload on policy file changes"
    )
    parser.add_argument(
        "--debounce-ms",
        type=int,
        default=100,
        metavar="MS",
        help="quiet time that ends a burst of policy file edits (default 100)",
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

    authz: list[tuple[str, int]] = []
    flags = [("--authz", a) for a in args.authz or []]
    flags += [("--listen", args.listen), ("--status-listen", args.status_listen)]
    for flag, value in flags:
        try:
            address = parse_listen(value)
        except ValueError as exc:
            print(f"meshward xds: {flag}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if flag == "--authz":
            authz.append(address)
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    try:
        credentials = _credential_source(args, policy.mesh.trust_domain)
    except ValueError as exc:
        print(f"meshward xds: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def serve() -> int:
        try:
            service = XdsService(
                policy,
                authz,
                listen=args.listen,
                authz_failure_status=args.authz_failure_status,
                credentials=credentials,
            )
        except ValueError as exc:
            print(f"meshward xds: {exc}", file=sys.stderr)
            return EXIT_USAGE
        renewal = credentials.seconds_to_renewal()
        if renewal is not None and renewal < MIN_SENSIBLE_RENEWAL_SECONDS:
            log.warning(
                "certificates are renewed %.0f s after they are issued: every renewal is a "
                "push to every proxy; give a longer --svid-lifetime (the PKI back-dates "
                "certificates by 60 s and renews at half of the whole validity)",
                max(renewal, 0.0),
                extra={"svid_lifetime_seconds": args.svid_lifetime},
            )
        reloader = PolicyReloader(
            args.policy, service.set_policy, policy, service.registry, args.debounce_ms
        )
        try:
            port = await service.start()
        except (OSError, RuntimeError) as exc:
            log.error("cannot start xds server", extra={"listen": args.listen, "error": str(exc)})
            return EXIT_FAILURE
        loop = asyncio.get_running_loop()

        def status_from_thread() -> dict[str, Any]:
            async def snapshot() -> dict[str, Any]:
                return {"policy": reloader.status(), **service.status()}

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

        tasks: set[asyncio.Task[Any]] = set()

        def background(coro: Any) -> None:
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        loop.add_signal_handler(signal.SIGHUP, lambda: background(reloader.reload("SIGHUP")))
        if not args.no_watch:
            background(reloader.watch(stop))
        log.info(
            "xds server listening",
            extra={
                "listen": f"{parse_listen(args.listen)[0]}:{port}",
                "status": f"{parse_listen(args.status_listen)[0]}:{status_port}",
                "version": service.version,
                "gateways": [g.name for g in policy.gateways],
                "authz": [f"{h}:{p}" for h, p in authz],
                "watching": None if args.no_watch else str(args.policy),
                "ca": args.ca_cert or str(Path(args.ca_dir) / "ca.crt"),
                "trust_domain": credentials.trust_domain,
                "svid_lifetime_seconds": args.svid_lifetime,
            },
        )
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            log.info("xds server stopping")
            for task in list(tasks):
                task.cancel()
            await service.stop()
            status.stop()
        return EXIT_OK

    return asyncio.run(serve())


def _credential_source(args: argparse.Namespace, trust_domain: str) -> CredentialSource:
    """The CA and credential store the flags ask for; ``ValueError`` says what to fix."""
    from meshward.pki import CertificateAuthority, CredentialStore, PkiError
    from meshward.pki.ca import MAX_SVID_LIFETIME, MIN_LIFETIME
    from xds_server.credentials import CredentialSource

    if bool(args.ca_cert) != bool(args.ca_key):
        raise ValueError("--ca-cert and --ca-key go together: give both, or neither (--ca-dir)")
    lowest, highest = int(MIN_LIFETIME.total_seconds()), int(MAX_SVID_LIFETIME.total_seconds())
    if not lowest <= args.svid_lifetime <= highest:
        raise ValueError(
            f"--svid-lifetime {args.svid_lifetime}: give {lowest} to {highest} seconds"
        )
    try:
        if args.ca_cert:
            ca = CertificateAuthority.from_pem_files(
                Path(args.ca_cert), Path(args.ca_key), trust_domain
            )
        else:
            ca = CertificateAuthority.load_or_create(Path(args.ca_dir), trust_domain)
        store = CredentialStore(ca, svid_lifetime=timedelta(seconds=args.svid_lifetime))
    except PkiError as exc:
        raise ValueError(str(exc)) from None
    return CredentialSource(store)
