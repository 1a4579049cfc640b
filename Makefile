# Two entry points, both self-contained on a fresh machine:
#   make test   installs everything into .venv and runs the test suite
#   make demo   installs, then trains the tiny VLM on CPU
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0

.PHONY: setup test test-fast demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_CPU)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q

# Skips the multi-process torchrun tests; for quick iterations only.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info
