# Set-up, demo and tests. Versions are pinned in constraints.txt; ranges live in pyproject.toml.
PYTHON ?= python3
VENV   := .venv
GENAI  := .venv-genai
OLDORT := .venv-ort-old
BIN    := $(VENV)/bin
DEMO   := build/demo-bundle

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed $(GENAI)/.installed $(OLDORT)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,serve]'
	touch $@

# onnxruntime-genai ships its own onnxruntime: it gets a virtual environment of its own.
$(GENAI)/.installed: constraints-genai.txt
	$(PYTHON) -m venv $(GENAI)
	$(GENAI)/bin/pip install --quiet --disable-pip-version-check -c constraints-genai.txt onnxruntime-genai numpy
	touch $@

# The oldest onnxruntime that runs `convert --opset 18` bundles, checked by tests/test_client_ort_old.py.
$(OLDORT)/.installed: constraints-ort-old.txt
	$(PYTHON) -m venv $(OLDORT)
	$(OLDORT)/bin/pip install --quiet --disable-pip-version-check -c constraints-ort-old.txt onnxruntime numpy
	touch $@

# The demo model was trained on Python's own standard library (fixtures/tiny-python-p4/README.md),
# so it continues code. tests/test_demo.py reads the generate line below.
demo: setup
	$(BIN)/parscale-export convert fixtures/tiny-python-p4 -o $(DEMO) --force
	$(BIN)/parscale-export validate $(DEMO)
	$(BIN)/parscale-export generate $(DEMO) --prompt "def " --max-new-tokens 48

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	PARSCALE_GENAI_PYTHON=$(abspath $(GENAI))/bin/python PARSCALE_OLD_ORT_PYTHON=$(abspath $(OLDORT))/bin/python \
		$(BIN)/pytest -q -p no:cacheprovider

clean:
	rm -rf build .pytest_cache .ruff_cache

# The GPU machine's Python: its versions (constraints-gpu-image.txt) and nothing of this project
# installed. `make gpu-dryrun` runs scripts/gpu_check.sh there on the CPU, as the GPU machine runs
# it; OFFICIAL=DIR (a QwenLM/ParScale checkout) adds the official model's comparison.
GPUIMAGE   := .venv-gpu-image
GPU_PYTHON ?= $(firstword $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c '' 2>/dev/null && echo $$p; done) python3.12)

.PHONY: gpu-dryrun
gpu-dryrun: $(GPUIMAGE)/.installed
	PROVIDER=cpu PYTHON=$(GPUIMAGE)/bin/python OFFICIAL="$(OFFICIAL)" bash scripts/gpu_check.sh

$(GPUIMAGE)/.installed: constraints-gpu-image.txt
	$(GPU_PYTHON) -m venv $(GPUIMAGE)
	$(GPUIMAGE)/bin/pip install --quiet --disable-pip-version-check -r constraints-gpu-image.txt
	$(GPUIMAGE)/bin/pip check
	touch $@
