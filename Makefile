# Two entry points on a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
RUN_ROOT ?= runs
PYTEST_ARGS ?=

.PHONY: install demo test test-fast mlflow-ui clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "aurora needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) pipelines/all.py run.root=$(RUN_ROOT)

# two pytest processes, a test file each at a time (a module's fixtures stay in one process), the long
# files first in the order tests/conftest.py gives
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Serves the demo run's MLflow store on 127.0.0.1 only (RUN=<run name> to pick another run).
RUN ?= tiny
mlflow-ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server \
		--backend-store-uri sqlite:///$(abspath $(RUN_ROOT))/$(RUN)/mlflow.db \
		--default-artifact-root $(abspath $(RUN_ROOT))/$(RUN)/mlartifacts \
		--host 127.0.0.1 --port 5000 --workers 1

clean:
	rm -rf $(RUN_ROOT) .pytest_cache
