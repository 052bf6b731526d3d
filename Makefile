# Two entry points: `make demo` (the whole slimming experiment on built-in data)
# and `make test`. Both create .venv and install netslim into it on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of PyTorch keeps the install near 1 GB; override with e.g. TORCH=torch
TORCH  ?= torch==2.13.0

.PHONY: demo test lint bench clean

$(BIN)/netslim: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: $(BIN)/netslim
	$(BIN)/netslim demo --out runs/demo

test: $(BIN)/netslim
	$(BIN)/python -m pytest

lint: $(BIN)/netslim
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache src/*.egg-info
