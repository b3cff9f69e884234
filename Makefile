# Two commands for a newcomer: `make demo` and `make test`. Each sets itself up on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: test demo install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch/torchvision first, pinned to the pair that installs from this machine's disk; then the
# project with its test tools. Re-runs only when pyproject.toml changes. uv does in seconds what pip
# takes minutes over (measured here: torch + torchvision 22 s against 80 s, the project 9 s against
# 80 s); it reads no pip.conf, so the package sources and constraints configured for pip (where this
# machine keeps torch's wheels) are handed to it. Without uv (no wheel for the platform), pip.
# Bytecode: these machines set PYTHONDONTWRITEBYTECODE, under which every process compiled what it
# imports again (torch + Ray: 17 s instead of 6). Compiling all 250 MB of site-packages at install
# (uv --compile-bytecode) took 31 s of a 38 s install; instead the targets below run without that
# variable, so the first process to import a module writes its .pyc (11 s once, for what is used)
# and every later one reads it (.pyc files and __pycache__ are git-ignored and never shipped).
unexport PYTHONDONTWRITEBYTECODE
PIPCONF = $(shell $(BIN)/python -m pip config list 2>/dev/null | sed -n "s/^global\.$(1)='\(.*\)'$$/\1/p")
UV      = UV_CONSTRAINT="$(call PIPCONF,constraint)" $(BIN)/uv pip install -q --python $(BIN)/python
TORCH   = torch==2.14.1 torchvision==0.29.1
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q uv || true
	UV_EXTRA_INDEX_URL="$(call PIPCONF,extra-index-url)" UV_FIND_LINKS="$(call PIPCONF,find-links)" \
	  $(UV) $(TORCH) || $(BIN)/pip install -q $(TORCH)
	$(UV) -e '.[dev]' || $(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# One process (two pytest-xdist workers, the shared-cluster tests in one and the rest beside them,
# measured no faster: the machine is CPU-bound, bench/RESULTS.md, tenth session).
test: $(STAMP)
	$(BIN)/python -m pytest tests --durations=25

demo: $(STAMP)
	$(BIN)/mae demo

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python bench/model_step.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/export_memory.py
	$(BIN)/python bench/report_overhead.py
	$(BIN)/python bench/checkpoint_upload.py

clean:
	rm -rf runs .pytest_cache
