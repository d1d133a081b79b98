"""Rendering an Envoy bootstrap for a meshward node from ``envoy/bootstrap.yaml``.

The template uses :class:`string.Template` placeholders: ``${NODE_ID}``,
``${NODE_CLUSTER}``, ``${ADMIN_ADDRESS}``, ``${ADMIN_PORT}``, ``${XDS_HOST}``,
``${XDS_PORT}`` and ``${API_TYPE}`` (``GRPC`` for State-of-the-World ADS, ``DELTA_GRPC``
for Delta ADS; a template without it keeps whatever it says). String values are escaped
for a YAML double-quoted scalar (the template quotes them), ports are checked integers.
Admin port 0 lets Envoy pick one (read it back with ``envoy --admin-address-path FILE``).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

#: The repository's bootstrap template (``envoy/bootstrap.yaml``).
DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "envoy" / "bootstrap.yaml"


def _quoted_inner(value: str) -> str:
    """``value`` escaped for the inside of a YAML double-quoted scalar (JSON escapes)."""
    return json.dumps(value)[1:-1]


#: The ADS flavours a bootstrap can choose (``ads_config.api_type``).
API_TYPES = ("GRPC", "DELTA_GRPC")


def _port(name: str, value: int) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"{name} must be a port number 0-65535, got {value!r}")
    return str(value)


def render_bootstrap(
    node_id: str,
    node_cluster: str,
    admin_port: int,
    xds_host: str,
    xds_port: int,
    *,
    template: str | Path = DEFAULT_TEMPLATE,
    admin_address: str = "127.0.0.1",
    api_type: str = "GRPC",
) -> str:
    """The bootstrap YAML for one Envoy; ``node_cluster`` is the node group it serves (a
    gateway name, or ``<service>-sidecar`` for a sidecar).

    ``api_type`` is ``GRPC`` (SotW ADS) or ``DELTA_GRPC`` (Delta ADS).
    """
    if not node_cluster:
        raise ValueError("node_cluster must name the gateway (node group) this Envoy serves")
    if api_type not in API_TYPES:
        raise ValueError(f"api_type must be one of {', '.join(API_TYPES)}, got {api_type!r}")
    text = Path(template).read_text(encoding="utf-8")
    return string.Template(text).substitute(
        NODE_ID=_quoted_inner(node_id),
        NODE_CLUSTER=_quoted_inner(node_cluster),
        ADMIN_ADDRESS=_quoted_inner(admin_address),
        ADMIN_PORT=_port("admin_port", admin_port),
        XDS_HOST=_quoted_inner(xds_host),
        XDS_PORT=_port("xds_port", xds_port),
        API_TYPE=api_type,
    )
