# Two commands for a newcomer: `make demo` and `make test`. Each sets itself up on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: test demo install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch/torchvision first, pinned to the pair that installs from this machine's disk;
# then the project with its test tools. Re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

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
