"""xDS fan-out after one policy edit: convergence time and the xDS server's memory.

The xDS server (``XdsService``, its public API only) runs in a process of its own, driven
through a command pipe (``edit`` → ``set_policy``, ``status``), so the RSS read from
``/proc/<pid>/status`` is the server's alone. Simulated Envoys run in one or two other
processes (``grpc.aio``, one channel and so one TCP connection per client). Each speaks
SotW ``StreamAggregatedResources`` as Envoy does: node id + ``node.cluster`` (the gateway
name) on the first request; CDS wildcard; EDS for the EDS clusters the CDS response names;
LDS wildcard once CDS arrived; RDS for the ``route_config_name`` of the listeners' HTTP
connection managers. Every response is ACKed with its ``version_info`` and nonce, right
after it is read (in order, so an ACK never answers a response that a newer one of the
same type already superseded). A stream that fails (connect storms see ``INTERNAL`` /
``CANCELLED``) or ends is reconnected with jittered exponential back-off, resubscribing
with the last ACKed versions and no nonce, as Envoy does; reconnects are counted.

The policy is generated: N routes on one gateway across 10 services (IP endpoints, so
every service is an EDS cluster), one issuer, one role, one binding. Once every client
has ACKed the initial RDS, the bench makes ONE edit (route 0 gets a new prefix) with
``set_policy`` and measures, from just before ``set_policy`` in the server process:

* **converge s** — until the last ACK any client sent for a response carrying a version
  it had not ACKed before the edit (every pushed type, whichever the server pushes), once
  every client has ACKed an RDS response carrying the new prefix. Measured after 0.3 s
  without any response, so a late push still counts.
* **responses** — DiscoveryResponses the server sent for the edit (from ``status()``;
  the clients' own count when the status does not say).
* **srv CPU s** — the server process's CPU time from the edit until quiet.
* **RSS** — the server's VmHWM from its start until every client synced (the connect
  storm), VmHWM from the edit until quiet (reset through ``/proc/<pid>/clear_refs`` just
  before the edit), and VmRSS after the edit.

Prints a table and the issue's targets (PASS/MISS); it asserts nothing about speed.

    .venv/bin/python bench/xds_bench.py --clients 1,100,1000 --routes 100,1000 --repeat 1
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GATEWAY = "edge"
SERVICES = 10
AUTHZ_ENDPOINTS = (("127.0.0.1", 9191),)
ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"

_PREFIX = "type.googleapis.com/"
CDS = _PREFIX + "envoy.config.cluster.v3.Cluster"
EDS = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = _PREFIX + "envoy.config.listener.v3.Listener"
RDS = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
HCM = _PREFIX + (
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
SHORT = {CDS: "cds", EDS: "eds", LDS: "lds", RDS: "rds"}

#: The issue's targets ("Policy lifecycle…"): at 1,000 clients.
TARGET_CLIENTS = 1000
TARGET_CONVERGE_S = 2.0
TARGET_RSS_MB = 300.0

#: After the last client converged, wait this long without a response before measuring.
SETTLE_S = 0.3
#: Reconnect back-off: full jitter, doubling from this base up to the cap (Envoy's ADS
#: retry is jittered exponential too, with a larger base; short here to keep runs brief).
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 2.0
#: One TCP connection per client, as separate Envoys have (grpc would share subchannels).
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


def edit_prefix(edit: int) -> str:
    """Route 0's prefix after edit ``edit`` (its bytes mark the new RDS content)."""
    return f"/bench-edited-{edit}/"


# -- policy (server process) ----------------------------------------------------------


def bench_policy(routes: int, edit: int = 0) -> Any:
    """``routes`` routes on gateway ``edge`` over 10 services; edit k re-prefixes route 0."""
    from meshward.policy.model import (
        Binding,
        Endpoint,
        Gateway,
        Issuer,
        Permission,
        Policy,
        Role,
        Route,
        RouteMatch,
        Service,
    )

    services = tuple(
        Service(f"svc-{s}", (Endpoint("127.0.0.1", 20000 + s),)) for s in range(SERVICES)
    )
    route_list = []
    for i in range(routes):
        service = f"svc-{i % SERVICES}"
        prefix = edit_prefix(edit) if edit and i == 0 else f"/{service}/r{i}"
        methods = ("GET",) if i % 2 else ()
        route_list.append(Route(f"route-{i}", RouteMatch(prefix=prefix, methods=methods), service))
    jwks = {
        "keys": [
            {
                "kty": "RSA",
                "kid": "bench-1",
                "use": "sig",
                "alg": "RS256",
                "n": "u1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0_IzW7yWR7Q",
                "e": "AQAB",
            }
        ]
    }
    return Policy.build(
        services=services,
        gateways=(Gateway(GATEWAY, 10000, tuple(route_list)),),
        issuers=(Issuer("bench-idp", "https://idp.bench.invalid", ("meshward",), jwks=jwks),),
        roles=(Role("reader", (Permission(methods=("GET",), paths=("*",)),)),),
        bindings=(Binding("staff-readers", "reader", groups=("staff",)),),
    )


def _server_main(conn: Connection, routes: int, edits: int) -> None:
    asyncio.run(_serve(conn, routes, edits))


async def _serve(conn: Connection, routes: int, edits: int) -> None:
    from xds_server.service import XdsService

    # Built up front: loading a policy is not part of the push being measured.
    policies = [bench_policy(routes, k) for k in range(edits + 1)]
    service = XdsService(policies[0], AUTHZ_ENDPOINTS, listen="127.0.0.1:0")
    port = await service.start()
    commands = _commands(conn)
    conn.send(("ready", port))
    try:
        while True:
            command, *args = await commands.get()
            if command == "edit":
                started = time.monotonic()
                await service.set_policy(policies[args[0]])
                conn.send((started, time.monotonic() - started))
            elif command == "status":
                conn.send(_status_summary(service.status()))
            else:
                return
    finally:
        await service.stop(grace=1.0)


def _status_summary(status: dict[str, Any]) -> dict[str, Any]:
    """Streams and responses sent, from ``status()``; ``None`` where it does not say."""
    nodes = status.get("nodes")
    responses: int | None = None
    if isinstance(nodes, list):
        try:
            responses = sum(
                int(t.get("responses", 0)) for n in nodes for t in n.get("types", {}).values()
            )
        except (AttributeError, TypeError, ValueError):
            responses = None
    return {
        "streams": len(nodes) if isinstance(nodes, list) else None,
        "responses": responses,
        "version": status.get("version"),
    }


def _commands(conn: Connection) -> asyncio.Queue[tuple[Any, ...]]:
    """Commands from the parent, read on the event loop; a closed pipe means stop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    fd = conn.fileno()

    def readable() -> None:
        try:
            while conn.poll():
                queue.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(fd)
            queue.put_nowait(("stop",))

    loop.add_reader(fd, readable)
    return queue


# -- simulated Envoys (client processes) ----------------------------------------------


@dataclass
class Tally:
    """Shared by the clients of one process."""

    last_response_at: float = 0.0


class SimEnvoy:
    """One ADS client, subscribing and ACKing like Envoy; reconnects until stopped."""

    def __init__(self, target: str, node_id: str, cluster: str, tally: Tally) -> None:
        from envoy.config.core.v3 import base_pb2

        self.target = target
        self.node = base_pb2.Node(id=node_id, cluster=cluster)
        self.tally = tally
        self.acked: dict[str, str] = {}  # type → last ACKed version (kept across streams)
        self.names: dict[str, tuple[str, ...]] = {}  # EDS/RDS subscriptions
        self.nonces: dict[str, str] = {}  # type → last nonce seen on this stream
        self.synced_at: float | None = None
        self.responses = 0  # over the client's life
        self.reconnects = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.stopping = False
        self._node_sent = False
        self._lds_requested = False
        self._call: Any = None
        self.arm(None)

    def arm(self, marker: bytes | None) -> None:
        """Start a measured phase: an RDS carrying ``marker`` is the edit arriving."""
        self.marker = marker
        self.before = dict(self.acked)
        self.converged_at: float | None = None
        self.last_new_ack: float | None = None
        self.changed: set[str] = set()
        self.phase_responses = 0
        self.phase_reconnects = 0

    async def run(self) -> None:
        import grpc

        failures = 0
        while not self.stopping:
            channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
            responses_before = self.responses
            try:
                await self._stream(channel)
                outcome = "ended"  # the server closed the stream
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code().name
            finally:
                self._call = None
                await channel.close()
            if self.stopping:
                return
            self.failures[outcome] += 1
            self.reconnects += 1
            self.phase_reconnects += 1
            if self.responses > responses_before:
                failures = 0  # the stream had worked: start the back-off over
            failures += 1
            await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**failures)))

    def stop(self) -> None:
        self.stopping = True
        if self._call is not None:
            self._call.cancel()

    async def _stream(self, channel: Any) -> None:
        from envoy.service.discovery.v3 import discovery_pb2

        call = channel.stream_stream(
            ADS_METHOD,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )()
        self._call = call
        self.nonces = {}
        self._node_sent = False
        # A new stream (also after a reconnect): last ACKed versions, no nonce, every
        # subscription again.
        await self._request(call, CDS)
        self._lds_requested = LDS in self.acked
        for type_url in (EDS, LDS, RDS):
            if type_url in self.acked or self.names.get(type_url):
                await self._request(call, type_url)
        async for response in call:
            await self._on_response(call, response)

    async def _request(self, call: Any, type_url: str) -> None:
        from envoy.service.discovery.v3 import discovery_pb2

        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            version_info=self.acked.get(type_url, ""),
            response_nonce=self.nonces.get(type_url, ""),
            resource_names=self.names.get(type_url, ()),
        )
        if not self._node_sent:  # like set_node_on_first_message_only
            request.node.CopyFrom(self.node)
            self._node_sent = True
        await call.write(request)

    async def _on_response(self, call: Any, response: Any) -> None:
        type_url = response.type_url
        self.nonces[type_url] = response.nonce
        self.responses += 1
        self.tally.last_response_at = time.monotonic()
        if type_url == CDS:
            await self._subscribe(call, EDS, _eds_names(response.resources))
        elif type_url == LDS:
            await self._subscribe(call, RDS, _route_config_names(response.resources))
        self.acked[type_url] = response.version_info
        await self._request(call, type_url)  # the ACK
        now = time.monotonic()
        if type_url == CDS and not self._lds_requested:
            self._lds_requested = True
            await self._request(call, LDS)
        if self.marker is not None:
            self.phase_responses += 1
            if response.version_info != self.before.get(type_url):
                self.last_new_ack = now
                self.changed.add(type_url)
        if type_url == RDS:
            if self.synced_at is None:
                self.synced_at = now
            marker = self.marker
            if (
                marker is not None
                and self.converged_at is None
                and any(marker in r.value for r in response.resources)
            ):
                self.converged_at = now

    async def _subscribe(self, call: Any, type_url: str, names: tuple[str, ...]) -> None:
        if names != self.names.get(type_url, ()):
            self.names[type_url] = names
            await self._request(call, type_url)


def _eds_names(resources: Iterable[Any]) -> tuple[str, ...]:
    from envoy.config.cluster.v3 import cluster_pb2

    names = []
    for packed in resources:
        cluster = cluster_pb2.Cluster.FromString(packed.value)
        if cluster.type == cluster_pb2.Cluster.EDS:
            names.append(cluster.eds_cluster_config.service_name or cluster.name)
    return tuple(sorted(names))


def _route_config_names(resources: Iterable[Any]) -> tuple[str, ...]:
    from envoy.config.listener.v3 import listener_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    names = set()
    for packed in resources:
        listener = listener_pb2.Listener.FromString(packed.value)
        for chain in listener.filter_chains:
            for network_filter in chain.filters:
                if network_filter.typed_config.type_url != HCM:
                    continue
                manager = hcm_pb2.HttpConnectionManager.FromString(
                    network_filter.typed_config.value
                )
                if manager.HasField("rds"):
                    names.add(manager.rds.route_config_name)
    return tuple(sorted(names))


def _clients_main(conn: Connection, port: int, node_ids: list[str]) -> None:
    asyncio.run(_run_clients(conn, port, node_ids))


async def _run_clients(conn: Connection, port: int, node_ids: list[str]) -> None:
    tally = Tally()
    connecting_at = time.monotonic()
    clients = [SimEnvoy(f"127.0.0.1:{port}", n, GATEWAY, tally) for n in node_ids]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    commands = _commands(conn)
    try:
        while True:
            command, *args = await commands.get()
            if command == "sync":
                await _until(lambda: all(c.synced_at is not None for c in clients), args[0])
                report = _phase_report(clients)
                report["synced"] = sum(c.synced_at is not None for c in clients)
                report["connecting_at"] = connecting_at
                report["last_synced_at"] = max((c.synced_at or 0.0) for c in clients)
                conn.send(report)
            elif command == "arm":
                for c in clients:
                    c.arm(args[0])
                conn.send("armed")
            elif command == "wait":
                await _until(lambda: all(c.converged_at is not None for c in clients), args[0])
                deadline = time.monotonic() + 5.0
                while time.monotonic() < deadline:
                    quiet = time.monotonic() - tally.last_response_at
                    if quiet >= SETTLE_S:
                        break
                    await asyncio.sleep(SETTLE_S - quiet)
                conn.send(_phase_report(clients))
            else:
                return
    finally:
        for c in clients:
            c.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _phase_report(clients: list[SimEnvoy]) -> dict[str, Any]:
    failures: collections.Counter[str] = collections.Counter()
    for c in clients:
        failures.update(c.failures)
    return {
        "converged": sum(c.converged_at is not None for c in clients),
        "converged_at": [c.converged_at for c in clients],
        "last_new_ack": [c.last_new_ack for c in clients],
        "rds_before": [c.before.get(RDS) for c in clients],
        "rds_acked": [c.acked.get(RDS) for c in clients],
        "changed": sorted({SHORT.get(t, t) for c in clients for t in c.changed}),
        "responses": sum(c.phase_responses for c in clients),
        "phase_reconnects": sum(c.phase_reconnects for c in clients),
        "reconnects": sum(c.reconnects for c in clients),
        "failures": dict(failures),
    }


async def _until(done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


# -- orchestration (parent process) ---------------------------------------------------


@dataclass
class EditResult:
    edit: int
    apply_s: float  # set_policy (translate + snapshots), in the server process
    converged: int  # clients that ACKed an RDS with the edit
    converge_s: float | None  # None: not every client converged within the timeout
    rds_s: float | None  # until the last client ACKed the edited RDS
    responses: int | None  # sent by the server for the edit (status), if it says
    client_responses: int  # received by the clients in the phase
    server_cpu_s: float
    rss_mb: float  # VmRSS after the edit
    hwm_mb: float  # VmHWM: the server's peak during the edit (or its life, see hwm_reset)
    hwm_reset: bool  # VmHWM was reset just before the edit (/proc/<pid>/clear_refs)
    changed: list[str]
    reconnects: int  # during the edit phase
    rds_before: list[str | None]
    rds_acked: list[str | None]


@dataclass
class CellResult:
    clients: int
    routes: int
    client_procs: int
    synced: int = 0
    sync_s: float | None = None  # from the clients' start until every client had RDS
    rss_synced_mb: float = 0.0
    peak_synced_mb: float = 0.0  # VmHWM once every client is synced: start + connect storm
    edits: list[EditResult] = field(default_factory=list)
    reconnects: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    error: str | None = None


def measure(
    clients: int,
    routes: int,
    *,
    repeat: int = 1,
    client_procs: int | None = None,
    timeout: float = 30.0,
) -> CellResult:
    """Run one cell of the matrix: start server and clients, sync, make ``repeat`` edits.

    Never raises for a slow or broken run: a timeout or a dead process ends the cell
    with ``error`` set and the partial figures kept. Always stops every process.
    """
    procs = client_procs or (1 if clients < 500 else 2)
    procs = max(1, min(procs, clients))
    cell = CellResult(clients, routes, procs)
    context = multiprocessing.get_context("spawn")
    started: list[tuple[Any, Connection]] = []
    try:
        server_conn, child = context.Pipe()
        server = context.Process(
            target=_server_main, args=(child, routes, repeat), name="xds-bench-server", daemon=True
        )
        server.start()
        child.close()
        started.append((server, server_conn))
        _, port = _recv(server_conn, 60.0, "server start")

        client_conns: list[Connection] = []
        ids = [f"bench-{i}" for i in range(clients)]
        for k in range(procs):
            conn, child = context.Pipe()
            process = context.Process(
                target=_clients_main,
                args=(child, port, ids[k::procs]),
                name=f"xds-bench-clients-{k}",
                daemon=True,
            )
            process.start()
            child.close()
            started.append((process, conn))
            client_conns.append(conn)

        sync_timeout = 30.0 + 0.06 * clients
        reports = _ask_all(client_conns, ("sync", sync_timeout), sync_timeout + 30, "sync")
        cell.synced = sum(r["synced"] for r in reports)
        _count_reconnects(cell, reports)
        if cell.synced < clients:
            raise TimeoutError(f"only {cell.synced}/{clients} clients synced in {sync_timeout}s")
        began = min(r["connecting_at"] for r in reports)
        cell.sync_s = max(r["last_synced_at"] for r in reports) - began
        pid = int(server.pid or 0)
        cell.rss_synced_mb = _proc_kb(pid, "VmRSS") / 1024
        cell.peak_synced_mb = _proc_kb(pid, "VmHWM") / 1024

        for k in range(1, repeat + 1):
            marker = edit_prefix(k).encode()
            _ask_all(client_conns, ("arm", marker), 30.0, "arm")
            before = _ask(server_conn, ("status",), 30.0, "status")
            hwm_reset = _reset_peak_rss(pid)
            cpu_before = _proc_cpu(pid)
            edit_at, apply_s = _ask(server_conn, ("edit", k), 60.0, "edit")
            phase = _ask_all(client_conns, ("wait", timeout), timeout + 30, "convergence")
            cpu = _proc_cpu(pid) - cpu_before
            after = _ask(server_conn, ("status",), 30.0, "status")
            cell.edits.append(
                _edit_result(
                    k,
                    phase,
                    edit_at=edit_at,
                    apply_s=apply_s,
                    status_before=before,
                    status_after=after,
                    cpu=cpu,
                    pid=pid,
                    hwm_reset=hwm_reset,
                )
            )
            _count_reconnects(cell, phase)
    except (TimeoutError, EOFError, OSError, RuntimeError) as exc:
        cell.error = f"{type(exc).__name__}: {exc}"
    finally:
        _stop(started)
    return cell


def _count_reconnects(cell: CellResult, reports: list[dict[str, Any]]) -> None:
    """Totals since the clients started (each report carries its process's totals)."""
    failures: collections.Counter[str] = collections.Counter()
    for report in reports:
        failures.update(report["failures"])
    cell.reconnects = sum(r["reconnects"] for r in reports)
    cell.failures = dict(failures)


def _edit_result(
    edit: int,
    phase: list[dict[str, Any]],
    *,
    edit_at: float,
    apply_s: float,
    status_before: dict[str, Any],
    status_after: dict[str, Any],
    cpu: float,
    pid: int,
    hwm_reset: bool,
) -> EditResult:
    clients = sum(len(r["converged_at"]) for r in phase)
    converged = sum(r["converged"] for r in phase)
    rds = [t for r in phase for t in r["converged_at"] if t is not None]
    acks = [t for r in phase for t in r["last_new_ack"] if t is not None]
    done = converged == clients
    responses = None
    if status_before["responses"] is not None and status_after["responses"] is not None:
        responses = status_after["responses"] - status_before["responses"]
    return EditResult(
        edit=edit,
        apply_s=apply_s,
        converged=converged,
        converge_s=max(acks) - edit_at if done and acks else None,
        rds_s=max(rds) - edit_at if done and rds else None,
        responses=responses,
        client_responses=sum(r["responses"] for r in phase),
        server_cpu_s=cpu,
        rss_mb=_proc_kb(pid, "VmRSS") / 1024,
        hwm_mb=_proc_kb(pid, "VmHWM") / 1024,
        hwm_reset=hwm_reset,
        changed=sorted({t for r in phase for t in r["changed"]}),
        reconnects=sum(r["phase_reconnects"] for r in phase),
        rds_before=[v for r in phase for v in r["rds_before"]],
        rds_acked=[v for r in phase for v in r["rds_acked"]],
    )


def _recv(conn: Connection, timeout: float, what: str) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"no answer for {what} within {timeout:.0f}s")
    try:
        return conn.recv()
    except EOFError:
        raise RuntimeError(f"a bench process exited during {what}") from None


def _ask(conn: Connection, command: tuple[Any, ...], timeout: float, what: str) -> Any:
    conn.send(command)
    return _recv(conn, timeout, what)


def _ask_all(
    conns: list[Connection], command: tuple[Any, ...], timeout: float, what: str
) -> list[Any]:
    for conn in conns:
        conn.send(command)
    deadline = time.monotonic() + timeout
    return [_recv(c, max(0.0, deadline - time.monotonic()), what) for c in conns]


def _stop(started: list[tuple[Any, Connection]]) -> None:
    """Clients first (so they do not reconnect to a stopping server), then the server."""
    for process, conn in reversed(started):
        with contextlib.suppress(OSError):
            conn.send(("stop",))
        process.join(15)
        if process.is_alive():
            process.terminate()
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
        conn.close()


def _proc_kb(pid: int, name: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {name}")


def _reset_peak_rss(pid: int) -> bool:
    """Reset ``pid``'s VmHWM to its current RSS (Linux ≥ 4.0); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (``/proc/<pid>/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- report ---------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part.strip()]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


_HEADER = (
    f"{'clients':>7} {'routes':>6} {'edit':>4} {'sync s':>7} {'apply ms':>8} "
    f"{'converge s':>10} {'ms/client':>9} {'responses':>9} {'srv CPU s':>9} "
    f"{'peak sync':>9} {'peak edit':>9} {'RSS after':>9} {'recon':>5}"
)


def print_row(cell: CellResult, edit: EditResult | None) -> None:
    """One table row per edit; a cell that failed gets one row ending with its error."""
    lead = (
        f"{cell.clients:>7} {cell.routes:>6} {edit.edit if edit else '-':>4} "
        f"{_fmt(cell.sync_s, '.2f'):>7}"
    )
    if edit is None:
        dashes = " ".join(f"{'-':>{w}}" for w in (8, 10, 9, 9, 9))
        peak = _fmt(cell.peak_synced_mb or None, ".1f")
        print(f"{lead} {dashes} {peak:>9} {'-':>9} {'-':>9} {cell.reconnects:>5}  {cell.error}")
        return
    converge = "timeout" if edit.converge_s is None else f"{edit.converge_s:.3f}"
    per_client = None if edit.converge_s is None else 1e3 * edit.converge_s / cell.clients
    responses = edit.responses if edit.responses is not None else edit.client_responses
    mark = "" if edit.responses is not None else "*"
    peak_mark = "" if edit.hwm_reset else "+"
    note = f"  {edit.converged}/{cell.clients} converged" if edit.converge_s is None else ""
    print(
        f"{lead} {1e3 * edit.apply_s:>8.1f} {converge:>10} {_fmt(per_client, '.3f'):>9} "
        f"{str(responses) + mark:>9} {edit.server_cpu_s:>9.2f} {cell.peak_synced_mb:>9.1f} "
        f"{f'{edit.hwm_mb:.1f}{peak_mark}':>9} {edit.rss_mb:>9.1f} {cell.reconnects:>5}{note}",
        flush=True,
    )


def print_targets(cells: list[CellResult]) -> None:
    """The issue's targets at 1,000 clients, PASS/MISS per target (worst edit counts)."""
    at_target = [c for c in cells if c.clients == TARGET_CLIENTS]
    if not at_target:
        print(f"targets (at {TARGET_CLIENTS:,} clients): not measured (add it to --clients)")
        return
    for cell in at_target:
        times = [e.converge_s for e in cell.edits]
        if not times or cell.error or None in times:
            converge = "MISS (did not converge)"
        else:
            worst = max(t for t in times if t is not None)
            converge = f"{worst:.2f} s {'PASS' if worst < TARGET_CONVERGE_S else 'MISS'}"
        peaks = [cell.peak_synced_mb] + [e.hwm_mb for e in cell.edits]
        if not cell.peak_synced_mb:
            rss = "not measured"
        else:
            rss = f"{max(peaks):.0f} MB {'PASS' if max(peaks) < TARGET_RSS_MB else 'MISS'}"
        print(
            f"targets at {cell.clients:,} clients x {cell.routes:,} routes: "
            f"converge < {TARGET_CONVERGE_S:g} s: {converge}; "
            f"server RSS < {TARGET_RSS_MB:g} MB (peak): {rss}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--clients", type=_int_list, default=[1, 100, 1000])
    parser.add_argument("--routes", type=_int_list, default=[100, 1000])
    parser.add_argument("--repeat", type=int, default=1, help="edits per cell")
    parser.add_argument(
        "--client-procs", type=int, default=0, help="client processes (default: 1, 2 from 500)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to converge")
    args = parser.parse_args(argv)

    print(
        f"# one edit (route 0 re-prefixed) per repeat; {SERVICES} services, 1 gateway; "
        f"server and clients in separate processes; cpus {os.cpu_count()}, "
        f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    print(_HEADER, flush=True)
    cells: list[CellResult] = []
    for routes in args.routes:
        for clients in args.clients:
            cell = measure(
                clients,
                routes,
                repeat=args.repeat,
                client_procs=args.client_procs or None,
                timeout=args.timeout,
            )
            cells.append(cell)
            for edit in cell.edits:
                print_row(cell, edit)
            if cell.error:
                print_row(cell, None)
    print(
        "# server RSS in MB: peak sync = VmHWM from start to all clients synced (connect "
        "storm), peak edit = VmHWM from the edit to quiet, after = VmRSS then; "
        "recon = client reconnects in the cell"
    )
    for cell in cells:
        changed = sorted({t for e in cell.edits for t in e.changed})
        failures = ", ".join(f"{k} {v}" for k, v in sorted(cell.failures.items())) or "none"
        print(
            f"# {cell.clients} x {cell.routes}: {cell.client_procs} client process(es), "
            f"types pushed by the edit: {','.join(changed) or '-'}, "
            f"RSS after sync {cell.rss_synced_mb:.1f} MB, stream failures: {failures}"
        )
    if any(e.responses is None for c in cells for e in c.edits):
        print("# * responses counted by the clients (the server status did not say)")
    if any(not e.hwm_reset for c in cells for e in c.edits):
        print("# + VmHWM could not be reset before the edit: the peak is over the server's life")
    print_targets(cells)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
