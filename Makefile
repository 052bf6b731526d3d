# Two entry points: `make demo` (the whole slimming experiment on built-in data)
# and `make test`. Both create .venv and install netslim into it on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch and torchvision are pinned as a pair that imports together (torchvision's compiled
# ops must match torch's); override both, e.g. TORCH=torch TORCHVISION=torchvision
TORCH       ?= torch==2.14.1
TORCHVISION ?= torchvision==0.29.1

.PHONY: demo test test-fast test-all lint bench clean

$(BIN)/netslim: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)" "$(TORCHVISION)"
	$(BIN)/python -m pip install -q -e ".[dev,zoo,export,yolo]"
	touch $@

demo: $(BIN)/netslim
	$(BIN)/netslim demo --out runs/demo

test: $(BIN)/netslim
	$(BIN)/python -m pytest

# the engine, the CLI basics and the reliability cases, about 1.5 min on 2 cores
test-fast: $(BIN)/netslim
	$(BIN)/python -m pytest -m "not slow"

# everything, every torchvision model size and every Ultralytics YAML included
test-all: $(BIN)/netslim
	$(BIN)/python -m pytest -m ""

lint: $(BIN)/netslim
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache src/*.egg-info
