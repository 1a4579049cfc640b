# Two entry points, both self-contained on a fresh machine:
#   make test   installs everything into .venv and runs the test suite
#   make demo   installs, then trains the tiny VLM on CPU
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0

.PHONY: setup test test-fast test-te demo recipe-demo eval-lmms clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile tools/install_system_packages.sh
	bash tools/install_system_packages.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_CPU)
	$(PY) -m pip install --quiet -e ".[dev,dali,lmms]"
	# lmms-eval (make eval-lmms) without its declared dependencies: they include torchvision, which
	# has no build beside the CPU torch; what its evaluator imports is the "lmms" extra above.
	$(PY) -m pip install --quiet --no-deps lmms-eval==0.7.3
	# Muon (train.optimizer: muon): emerging-optimizers declares Python >= 3.12 but runs on 3.11
	# once typing.override is provided (megavl/training/muon.py does); its import needs triton.
	$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' && $(PY) -m pip install --quiet -e ".[muon]" || \
		$(PY) -m pip install --quiet --no-deps --ignore-requires-python emerging-optimizers==0.3.0 absl-py==2.5.1 triton==3.9.0
	touch $@

test: setup
	MEGAVL_REQUIRE_DALI=1 $(PY) -m pytest -q --durations=25 --ignore=tests/te

# Transformer Engine's layers built on the CPU against the local ones (state-dict keys, checkpoints
# both ways), in their own environment with the CUDA torch and TE compiled here (~20 min, 6.7 GB
# once). Not part of make test.
VENV_TE ?= .venv-te
$(VENV_TE)/.installed: tools/install_te_cpu.sh
	bash tools/install_te_cpu.sh $(VENV_TE)
	touch $@

test-te: $(VENV_TE)/.installed
	$(VENV_TE)/bin/python -m pytest -q tests/te

# Skips the multi-process torchrun tests; for quick iterations only.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" --ignore=tests/te

DATA := data/synthetic

# The energon index marks data written by the current generator (older copies lack it).
$(DATA)/train/.nv-meta/split.yaml: | setup
	$(PY) tools/make_synthetic_data.py --out $(DATA) --train-samples 4000 --val-samples 200 --seed 0

demo: setup $(DATA)/train/.nv-meta/split.yaml
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node 2 pretrain_vlm.py --config examples/configs/tiny_cpu.yaml

# The ZAYA1-VL recipe in small (examples/recipes/zaya1/ at production scale), each stage from the
# previous one's weights with a fresh optimizer and schedule: align (adapter only, all text),
# pretrain (everything, answers), expand (4 new tokens; only their embedding rows train), sft.
# Muon updates the LM's and adapter's matrices in every stage but the expansion.
RECIPE := runs/recipe-demo
EXPANDED := $(RECIPE)/2_pretrain_expanded
STAGE := OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node 2 pretrain_vlm.py --config examples/configs/tiny_cpu.yaml --set checkpoint.resume=never train.task_eval.interval=null data.add_bos=true data.bos_token="<|endoftext|>"
NEW_TOKENS := "<|ref_start|>" "<|ref_end|>" "<|quad_start|>" "<|quad_end|>"
EXPANSION = $(PY) -c "import json, sys; print(json.load(open('$(EXPANDED)/vocab_expansion.json'))[sys.argv[1]])"
recipe-demo: setup $(DATA)/train/.nv-meta/split.yaml
	rm -rf $(RECIPE)
	$(STAGE) train.stage=align train.optimizer=muon train.steps=30 train.warmup_steps=3 train.lr=3e-3 \
		logging.dir=$(RECIPE)/1_align checkpoint.dir=$(RECIPE)/1_align/checkpoints
	$(STAGE) train.stage=pretrain train.optimizer=muon train.steps=40 train.warmup_steps=4 \
		checkpoint.pretrained=$(RECIPE)/1_align/checkpoints \
		logging.dir=$(RECIPE)/2_pretrain checkpoint.dir=$(RECIPE)/2_pretrain/checkpoints
	$(PY) tools/expand_vocab.py --load $(RECIPE)/2_pretrain/checkpoints --tokenizer $(DATA)/tokenizer \
		--add-tokens $(NEW_TOKENS) --init tokens --out $(EXPANDED)
	$(STAGE) train.stage=expand_embeddings train.embedding_rows_from=$$($(EXPANSION) old_tokenizer_size) \
		model.lm.vocab_size=$$($(EXPANSION) new_vocab_size) \
		data.tokenizer=$(EXPANDED)/tokenizer train.steps=10 train.warmup_steps=1 train.lr=1e-3 \
		checkpoint.pretrained=$(EXPANDED) \
		logging.dir=$(RECIPE)/3_expand checkpoint.dir=$(RECIPE)/3_expand/checkpoints
	$(STAGE) train.stage=sft train.optimizer=muon train.steps=20 train.warmup_steps=2 train.lr=3e-4 train.min_lr=1e-5 \
		model.lm.vocab_size=$$($(EXPANSION) new_vocab_size) \
		data.tokenizer=$(EXPANDED)/tokenizer checkpoint.pretrained=$(RECIPE)/3_expand/checkpoints \
		logging.dir=$(RECIPE)/4_sft checkpoint.dir=$(RECIPE)/4_sft/checkpoints

# The demo's model through the standard tools: exported with its tokenizer, scored by
# tools/evaluate.py (megavl's generation) and by lmms-eval on the exported folder (transformers'
# generation), on the same EVAL_LIMIT validation records; fails if the accuracies differ.
DEMO_RUN := runs/tiny_cpu
EVAL_LIMIT ?= 50
eval-lmms: demo
	rm -rf $(DEMO_RUN)/hf
	$(PY) tools/convert_to_hf.py --load $(DEMO_RUN)/checkpoints --out $(DEMO_RUN)/hf --tokenizer $(DATA)/tokenizer
	$(PY) tools/evaluate.py --load $(DEMO_RUN)/checkpoints --data $(DATA)/val --limit $(EVAL_LIMIT) \
		--out $(DEMO_RUN)/eval_megavl.json
	$(PY) tools/eval_lmms.py --hf $(DEMO_RUN)/hf --data $(DATA)/val --limit $(EVAL_LIMIT) \
		--out $(DEMO_RUN)/eval_lmms.json --compare $(DEMO_RUN)/eval_megavl.json

clean:
	rm -rf $(VENV) $(VENV_TE) *.egg-info

# Puts each curated bug of tools/mutations.py into a temporary copy of the repository and fails
# if the tests meant to catch it pass (12 to 15 minutes on 2 cores). Pass options with
# MUTANTS_ARGS, e.g. make mutants MUTANTS_ARGS="--only loss-per-microbatch --baseline".
.PHONY: mutants
mutants: setup
	$(PY) tools/mutants.py $(MUTANTS_ARGS)
