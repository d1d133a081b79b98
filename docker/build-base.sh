#!/usr/bin/env bash
# Build the local base image meshward's Dockerfiles build on when no image registry is
# reachable: a Debian bookworm root made with debootstrap (plus python3, python3-venv,
# ca-certificates), turned into an image with `docker import`.
#
# usage: docker/build-base.sh [IMAGE]        (default IMAGE: meshward-base:bookworm)
#
# Online, skip this: the Dockerfiles default to the public python/debian images.
# Fast when repeated: nothing is done if IMAGE exists, and the root's tarball is cached
# in $MESHWARD_DOCKER_CACHE (default ~/.cache/meshward-docker) for the next import.
# debootstrap is installed with apt-get when missing (as root on Debian/Ubuntu).
set -euo pipefail
image="${1:-meshward-base:bookworm}"
suite="${MESHWARD_BASE_SUITE:-bookworm}"
mirror="${MESHWARD_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
cache="${MESHWARD_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshward-docker}"
tarball="$cache/$suite-python3-rootfs.tar"

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image exists (docker rmi $image to rebuild it)"
  exit 0
fi

if [ ! -s "$tarball" ]; then
  if ! command -v debootstrap >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing debootstrap (apt-get) ..."
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    else
      echo "docker/build-base.sh: debootstrap is missing: run 'apt-get install debootstrap'" \
        "as root, or build on a public base: make images BASE=python:3.11-slim-bookworm" >&2
      exit 1
    fi
  fi
  mkdir -p "$cache"
  root="$(mktemp -d "$cache/rootfs.XXXXXX")"
  trap 'rm -rf "$root"' EXIT
  echo "debootstrap $suite into $root (about a minute) ..."
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$suite" "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 || {
    tail -n 30 "$cache/debootstrap.log" >&2
    echo "docker/build-base.sh: debootstrap failed (full log: $cache/debootstrap.log)" >&2
    exit 1
  }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/*
  tar --numeric-owner -C "$root" -cf "$tarball.part" .
  mv "$tarball.part" "$tarball"
fi

echo "docker import $tarball as $image ..."
docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' \
  "$tarball" "$image" >/dev/null
echo "base image $image built"
