# Two set-up commands, both working on a fresh clone with nothing but Python 3.11:
#   make train   - train the embedded default on CPU
#   make test    - run the test suite
PYTHON ?= python3.11
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test test-fast lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve pulls a multi-GB CUDA build (override with TORCH=...)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/sft-train $(ARGS)

test: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q -n 2 --dist loadgroup $(ARGS)

test-fast: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check sft tests scripts
	$(BIN)/ruff format --check sft tests scripts

format: $(STAMP)
	$(BIN)/ruff format sft tests scripts
	$(BIN)/ruff check --fix sft tests scripts

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis
