"""meshward's xDS control plane: Policy → Envoy resources → ADS (SotW and Delta).

Laid out like go-control-plane: :mod:`xds_server.resources` (type URLs, ``Any``),
:mod:`xds_server.cache` (snapshots per node group, content digests), the stream
protocols — :mod:`xds_server.stream` (what both share: push targets, NACK rollback),
:mod:`xds_server.server` (the ADS server, State of the World) and
:mod:`xds_server.delta` (Delta) — :mod:`xds_server.tracking` (versions, convergence,
metrics per node), :mod:`xds_server.translator` (Policy → protos) and
:mod:`xds_server.service` (all of it wired on one gRPC server).
"""
