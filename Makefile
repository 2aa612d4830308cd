# Set-up, demo and tests. Versions are pinned in constraints.txt; ranges live in pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := build/demo-bundle

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/parscale-export convert fixtures/tiny-parscale -o $(DEMO) --force
	$(BIN)/parscale-export validate $(DEMO)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q -p no:cacheprovider

clean:
	rm -rf build .pytest_cache .ruff_cache
