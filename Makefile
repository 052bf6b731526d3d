# Two entry points: `make demo` (the whole slimming experiment on built-in data)
# and `make test`. Both create .venv and install netslim into it on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch and torchvision are pinned as a pair that imports together (torchvision's compiled
# ops must match torch's); override both, e.g. TORCH=torch TORCHVISION=torchvision
TORCH       ?= torch==2.14.1
TORCHVISION ?= torchvision==0.29.1

.PHONY: demo test test-fast test-all test-ultralytics-latest lint bench clean

$(BIN)/netslim: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)" "$(TORCHVISION)"
	$(BIN)/python -m pip install -q -e ".[dev,zoo,export,openvino,yolo]"
	touch $@

demo: $(BIN)/netslim
	$(BIN)/netslim demo --out runs/demo

test: $(BIN)/netslim
	$(BIN)/python -m pytest

# the engine, the CLI basics and the reliability cases, about 3 min on 2 cores
test-fast: $(BIN)/netslim
	$(BIN)/python -m pytest -m "not slow"

# everything, every torchvision model size and every Ultralytics YAML included
test-all: $(BIN)/netslim
	$(BIN)/python -m pytest -m ""

# the YOLO tests against the newest Ultralytics the package index serves, in a venv of its
# own (.venv-latest, with the same torch pair), whatever pyproject.toml's range allows:
# the check that a new Ultralytics release still meets netslim.yolo.seam
LATEST := .venv-latest
test-ultralytics-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q "$(TORCH)" "$(TORCHVISION)"
	$(LATEST)/bin/python -m pip install -q -e ".[dev,export]"
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy only-if-needed ultralytics
	$(LATEST)/bin/python -c "import ultralytics; print('Ultralytics', ultralytics.__version__)"
	$(LATEST)/bin/python -m pytest tests/test_yolo.py tests/test_yolo_seam.py \
		tests/test_yolo_resume_pruned.py tests/test_reliability_yolo.py \
		tests/test_reliability_yolo_settings.py

lint: $(BIN)/netslim
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache .ruff_cache src/*.egg-info
