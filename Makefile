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

$(VENV)/.installed: setup.py tools/install_system_packages.sh
	bash tools/install_system_packages.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_CPU)
	$(PY) -m pip install --quiet -e ".[dev,dali]"
	touch $@

test: setup
	MEGAVL_REQUIRE_DALI=1 $(PY) -m pytest -q

# Skips the multi-process torchrun tests; for quick iterations only.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

DATA := data/synthetic

# The energon index marks data written by the current generator (older copies lack it).
$(DATA)/train/.nv-meta/split.yaml: | setup
	$(PY) tools/make_synthetic_data.py --out $(DATA) --train-samples 4000 --val-samples 200 --seed 0

demo: setup $(DATA)/train/.nv-meta/split.yaml
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node 2 pretrain_vlm.py --config examples/configs/tiny_cpu.yaml

clean:
	rm -rf $(VENV) *.egg-info
