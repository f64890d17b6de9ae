# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-all lint clean-venv container-test

$(BIN)/.installed: pyproject.toml docker/install.sh
	$(PYTHON) -m venv $(VENV)
	bash docker/install.sh $(BIN)/python "[test]"
	touch $@

# A 3-subject phantom dataset (seed 7: subjects the shipped model never saw; phantom version 3,
# the one the shipped demonstration model was trained on), then the
# participant level with the shipped default model: 4 samples (mean + uncertainty map), an
# age sweep and a diagnosis sweep (each MRI as CN, MCI and AD). Reports: demo/out/sub-*.html
demo: $(BIN)/.installed
	rm -rf demo
	$(BIN)/dualglow-phantom demo/bids --subjects 3 --seed 7 --phantom-version 3
	DUALGLOW_NO_PROGRESS=1 $(BIN)/dualglow demo/bids demo/out participant -w demo/work \
		--samples 4 --temperature 0.7 --age-sweep 60 70 80 90 --sweep diagnosis=all
	@echo "reports: $$(ls demo/out/sub-*.html | tr '\n' ' ')"

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

# The container smoke test (docs/CONTAINERS.md): builds the image (from a debootstrapped local
# base when no registry is reachable; CPU torch, see SMOKE_TORCH in docker/smoke.sh), then runs
# it offline, read-only, as a random UID. Needs a running Docker daemon; not part of `make test`.
container-test:
	bash docker/smoke.sh
