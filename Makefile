# Two commands for a newcomer: `make demo` and `make test`. Each sets itself up on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: test demo install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Install: torch/torchvision first, pinned to a tested pair, then the project with its test tools;
# re-run only when pyproject.toml changes. uv installs several times faster than pip; it reads no
# pip.conf, so pip's configured index, find-links and constraint are handed to it. pip is the
# fallback where uv cannot install (no wheel for the platform).
# Bytecode: the targets run without PYTHONDONTWRITEBYTECODE, so the first process to import a module
# writes its .pyc and later ones read it, instead of compiling all of site-packages at install
# (.pyc files and __pycache__ are git-ignored and never shipped with a job).
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

# One pytest process: the suite is CPU-bound, so parallel workers do not make it faster.
test: $(STAMP)
	$(BIN)/python -m pytest tests --durations=25

demo: $(STAMP)
	$(BIN)/mae demo

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench.model_step
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.export_memory
	$(BIN)/python -m bench.report_overhead
	$(BIN)/python -m bench.checkpoint_upload

clean:
	rm -rf runs .pytest_cache
