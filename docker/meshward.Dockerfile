# The meshward image: the `meshward` CLI in a virtualenv (xDS server, authz, demo
# upstreams, OTLP receiver, bootstrap rendering). The compose file picks the command.
#
#   online:     docker build -f docker/meshward.Dockerfile -t meshward:dev .
#   airgapped:  make images   (local debootstrap base + wheels downloaded on the host)
#
# BASE is any Debian-like image with python3 (>= 3.11) and its venv module.
ARG BASE=python:3.11-slim-bookworm

# The runtime dependencies listed in pyproject.toml: the next stage installs them in a
# layer of its own, rebuilt only when this list changes (not on any pyproject edit).
FROM ${BASE} AS requirements
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' > /requirements.txt

FROM ${BASE} AS build
# Set (PIP_NO_INDEX=1) by docker/build-images.sh when docker/wheelhouse/ holds every
# wheel: the build then needs no network at all.
ARG PIP_NO_INDEX
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_FIND_LINKS=/wheelhouse
COPY docker/wheelhouse/ /wheelhouse/
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN python3 -m venv /opt/meshward && /opt/meshward/bin/pip install --quiet -r /tmp/requirements.txt
COPY pyproject.toml README.md /src/
COPY scripts/install.sh /src/scripts/install.sh
COPY meshward /src/meshward
COPY xds_server /src/xds_server
COPY authz /src/authz
# The project's one install path: installs meshward, then repairs and checks the
# xds-protos / opentelemetry-proto clash (see scripts/install.sh).
RUN cd /src && PYTHON=python3 scripts/install.sh /opt/meshward /src

FROM ${BASE}
COPY --from=build /opt/meshward /opt/meshward
COPY envoy/bootstrap.yaml /etc/meshward/envoy/bootstrap.yaml
COPY docker/render_bootstraps.py /opt/meshward/share/render_bootstraps.py
# An unprivileged user; /state (the xDS server's CA) and /spans (the OTLP receiver's
# spans file) are where the compose file mounts named volumes.
RUN useradd --uid 10001 --user-group --home-dir /state --no-create-home --shell /usr/sbin/nologin meshward \
 && mkdir -p /state /spans /bootstrap \
 && chown meshward:meshward /state /spans /bootstrap \
 && /opt/meshward/bin/meshward --version
ENV PATH=/opt/meshward/bin:$PATH PYTHONUNBUFFERED=1
USER meshward
WORKDIR /state
ENTRYPOINT ["meshward"]
CMD ["--help"]
