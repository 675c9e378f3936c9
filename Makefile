# The few commands a developer needs. Every target sets up .venv first (idempotent).
#
# torch: set-up installs $(TORCH_SPEC) before the project. On these machines
# `torch==2.13.0` resolves to a local CPU wheel; on a GPU machine the same pin from PyPI is
# the default CUDA build. Override with e.g. TORCH_SPEC="torch==2.13.0" PIP_INDEX_URL=...
# to choose another build.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast bench lint lerobot-env
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/hindsight demo

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

bench: setup
	$(BIN)/python -m bench

# The real LeRobot in a side environment for the slow tests and bench/lerobot.py
# (tests/lerobot_env/make_env.sh: cached under ~/.cache/hindsight, never touches .venv).
lerobot-env: setup
	PYTHON=$(BIN)/python tests/lerobot_env/make_env.sh

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
