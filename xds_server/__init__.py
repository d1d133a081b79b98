"""meshward's xDS control plane: Policy → Envoy resources → ADS (State of the World).

Laid out like go-control-plane: :mod:`xds_server.resources` (type URLs, ``Any``),
:mod:`xds_server.cache` (snapshots per node group), :mod:`xds_server.server` (the ADS
stream protocol), :mod:`xds_server.translator` (Policy → protos) and
:mod:`xds_server.service` (all of it wired on one gRPC server).
"""
