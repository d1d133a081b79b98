# meshward: `make run` starts the local mesh, `make test` runs everything CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint typecheck unit integration check-policy policy-tests install-check bench clean images e2e

$(STAMP): pyproject.toml scripts/install.sh
	scripts/install.sh $(VENV) -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/meshward up

# In CI the fresh-install proof runs too (it builds a second venv; ~1 min).
# The compose e2e suite runs when a Docker engine answers, and always in CI (where a
# missing engine fails the run instead of skipping the suite).
test: install lint typecheck check-policy policy-tests unit integration $(if $(CI),install-check)
	@if [ -n "$(CI)" ] || docker info >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory e2e; \
	else \
	  echo "make test: no Docker engine (docker info failed): the compose e2e suite did not run (make e2e; CI requires it)"; \
	fi
	@echo "make test: all passed"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

check-policy: install
	$(VENV)/bin/meshward token --init
	$(VENV)/bin/meshward check policies

policy-tests: check-policy
	$(VENV)/bin/meshward test policies/tests

unit: install
	$(PY) -m pytest tests/unit -q

integration: install
	$(PY) -m pytest tests/integration -q

# The Docker images meshward:dev and meshward-envoy:dev (docker/build-images.sh).
# Without BASE they build on a local Debian base made with debootstrap (no image registry
# needed; built once, then reused); online: make images BASE=python:3.11-slim-bookworm
images:
	BASE='$(BASE)' docker/build-images.sh

# The docker-compose mesh end to end (tests/e2e): builds the images, `up`, requests
# through the gateway's published port, `down -v` at the end; on a failure the
# containers' logs are saved in .meshward/e2e-logs/.
# With every compose tool present (`docker compose` v2 and `docker-compose` v1), the
# suite runs once with each; CI requires both.
e2e: install
	@set -e; tools=""; \
	if docker compose version >/dev/null 2>&1; then tools="$$tools v2"; fi; \
	if command -v docker-compose >/dev/null 2>&1; then tools="$$tools v1"; fi; \
	if [ -n "$(CI)" ] && [ "$$tools" != " v2 v1" ]; then \
	  echo "make e2e: CI runs the suite with docker compose (v2) and docker-compose (v1); found:$${tools:- none}" >&2; exit 1; \
	fi; \
	if [ -z "$$tools" ]; then $(PY) -m pytest tests/e2e -q; fi; \
	for tool in $$tools; do \
	  echo "== tests/e2e with compose $$tool"; \
	  MESHWARD_COMPOSE=$$tool $(PY) -m pytest tests/e2e -q; \
	done

# Proves a fresh, non-editable `pip install .` works despite the file clashes, and that
# a broken set is detected at start with the repair command.
install-check:
	tests/install/fresh_install.sh

bench: install
	$(PY) bench/authz_bench.py
	$(PY) bench/tracing_bench.py
	$(PY) bench/envoy_bench.py
	$(PY) bench/authz_scaleout_bench.py
	$(PY) bench/xds_bench.py
	$(PY) bench/mtls_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
