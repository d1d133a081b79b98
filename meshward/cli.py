"""The ``meshward`` command: one entry point for every meshward process and tool.

Subcommands own their flags: ``xds`` lives in :mod:`xds_server.cli`, ``authz`` in
:mod:`authz.cli`; the shared tools (``check``, ``token``, ``up``, ``demo-upstream``,
``otlp-receiver``, ``traces``) are here. Errors a user can cause print one clear
message and exit non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from meshward import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    from meshward.install_check import BrokenInstallError, check_install

    try:
        check_install()
    except BrokenInstallError as exc:
        print(f"meshward: {exc}", file=sys.stderr)
        return 3
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshward",
        description="meshward: a zero-trust control plane for Envoy",
    )
    parser.add_argument("--version", action="version", version=f"meshward {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    check = sub.add_parser("check", help="validate policy YAML; exit 1 with file:line errors")
    check.add_argument(
        "paths",
        nargs="*",
        default=["policies"],
        metavar="PATH",
        help="policy directories or files (default: policies)",
    )
    check.set_defaults(func=_cmd_check)

    token = sub.add_parser("token", help="mint a demo JWT signed by the local demo key")
    token.add_argument("--sub", default="alice", help="subject (default: alice)")
    token.add_argument("--groups", default="", help="comma-separated groups")
    token.add_argument(
        "--ttl", type=int, default=3600, help="lifetime in seconds; negative mints an expired token"
    )
    token.add_argument("--issuer", default=None, help="'iss' claim (default: the demo issuer)")
    token.add_argument("--audience", default=None, help="'aud' claim (default: meshward-demo)")
    token.add_argument(
        "--init",
        action="store_true",
        help="only create the demo key and its JWKS, print nothing else",
    )
    _key_flags(token)
    token.set_defaults(func=_cmd_token)

    upstream = sub.add_parser("demo-upstream", help="run a demo upstream HTTP service")
    upstream.add_argument("--name", required=True, help="service name it reports")
    upstream.add_argument("--listen", required=True, metavar="HOST:PORT")
    upstream.set_defaults(func=_cmd_demo_upstream)

    receiver = sub.add_parser(
        "otlp-receiver",
        help="run the built-in OTLP/gRPC trace receiver, appending spans to a file",
        description=(
            "Receive OpenTelemetry traces over OTLP/gRPC (TraceService, plaintext) and append "
            "each span as one JSON line to --spans-file (created 0600, rotated by size). "
            "Serves grpc.health.v1 too; stops on SIGTERM/SIGINT. View with `meshward traces`."
        ),
    )
    receiver.add_argument(
        "--listen",
        default="127.0.0.1:4317",
        metavar="HOST:PORT",
        help="OTLP/gRPC address (default: 127.0.0.1:4317)",
    )
    receiver.add_argument(
        "--spans-file", required=True, metavar="PATH", help="where to append spans"
    )
    receiver.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        metavar="N",
        help="rotate the spans file before it would pass N bytes (default: 100 MiB)",
    )
    receiver.add_argument(
        "--backups",
        type=int,
        default=None,
        metavar="K",
        help="rotated files kept: PATH.1 ... PATH.K (default: 3)",
    )
    receiver.set_defaults(func=_cmd_otlp_receiver)

    from meshward import status_cmd, traces_cmd, up

    up.register(sub)
    status_cmd.register(sub)
    traces_cmd.register(sub)

    from meshward import explain, policy_tests

    explain.register(sub)
    policy_tests.register(sub)

    # The two services register their own subcommands.
    from authz import cli as authz_cli
    from xds_server import cli as xds_cli

    xds_cli.register(sub)
    authz_cli.register(sub)
    return parser


def _key_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".meshward"),
        help="where the demo private key lives (default: .meshward)",
    )
    parser.add_argument(
        "--jwks",
        type=Path,
        default=Path("policies/keys/demo-jwks.json"),
        help="where to write the demo public JWKS (default: policies/keys/demo-jwks.json)",
    )


def _cmd_check(args: argparse.Namespace) -> int:
    from meshward.policy.errors import PolicyError
    from meshward.policy.loader import load_policy

    failed = 0
    for path in args.paths:
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            for issue in exc.issues:
                print(issue, file=sys.stderr)
            print(
                f"{path}: {len(exc.issues)} error(s); the policy was not accepted", file=sys.stderr
            )
            failed += 1
            continue
        routes = len(policy.routes())
        print(
            f"{path}: OK, version {policy.version} ({len(policy.services)} services, "
            f"{len(policy.gateways)} gateways, {routes} routes, {len(policy.issuers)} issuers, "
            f"{len(policy.roles)} roles, {len(policy.bindings)} bindings; default deny)"
        )
    return 1 if failed else 0


def _cmd_token(args: argparse.Namespace) -> int:
    from meshward.demo_keys import DEMO_AUDIENCE, DEMO_ISSUER, ensure_demo_key

    key = ensure_demo_key(args.state_dir, args.jwks)
    if args.init:
        print(
            f"demo key: {key.key_path} (private, 0600); public JWKS: {key.jwks_path}",
            file=sys.stderr,
        )
        return 0
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    print(
        key.mint(
            args.sub,
            groups,
            ttl=args.ttl,
            issuer=args.issuer or DEMO_ISSUER,
            audience=args.audience or DEMO_AUDIENCE,
        )
    )
    return 0


def _cmd_demo_upstream(args: argparse.Namespace) -> int:
    from meshward.demo_upstream import serve

    return serve(args.name, args.listen)


def _cmd_otlp_receiver(args: argparse.Namespace) -> int:
    from meshward.otlp_receiver import serve
    from meshward.spans_file import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES

    return serve(
        args.listen,
        args.spans_file,
        DEFAULT_MAX_BYTES if args.max_bytes is None else args.max_bytes,
        DEFAULT_BACKUPS if args.backups is None else args.backups,
    )
