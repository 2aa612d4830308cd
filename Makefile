# Set-up, demo and tests. Versions are pinned in constraints.txt; ranges live in pyproject.toml.
PYTHON ?= python3
VENV   := .venv
GENAI  := .venv-genai
BIN    := $(VENV)/bin
DEMO   := build/demo-bundle

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed $(GENAI)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,serve]'
	touch $@

# onnxruntime-genai ships its own onnxruntime: it gets a virtual environment of its own.
$(GENAI)/.installed: constraints-genai.txt
	$(PYTHON) -m venv $(GENAI)
	$(GENAI)/bin/pip install --quiet --disable-pip-version-check -c constraints-genai.txt onnxruntime-genai numpy
	touch $@

demo: setup
	$(BIN)/parscale-export convert fixtures/tiny-parscale -o $(DEMO) --force
	$(BIN)/parscale-export validate $(DEMO)
	$(BIN)/parscale-export generate $(DEMO) --prompt "Hello, ParScale" --max-new-tokens 16

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	PARSCALE_GENAI_PYTHON=$(abspath $(GENAI))/bin/python $(BIN)/pytest -q -p no:cacheprovider

clean:
	rm -rf build .pytest_cache .ruff_cache
