# meshward: `make run` starts the local mesh, `make test` runs everything CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint typecheck unit integration check-policy policy-tests install-check bench clean

$(STAMP): pyproject.toml scripts/install.sh
	scripts/install.sh $(VENV) -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/meshward up

# In CI the fresh-install proof runs too (it builds a second venv; ~1 min).
test: install lint typecheck check-policy policy-tests unit integration $(if $(CI),install-check)
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

# Proves a fresh, non-editable `pip install .` works despite the file clashes, and that
# a broken set is detected at start with the repair command.
install-check:
	tests/install/fresh_install.sh

bench: install
	$(PY) bench/authz_bench.py
	$(PY) bench/authz_scaleout_bench.py
	$(PY) bench/xds_bench.py
	$(PY) bench/mtls_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
