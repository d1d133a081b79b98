"""Render the Envoy bootstraps of the compose mesh (the one-shot ``envoy-bootstrap`` service).

usage: python render_bootstraps.py --out DIR --xds HOST:PORT
           [--gateway-port LISTEN_PORT=TARGET_HOST:TARGET_PORT@ADMIN_PORT] GROUP=ADMIN_PORT ...

For each ``GROUP=ADMIN_PORT`` it writes ``DIR/GROUP.yaml``, rendered by
:func:`xds_server.bootstrap.render_bootstrap` from ``envoy/bootstrap.yaml`` (node
cluster = the node group, e.g. ``edge`` or ``orders-sidecar``; admin on 127.0.0.1), the
same rendering ``meshward up`` does; everything else reaches that Envoy over xDS.

With ``--gateway-port`` it also writes ``DIR/gateway-port.yaml``: a static Envoy TCP
proxy from ``0.0.0.0:LISTEN_PORT`` to the gateway listener. Docker publishes a port to
the network namespace's outside interface, while the demo policy's gateway listens on
127.0.0.1 (so the same ``policies/`` serves ``meshward up`` and compose); TLS passes
through it untouched, end to end between the client and the gateway Envoy.

Files are written atomically, mode 0644 (Envoy may run as another user).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from xds_server.bootstrap import render_bootstrap

DEFAULT_TEMPLATE = Path("/etc/meshward/envoy/bootstrap.yaml")

TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
CONNECTIONS_TYPE = (
    "type.googleapis.com/envoy.extensions.resource_monitors."
    "downstream_connections.v3.DownstreamConnectionsConfig"
)
GATEWAY_PORT_BOOTSTRAP = """\
# Static TCP forwarder: the published port -> the gateway Envoy's listener (TLS passes
# through). Written by docker/render_bootstraps.py; not configured over xDS.
node: {{id: "gateway-port", cluster: "gateway-port"}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
static_resources:
  listeners:
    - name: gateway_port
      address: {{socket_address: {{address: 0.0.0.0, port_value: {listen_port}}}}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.tcp_proxy
              typed_config:
                "@type": {tcp_proxy_type}
                stat_prefix: gateway_port
                cluster: gateway
  clusters:
    - name: gateway
      type: STATIC
      connect_timeout: 2s
      load_assignment:
        cluster_name: gateway
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {{address: {target_host}, port_value: {target_port}}}
overload_manager:
  resource_monitors:
    - name: envoy.resource_monitors.global_downstream_max_connections
      typed_config:
        "@type": {connections_type}
        max_active_downstream_connections: 50000
"""


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: give HOST:PORT")
    return host.strip("[]"), int(port)


def _group(text: str) -> tuple[str, int]:
    group, sep, port = text.partition("=")
    if not sep or not group or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: give GROUP=ADMIN_PORT")
    return group, int(port)


def _gateway_port(text: str) -> tuple[int, str, int, int]:
    listen, sep, rest = text.partition("=")
    target, at, admin = rest.rpartition("@")
    if not sep or not at or not listen.isdigit() or not admin.isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r}: give LISTEN_PORT=TARGET_HOST:TARGET_PORT@ADMIN_PORT"
        )
    host, port = _host_port(target)
    return int(listen), host, port, int(admin)


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--xds", type=_host_port, required=True, metavar="HOST:PORT")
    parser.add_argument("--template", type=Path, default=DEFAULT_TEMPLATE)
    parser.add_argument(
        "--gateway-port",
        type=_gateway_port,
        metavar="LISTEN_PORT=TARGET_HOST:TARGET_PORT@ADMIN_PORT",
        help="also write gateway-port.yaml, a TCP forwarder to the gateway listener",
    )
    parser.add_argument("groups", nargs="+", type=_group, metavar="GROUP=ADMIN_PORT")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    xds_host, xds_port = args.xds
    for group, admin_port in args.groups:
        path = args.out / f"{group}.yaml"
        _write(
            path,
            render_bootstrap(
                node_id=f"{group}-1",
                node_cluster=group,
                admin_port=admin_port,
                xds_host=xds_host,
                xds_port=xds_port,
                template=args.template,
            ),
        )
        print(f"wrote {path} (node group {group}, admin 127.0.0.1:{admin_port})")
    if args.gateway_port is not None:
        listen_port, target_host, target_port, admin_port = args.gateway_port
        path = args.out / "gateway-port.yaml"
        _write(
            path,
            GATEWAY_PORT_BOOTSTRAP.format(
                admin_port=admin_port,
                listen_port=listen_port,
                target_host=json.dumps(target_host),
                target_port=target_port,
                tcp_proxy_type=TCP_PROXY_TYPE,
                connections_type=CONNECTIONS_TYPE,
            ),
        )
        print(f"wrote {path} (0.0.0.0:{listen_port} -> {target_host}:{target_port})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
