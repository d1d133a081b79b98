"""``meshward up``: the whole local mesh from one command, with real Envoy processes.

It starts, each as its own supervised process: the xDS server, authz (``--authz-replicas
N`` processes, each registering itself with the xDS server as an endpoint of the authz
cluster), one Envoy per gateway (bootstrap rendered from ``envoy/bootstrap.yaml``;
everything else arrives over xDS) and a demo upstream for each service whose endpoints
are on loopback. Infra ports (xDS, authz, status, Envoy admin) are picked free on
127.0.0.1; gateway and service ports come from the policy. Once every part reports ready
it prints the gateway URLs and ready-to-paste ``curl`` commands with demo tokens, then
one line per authz decision (read back from authz's decision log,
``<state-dir>/logs/decisions.jsonl``), or with ``--traces`` one span tree per request
instead.
Ctrl-C (or SIGTERM) stops every process it started.

Tracing (:class:`TracePlan`): when the policy has ``tracing:``, authz exports its
decision spans to the same collector as Envoy (the standard ``OTEL_EXPORTER_OTLP_*``
variables in its environment). When that collector's address is on loopback (as demo
upstreams are started only for loopback endpoints), ``meshward up`` runs it too: the
built-in ``meshward otlp-receiver``, writing ``<state-dir>/logs/spans.jsonl`` for
``meshward traces``, so a trace view needs no external system.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshward.demo_keys import DEMO_ISSUER, DemoKey, ensure_demo_key
from meshward.envoy_binary import EnvoyNotFoundError, find_envoy
from meshward.policy.errors import PolicyError
from meshward.policy.loader import load_policy
from meshward.policy.model import Gateway, Policy
from meshward.spans_file import spans_file_path
from meshward.supervisor import Child, Supervisor


def register(sub: Any) -> None:
    p = sub.add_parser("up", help="run the local mesh: xDS server, authz, Envoy, demo services")
    p.add_argument(
        "--policy", type=Path, default=Path("policies"), help="policy directory (default: policies)"
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".meshward"),
        help="demo key, rendered bootstraps and process logs (default: .meshward)",
    )
    p.add_argument(
        "--bootstrap-template",
        type=Path,
        default=Path("envoy/bootstrap.yaml"),
        help="Envoy bootstrap template (default: envoy/bootstrap.yaml)",
    )
    p.add_argument(
        "--no-upstreams",
        action="store_true",
        help="do not start demo upstreams (you run the services yourself)",
    )
    p.add_argument("--authz-workers", type=int, default=4)
    p.add_argument(
        "--authz-replicas",
        type=_replica_count,
        default=1,
        metavar="N",
        help=(
            "authz processes to run (default 1); each registers itself with the xDS "
            "server as an endpoint of the authz cluster, and Envoy spreads Checks over them"
        ),
    )
    p.add_argument(
        "--authz-pin",
        action="store_true",
        help="pin authz replica i to CPU i (mod the CPU count), as `meshward authz --cpu` does",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for every part to become ready",
    )
    p.add_argument(
        "--quiet-decisions", action="store_true", help="do not print a line per authz decision"
    )
    p.add_argument(
        "--traces",
        action="store_true",
        help=(
            "print one span tree per request (as `meshward traces -f` does) instead of a "
            "line per decision; needs `tracing:` in the policy with a loopback collector"
        ),
    )
    p.add_argument(
        "--no-trace-receiver",
        action="store_true",
        help=(
            "do not start the built-in OTLP receiver on the policy's loopback tracing "
            "collector address (you run a collector there yourself)"
        ),
    )
    p.set_defaults(func=run)


def _replica_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 16:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of authz processes, 1 to 16")
    return value


@dataclass(frozen=True)
class Ports:
    xds: int
    xds_status: int
    #: The first authz replica's gRPC and status ports.
    authz: int
    authz_status: int
    admin: dict[str, int]
    #: (gRPC, status) ports of the replicas after the first (``--authz-replicas``).
    more_authz: tuple[tuple[int, int], ...] = ()

    def replicas(self) -> list[tuple[str, int, int]]:
        """(name, gRPC port, status port) of every authz replica; the first is "authz"."""
        first = [("authz", self.authz, self.authz_status)]
        return first + [(f"authz-{i}", g, st) for i, (g, st) in enumerate(self.more_authz, 2)]


@dataclass(frozen=True)
class TracePlan:
    """Where spans go for this run of ``meshward up`` (see the module doc)."""

    #: ``HOST:PORT`` of the OTLP/gRPC collector (policy ``tracing``), or ``None``.
    collector: str | None = None
    #: The built-in receiver's spans file when ``meshward up`` runs it, else ``None``.
    spans_file: Path | None = None

    @property
    def receiver(self) -> bool:
        return self.spans_file is not None

    def authz_env(self) -> dict[str, str]:
        """authz's OpenTelemetry export settings (none when the policy does not trace)."""
        if self.collector is None:
            return {}
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{self.collector}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
        }


def trace_plan(policy: Policy, state_dir: Path, start_receiver: bool = True) -> TracePlan:
    """The tracing set-up for ``policy``: the built-in receiver runs for a loopback
    collector unless ``start_receiver`` is false (``--no-trace-receiver``)."""
    tracing = policy.tracing
    if tracing is None:
        return TracePlan()
    collector = host_port(tracing.collector_address, tracing.collector_port)
    if start_receiver and _is_loopback(tracing.collector_address):
        return TracePlan(collector, spans_file_path(state_dir))
    return TracePlan(collector)


def host_port(address: str, port: int) -> str:
    """``HOST:PORT``, with an IPv6 address in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _traces_unavailable(policy: Policy, plan: TracePlan, args: argparse.Namespace) -> str | None:
    """Why ``--traces`` cannot show anything with this policy and these flags, if so."""
    if plan.receiver:
        return None
    if policy.tracing is None:
        return (
            f"--traces: the policy in {args.policy} has no `tracing:` section; add "
            "`tracing: {collector: {address: 127.0.0.1, port: 4317}}` to a policy file"
        )
    if args.no_trace_receiver:
        return (
            "--traces shows what the built-in trace receiver gets: drop --no-trace-receiver "
            "(or view traces in the collector you run)"
        )
    return (
        f"{policy.tracing.source}: --traces needs the tracing collector on loopback to run "
        f"the built-in receiver there, not {plan.collector}; use 127.0.0.1, or view traces "
        "in that collector"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: argparse.Namespace) -> int:
    say = _Printer()
    try:
        envoy = find_envoy()
    except EnvoyNotFoundError as exc:
        say.error(str(exc))
        return 2
    demo_key = _demo_key(args)
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        for issue in exc.issues:
            say.error(str(issue))
        say.error(f"{args.policy}: the policy was not accepted; fix it and run `meshward up` again")
        return 2
    traces = trace_plan(policy, args.state_dir, not args.no_trace_receiver)
    if args.traces and (why := _traces_unavailable(policy, traces, args)):
        say.error(why)
        return 2
    busy = _busy_policy_ports(policy, not args.no_upstreams, traces)
    if busy:
        for msg in busy:
            say.error(msg)
        return 2
    ports = Ports(
        xds=free_port(),
        xds_status=free_port(),
        authz=free_port(),
        authz_status=free_port(),
        admin={group: free_port() for group in policy.node_groups()},
        more_authz=tuple((free_port(), free_port()) for _ in range(args.authz_replicas - 1)),
    )
    quiet = args.quiet_decisions or args.traces
    sup = Supervisor(on_line=_LineRouter(say, quiet), on_event=say.event)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    followers: list[Any] = []
    if args.traces:
        from meshward.traces_cmd import TraceTail

        assert traces.spans_file is not None
        traces.spans_file.parent.mkdir(parents=True, exist_ok=True)
        # Started before the receiver: spans an earlier run left in the file are not shown.
        followers.append(TraceTail(traces.spans_file, say.decision))
    elif not quiet:
        from authz.decision_log import DecisionLogFollower

        # Started before authz: what an earlier run left in the files is not shown.
        followers += [
            DecisionLogFollower(
                decision_log_path(args.state_dir, name), lambda line: _print_decision(say, line)
            )
            for name, _, _ in ports.replicas()
        ]
    for follower in followers:
        follower.start()
    try:
        _start_all(sup, args, policy, ports, envoy, traces=traces)
        if not _wait_ready(sup, policy, ports, args.ready_timeout, say, traces=traces):
            say.error(
                f"the mesh did not become ready in {args.ready_timeout:.0f}s; "
                f"see the logs in {args.state_dir / 'logs'}"
            )
            return 1
        _write_state(args.state_dir, ports, traces)
        say.banner(_banner(policy, ports, demo_key, args, traces))
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        say.event("stopping every process meshward up started ...")
        say.stopping = True
        sup.stop()
        for follower in followers:
            follower.stop()
        say.event("stopped")
    return 0


def decision_log_path(state_dir: Path, replica: str = "authz") -> Path:
    """An authz replica's decision log (a file per replica: two writers never share one)."""
    name = "decisions.jsonl" if replica == "authz" else f"decisions-{replica}.jsonl"
    return state_dir / "logs" / name


def _print_decision(say: _Printer, line: str) -> None:
    try:
        rec = json.loads(line)
    except ValueError:
        return
    if isinstance(rec, dict):
        say.decision(format_decision(rec))


def _demo_key(args: argparse.Namespace) -> DemoKey:
    return ensure_demo_key(args.state_dir, args.policy / "keys" / "demo-jwks.json")


def _busy_policy_ports(
    policy: Policy, upstreams: bool, traces: TracePlan | None = None
) -> list[str]:
    """Policy-owned ports that something else already listens on."""
    wanted = [(g.address, g.port, f"gateway '{g.name}'", g.source) for g in policy.gateways]
    if traces is not None and traces.receiver and policy.tracing is not None:
        t = policy.tracing
        wanted.append(
            (
                t.collector_address,
                t.collector_port,
                "the built-in trace receiver (tracing collector; if you run a collector "
                "there, pass --no-trace-receiver)",
                t.source,
            )
        )
    wanted += [
        (s.sidecar.address, s.sidecar.port, f"the sidecar of service '{s.name}'", s.source)
        for s in policy.services
        if s.sidecar is not None
    ]
    if upstreams:
        wanted += [
            (e.address, e.port, f"service '{s.name}'", s.source)
            for s in policy.services
            for e in s.endpoints
            if _is_loopback(e.address)
        ]
    out = []
    for address, port, what, source in wanted:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address, port))
            except OSError as exc:
                out.append(
                    f"{source}: {what} needs {address}:{port}, which is busy "
                    f"({exc.strerror}); stop what uses it or change the port"
                )
    return out


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _start_all(
    sup: Supervisor,
    args: argparse.Namespace,
    policy: Policy,
    ports: Ports,
    envoy: str,
    *,
    traces: TracePlan,
) -> None:
    from xds_server.bootstrap import render_bootstrap

    py = [sys.executable, "-m", "meshward"]
    logs = args.state_dir / "logs"
    policy_dir = str(args.policy)
    if traces.receiver:
        # First up, last down: it takes the spans authz and Envoy flush as they stop.
        assert traces.collector is not None and traces.spans_file is not None
        sup.start(
            Child(
                "otlp-receiver",
                [*py, "otlp-receiver", "--listen", traces.collector,
                 "--spans-file", str(traces.spans_file)],
                log_path=logs / "otlp-receiver.log",
            )
        )  # fmt: skip
    if not args.no_upstreams:
        for service in policy.services:
            for i, ep in enumerate(e for e in service.endpoints if _is_loopback(e.address)):
                sup.start(
                    Child(
                        f"upstream-{service.name}-{i}",
                        [
                            *py,
                            "demo-upstream",
                            "--name",
                            service.name,
                            "--listen",
                            f"{ep.address}:{ep.port}",
                        ],
                        log_path=logs / f"upstream-{service.name}-{i}.log",
                    )
                )
    sup.start(
        Child(
            "xds",
            [*py, "xds", "--policy", policy_dir,
             "--listen", f"127.0.0.1:{ports.xds}",
             "--status-listen", f"127.0.0.1:{ports.xds_status}",
             "--ca-dir", str(args.state_dir / "ca")],
            env={"OTEL_SERVICE_NAME": "meshward-xds"},
            log_path=logs / "xds.log",
        )
    )  # fmt: skip
    # authz takes its policy from the xDS server (one source of truth), not from files,
    # and each replica registers itself there as an endpoint of the authz cluster.
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    for i, (name, grpc_port, status_port) in enumerate(ports.replicas()):
        pin = ["--cpu", str(cpus[i % len(cpus)])] if args.authz_pin and cpus else []
        sup.start(
            Child(
                name,
                [*py, "authz", "--xds", f"127.0.0.1:{ports.xds}",
                 "--node-id", f"{name}-local",
                 "--listen", f"127.0.0.1:{grpc_port}",
                 "--status-listen", f"127.0.0.1:{status_port}",
                 "--workers", str(args.authz_workers),
                 "--decision-log", str(decision_log_path(args.state_dir, name)), *pin],
                env={"OTEL_SERVICE_NAME": "meshward-authz", **traces.authz_env()},
                log_path=logs / f"{name}.log",
            )
        )  # fmt: skip
    boot_dir = args.state_dir / "bootstrap"
    boot_dir.mkdir(parents=True, exist_ok=True)
    # One Envoy per node group: each gateway and each service's sidecar.
    for group in policy.node_groups():
        path = boot_dir / f"{group}.yaml"
        path.write_text(
            render_bootstrap(
                node_id=f"{group}-local",
                node_cluster=group,
                admin_port=ports.admin[group],
                xds_host="127.0.0.1",
                xds_port=ports.xds,
                template=args.bootstrap_template,
            )
        )
        sup.start(
            Child(
                f"envoy-{group}",
                [
                    envoy,
                    "-c",
                    str(path),
                    "--concurrency",
                    "1",
                    "--disable-hot-restart",
                    "--log-level",
                    "warn",
                ],
                log_path=logs / f"envoy-{group}.log",
            )
        )


def _write_state(state_dir: Path, ports: Ports, traces: TracePlan = TracePlan()) -> None:
    """Where this mesh's parts listen, for `meshward status`, `meshward traces` and others."""
    info: dict[str, Any] = {
        "xds": f"127.0.0.1:{ports.xds}",
        "xds_status_url": f"http://127.0.0.1:{ports.xds_status}/status",
        "authz": f"127.0.0.1:{ports.authz}",
        "authz_status_url": f"http://127.0.0.1:{ports.authz_status}/status",
        "authz_replicas": [
            {
                "name": name,
                "authz": f"127.0.0.1:{grpc_port}",
                "status_url": f"http://127.0.0.1:{status_port}/status",
                "decision_log": str(decision_log_path(state_dir, name)),
            }
            for name, grpc_port, status_port in ports.replicas()
        ],
        "decision_log": str(decision_log_path(state_dir)),
        "envoy_admin": {name: f"http://127.0.0.1:{port}" for name, port in ports.admin.items()},
        "trace_collector": traces.collector,
        "spans_file": str(traces.spans_file) if traces.spans_file is not None else None,
    }
    (state_dir / "up.json").write_text(json.dumps(info, indent=2) + "\n")


def _http_ok(url: str, want: str | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - our loopback URL
            body = resp.read().decode()
            return resp.status == 200 and (want is None or want in body)
    except (urllib.error.URLError, OSError):
        return False


def _tcp_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1):
            return True
    except OSError:
        return False


def _wait_ready(
    sup: Supervisor,
    policy: Policy,
    ports: Ports,
    timeout: float,
    say: _Printer,
    *,
    traces: TracePlan,
) -> bool:
    # authz's /healthz is 200 only once it holds both the policy and its SVID (both
    # come from the xDS server over ADS; it serves Envoy over mTLS only).
    checks = {
        name: f"http://127.0.0.1:{status_port}/healthz" for name, _, status_port in ports.replicas()
    }
    checks["xds"] = f"http://127.0.0.1:{ports.xds_status}/healthz"
    for group in policy.node_groups():
        checks[f"envoy-{group}"] = f"http://127.0.0.1:{ports.admin[group]}/ready"
    pending = dict(checks)
    if traces.receiver and policy.tracing is not None:
        pending["otlp-receiver"] = ""  # ready once it accepts connections
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for name, url in list(pending.items()):
            if name == "otlp-receiver":
                assert policy.tracing is not None
                ready = _tcp_open(policy.tracing.collector_address, policy.tracing.collector_port)
            else:
                ready = _http_ok(url, "LIVE" if name.startswith("envoy-") else None)
            if ready:
                say.event(f"{name} is ready")
                del pending[name]
        if pending:
            time.sleep(0.1)
    if pending:
        return False
    # Envoy is LIVE once its listeners arrived over xDS; confirm each listener accepts.
    listeners = [(g.address, g.port) for g in policy.gateways]
    listeners += [(s.sidecar.address, s.sidecar.port) for s in policy.services if s.sidecar]
    for address, port in listeners:
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((address, port), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            return False
    # Listening is not deciding: until the xDS server has pushed the authz replicas as
    # endpoints (after each one ACKed its policy and SVID), Envoy fails every request
    # closed. Ready means each Envoy's authz cluster has an endpoint.
    for group in policy.node_groups():
        url = f"http://127.0.0.1:{ports.admin[group]}/clusters"
        while not _authz_endpoints(url):
            if time.monotonic() >= deadline:
                say.event(f"envoy-{group} has no authz endpoint yet")
                return False
            time.sleep(0.1)
    return True


def _authz_endpoints(clusters_url: str) -> int:
    """Endpoints of the authz cluster an Envoy lists on its admin ``/clusters`` page
    (0 when it cannot be read)."""
    from xds_server.translator import AUTHZ_CLUSTER

    try:
        with urllib.request.urlopen(clusters_url, timeout=1) as resp:  # noqa: S310 - loopback
            text = resp.read().decode()
    except (urllib.error.URLError, OSError):
        return 0
    prefix = f"{AUTHZ_CLUSTER}::"
    return sum(
        1 for line in text.splitlines() if line.startswith(prefix) and "::health_flags::" in line
    )


def gateway_url(gw: Gateway) -> str:
    """How a client on this machine reaches a gateway (https with the cert's DNS name)."""
    if gw.tls is not None:
        host = gw.tls.dns_names[0] if gw.tls.dns_names else "localhost"
        return f"https://{host}:{gw.port}"
    host = "127.0.0.1" if gw.address in ("0.0.0.0", "::") else gw.address
    return f"http://{host}:{gw.port}"


def _banner(
    policy: Policy,
    ports: Ports,
    key: DemoKey,
    args: argparse.Namespace,
    traces: TracePlan = TracePlan(),
) -> str:
    lines = [f"meshward is up: policy {policy.version} from {args.policy}/", ""]
    for gw in policy.gateways:
        lines.append(
            f"  gateway {gw.name:<10} {gateway_url(gw)}   "
            f"(Envoy admin http://127.0.0.1:{ports.admin[gw.name]})"
        )
    for svc in policy.services:
        if svc.sidecar is not None:
            group = policy.sidecar_group(svc.name)
            lines.append(
                f"  sidecar {svc.name:<10} {svc.sidecar.address}:{svc.sidecar.port} "
                f"(mTLS only, {policy.spiffe_id(svc.name)}; "
                f"Envoy admin http://127.0.0.1:{ports.admin[group]})"
            )
    ca_bundle = args.state_dir / "ca" / "ca.crt"
    if any(g.tls for g in policy.gateways):
        lines.append(
            f"  CA bundle          {ca_bundle}   (trust domain {policy.mesh.trust_domain})"
        )
    lines += [
        f"  xDS server         127.0.0.1:{ports.xds}   "
        f"(status http://127.0.0.1:{ports.xds_status}/status)",
        *(
            f"  {name:<18} 127.0.0.1:{grpc_port}   "
            f"(mTLS only, {policy.spiffe_id('meshward-authz')}; "
            f"metrics http://127.0.0.1:{status_port}/metrics)"
            for name, grpc_port, status_port in ports.replicas()
        ),
        f"  logs               {args.state_dir / 'logs'}/",
        f"  decision log       {decision_log_path(args.state_dir)}   (one JSON line each"
        + (", a file per authz replica)" if ports.more_authz else ")"),
        *_trace_banner(traces, args.state_dir),
        "  status             meshward status   (policy and per-proxy versions)",
        f"  live reload        edit {args.policy}/*.yaml: valid edits apply within a second",
        "",
    ]
    demo = any(i.issuer == DEMO_ISSUER for i in policy.issuers) and policy.gateways
    if demo:
        gw = policy.gateways[0]
        url = gateway_url(gw)
        curl = f"curl -i --cacert {ca_bundle}" if gw.tls else "curl -i"
        alice = key.mint("alice", ["staff"], ttl=8 * 3600)
        bob = key.mint("bob", ["customers"], ttl=8 * 3600)
        lines += [
            "Demo tokens (8 h; mint more with `meshward token --sub NAME --groups a,b`):",
            f"  export ALICE={alice}",
            f"  export BOB={bob}",
            "",
            "Try:",
            "  # 200: alice administers orders",
            f'  {curl} {url}/orders/42 -H "Authorization: Bearer $ALICE"',
            "  # 403: bob is a customer, customers may not read orders",
            f'  {curl} {url}/orders/42 -H "Authorization: Bearer $BOB"',
            "  # 200: customers may read the catalog",
            f'  {curl} {url}/catalog/items -H "Authorization: Bearer $BOB"',
            "  # 401: no token",
            f"  {curl} {url}/orders/42",
            "",
        ]
    elif policy.gateways:
        gw = policy.gateways[0]
        curl = f"curl -i --cacert {ca_bundle}" if gw.tls else "curl -i"
        first = next(iter(gw.routes), None)
        path = (first.match.prefix or first.match.path or "/") if first else "/"
        lines += [
            "Try (mint tokens with your issuer's key; send them as 'Authorization: Bearer'):",
            "  # 401 until you send a token",
            f"  {curl} {gateway_url(gw)}{path}",
            "",
        ]
    if args.traces:
        lines.append("Traces, one tree per request (Ctrl-C stops everything):")
    else:
        lines.append("Decisions (Ctrl-C stops everything):")
    return "\n".join(lines)


def _trace_banner(traces: TracePlan, state_dir: Path) -> list[str]:
    """The banner's tracing lines: where spans go and how to view them."""
    if traces.collector is None:
        return ["  traces             off (add `tracing:` to the policy to trace requests)"]
    if traces.spans_file is None:
        return [f"  traces             exported to your collector at {traces.collector}"]
    view = "meshward traces -f"
    if state_dir != Path(".meshward"):
        view += f" --state-dir {state_dir}"
    return [
        f"  traces             {traces.spans_file}   "
        f"(built-in OTLP receiver on {traces.collector})",
        f"  view traces        {view}   (one span tree per request)",
    ]


class _Printer:
    """Serialises console output from several reader threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Once shutting down, children's own shutdown chatter is not echoed.
        self.stopping = False

    def _write(self, text: str, stream: Any = None) -> None:
        with self._lock:
            print(text, file=stream or sys.stdout, flush=True)

    def event(self, text: str) -> None:
        self._write(f"[meshward] {text}")

    def child_event(self, text: str) -> None:
        if not self.stopping:
            self.event(text)

    def error(self, text: str) -> None:
        self._write(text, sys.stderr)

    def banner(self, text: str) -> None:
        self._write(text)

    def decision(self, text: str) -> None:
        self._write(text)


class _LineRouter:
    """Turns children's JSON log lines into console output.

    authz decision records become one line each; warnings and errors of any child are
    echoed; everything else stays in the child's log file only.
    """

    def __init__(self, say: _Printer, quiet_decisions: bool) -> None:
        self._say = say
        self._quiet = quiet_decisions

    def __call__(self, child: Child, line: str) -> None:
        try:
            rec = json.loads(line)
        except ValueError:
            if child.name.startswith("envoy-") and (
                "[warning]" in line or "[error]" in line or "[critical]" in line
            ):
                self._say.child_event(f"{child.name}: {line}")
            return
        if not isinstance(rec, dict):
            return
        if rec.get("logger") == "meshward.decision":
            if not self._quiet:
                self._say.decision(format_decision(rec))
        elif rec.get("level") in ("warning", "error", "critical"):
            self._say.child_event(f"{child.name}: {rec.get('level')}: {rec.get('msg')}")


def format_decision(rec: dict[str, Any]) -> str:
    """One human line for a decision record."""
    d = rec.get("decision") if isinstance(rec.get("decision"), dict) else rec
    assert isinstance(d, dict)
    verdict = str(d.get("decision", "?")).upper()
    return (
        f"{verdict:<5} {d.get('status', '?')} {d.get('method', '-')} {d.get('path', '-')}"
        f"  subject={d.get('subject') or '-'} route={d.get('route') or '-'}"
        f" reason={d.get('reason', '-')} trace={str(d.get('trace_id') or '-')[:16]}"
        f" id={d.get('decision_id', '-')}"
    )
