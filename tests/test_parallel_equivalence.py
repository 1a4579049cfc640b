"""The same model and data give the same losses and gradient norms under every parallel layout.

One process saves its initial weights and trains 3 optimizer steps; each layout
loads those weights (resharding them) and trains the same 3 global batches.
fp32 throughout; dropout is off in the tiny config.
"""

from __future__ import annotations

import pytest

from conftest import NO_TASK_EVAL, TINY_CONFIG, read_json, run_torchrun

pytestmark = pytest.mark.slow

# Small sequences keep each launch to a few seconds; micro-batch 1 x global 4 gives
# 4 microbatches on one process and 2 per rank at DP=2 (PP=2 needs >= 2).
COMMON = ["train.micro_batch_size=1", "train.global_batch_size=4", "train.seq_length=256"]
# (processes, overrides). The MB2 layouts split the same global batch of rows into
# microbatches of two rows (random_batches draws the same rows whatever the micro-batch
# size): a normalisation that depended on the split would change the losses after step 1.
LAYOUTS = {
    "TP2": (2, ["parallel.tensor=2"]),
    "TP2-SP": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true", NO_TASK_EVAL]),
    "PP2": (2, ["parallel.pipeline=2", NO_TASK_EVAL]),
    "DP2": (2, []),
    "MB2": (1, ["train.micro_batch_size=2"]),
    "DP2-MB2": (2, ["train.micro_batch_size=2"]),
}
RTOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    work = tmp_path_factory.mktemp("equivalence")
    out = work / "single.json"
    run_torchrun(1, "train_layout.py", [
        "--config", str(TINY_CONFIG), "--set", *COMMON,
        "--save-init", str(work / "init"), "--out", str(out),
    ])
    return work, read_json(out)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(reference, name):
    work, single = reference
    out = work / f"{name}.json"
    processes, overrides = LAYOUTS[name]
    run_torchrun(processes, "train_layout.py", [
        "--config", str(TINY_CONFIG), "--set", *COMMON, *overrides,
        "--init", str(work / "init"), "--out", str(out),
    ])
    result = read_json(out)
    # answer_tokens is the step's count over all microbatches and ranks: the same global batch.
    assert result["answer_tokens"] == single["answer_tokens"]
    assert len(result["loss"]) == 3
    for key in ("loss", "grad_norm"):
        for step, (got, want) in enumerate(zip(result[key], single[key])):
            assert got == pytest.approx(want, rel=RTOL), f"{name} {key} at step {step}: {got} vs {want}"
