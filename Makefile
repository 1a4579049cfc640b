# Two entry points, both self-contained on a fresh machine:
#   make test   installs everything into .venv and runs the test suite
#   make demo   installs, then trains the tiny VLM on CPU
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0

.PHONY: setup test test-fast demo recipe-demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py tools/install_system_packages.sh
	bash tools/install_system_packages.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_CPU)
	$(PY) -m pip install --quiet -e ".[dev,dali]"
	touch $@

test: setup
	MEGAVL_REQUIRE_DALI=1 $(PY) -m pytest -q --durations=25

# Skips the multi-process torchrun tests; for quick iterations only.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

DATA := data/synthetic

# The energon index marks data written by the current generator (older copies lack it).
$(DATA)/train/.nv-meta/split.yaml: | setup
	$(PY) tools/make_synthetic_data.py --out $(DATA) --train-samples 4000 --val-samples 200 --seed 0

demo: setup $(DATA)/train/.nv-meta/split.yaml
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node 2 pretrain_vlm.py --config examples/configs/tiny_cpu.yaml

# Three stages chained on the tiny model, each from the previous one's weights (fresh optimizer
# and schedule): align (adapter only, all text), pretrain (everything, answers), sft.
RECIPE := runs/recipe-demo
STAGE := OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node 2 pretrain_vlm.py --config examples/configs/tiny_cpu.yaml --set
recipe-demo: setup $(DATA)/train/.nv-meta/split.yaml
	$(STAGE) train.stage=align train.steps=30 train.warmup_steps=3 train.lr=3e-3 checkpoint.resume=never \
		logging.dir=$(RECIPE)/1_align checkpoint.dir=$(RECIPE)/1_align/checkpoints
	$(STAGE) train.stage=pretrain train.steps=40 train.warmup_steps=4 checkpoint.resume=never \
		checkpoint.pretrained=$(RECIPE)/1_align/checkpoints \
		logging.dir=$(RECIPE)/2_pretrain checkpoint.dir=$(RECIPE)/2_pretrain/checkpoints
	$(STAGE) train.stage=sft train.steps=20 train.warmup_steps=2 train.lr=3e-4 train.min_lr=1e-5 checkpoint.resume=never \
		checkpoint.pretrained=$(RECIPE)/2_pretrain/checkpoints \
		logging.dir=$(RECIPE)/3_sft checkpoint.dir=$(RECIPE)/3_sft/checkpoints

clean:
	rm -rf $(VENV) *.egg-info

# Puts each curated bug of tools/mutations.py into a temporary copy of the repository and fails
# if the tests meant to catch it pass (12 to 15 minutes on 2 cores). Pass options with
# MUTANTS_ARGS, e.g. make mutants MUTANTS_ARGS="--only loss-per-microbatch --baseline".
.PHONY: mutants
mutants: setup
	$(PY) tools/mutants.py $(MUTANTS_ARGS)
