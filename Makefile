# Two entry points: `make demo` (the main job on the embedded atlas) and `make test`.
# Each creates .venv and installs tokbench into it on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: demo test install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel; a bare `torch` would pull the CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# The demo sweep: the embedded atlas is generated on first use; Ray results, the MLflow
# database and the data cache all land under $(DEMO)/, also in a shell that exports a
# cluster's MLFLOW_TRACKING_URI and TOKBENCH_STORAGE_PATH.
demo: $(BIN)/.installed
	mkdir -p $(DEMO)
	cd $(DEMO) && env -u MLFLOW_TRACKING_URI -u TOKBENCH_STORAGE_PATH \
		TOKBENCH_CACHE=$(CURDIR)/$(DEMO)/cache RAY_AUTH_MODE=disabled \
		$(CURDIR)/$(BIN)/tokbench sweep $(CURDIR)/search_spaces/demo.yaml

# The report page's tests run in Debian's headless chromium, the PostgreSQL-backed cluster
# test on Debian's postgresql; both installed here when missing.
test: $(BIN)/.installed
	bash scripts/install_chromium.sh
	bash scripts/install_postgres.sh
	$(BIN)/python -m pytest

clean:
	rm -rf $(DEMO) .pytest_cache
