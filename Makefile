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

demo: $(BIN)/.installed
	$(BIN)/tokbench data synth --out $(DEMO)/atlas.h5ad
	$(BIN)/tokbench data inspect $(DEMO)/atlas.h5ad --label-key cell_type --split-key tissue
	$(BIN)/tokbench data prepare $(DEMO)/atlas.h5ad --split cross_tissue --split-key tissue \
		--train blood lung gut --test brain --cache-dir $(DEMO)/cache

test: $(BIN)/.installed
	$(BIN)/python -m pytest

clean:
	rm -rf $(DEMO) .pytest_cache
