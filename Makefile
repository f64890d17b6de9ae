# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test test-all lint clean-venv

$(BIN)/.installed: pyproject.toml docker/install.sh
	$(PYTHON) -m venv $(VENV)
	bash docker/install.sh $(BIN)/python "[test]"
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest

test-all: $(BIN)/.installed
	$(BIN)/python -m pytest -m "slow or not slow"

lint: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet ruff mypy
	$(BIN)/ruff check dualglow_app tests benchmarks
	$(BIN)/mypy

clean-venv:
	rm -rf $(VENV)
