# From a fresh clone, two commands (README "Quick start"); each does all the set-up it needs and can be
# run again at any time (it only rebuilds what changed):
#
#   make demo   environment, torch, the lasnn extension, then `lasnn demo` on MNIST-1D (built in)
#   make test   the same set-up, then ruff, the test suite and the Triton kernels under the interpreter
#
# Set-up: a virtual environment in $(VENV) with torch, then lasnn installed editable without build
# isolation (the extension builds against that torch; its CUDA kernels too where nvcc and a CUDA build of
# torch are present). It is redone when setup.py, pyproject.toml or a kernel source changes.
# `make data` installs the Fashion-MNIST Debian package when apt-get can (its tests skip without it).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
MAX_JOBS ?= 2
DEMO_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.lasnn-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu)

.PHONY: demo test install data

demo: $(STAMP)
	$(BIN)/lasnn demo --out runs/demo-$$(date +%Y%m%d-%H%M%S) $(DEMO_ARGS)

test: $(STAMP) data
	$(BIN)/ruff check .
	$(BIN)/pytest
	TRITON_INTERPRET=1 $(BIN)/pytest -m triton

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet ninja setuptools wheel
	MAX_JOBS=$(MAX_JOBS) $(BIN)/python -m pip install --quiet --no-build-isolation -e ".[test,bench]"
	$(BIN)/lasnn info
	touch $@

# Best effort: without root, sudo or apt-get the Fashion-MNIST tests skip and say why.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "make data: no apt-get; Fashion-MNIST tests will skip"; exit 0; fi; \
	SUDO=""; if [ "$$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi; \
	($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	  || echo "make data: could not install dataset-fashion-mnist; Fashion-MNIST tests will skip"
