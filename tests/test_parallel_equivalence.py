"""The same model and data give the same losses and gradient norms under every parallel layout.

One process saves its initial weights and trains 3 optimizer steps; each layout
loads those weights (resharding them) and trains the same 3 global batches.
fp32 throughout; dropout is off in the tiny config.
"""

from __future__ import annotations

import pytest

from conftest import NO_TASK_EVAL, ROOT, TINY_CONFIG, read_json, run_torchrun

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
    # Activation recompute of every LM and vision layer (megavl/models/recompute.py) under the
    # layouts that split a layer (TP with SP) or stage the layers (PP).
    "TP2-SP-recompute": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true", NO_TASK_EVAL,
                             "perf.recompute_lm=full", "perf.recompute_vision=full"]),
    "PP2-recompute": (2, ["parallel.pipeline=2", NO_TASK_EVAL, "perf.recompute_lm=full",
                          "perf.recompute_lm_layers=1", "perf.recompute_vision=full"]),
}
RTOL = 1e-5
# The other vision towers and projectors (SigLIP + pixel shuffle with sequential 1-D positions,
# CLIP with its class token + LLaVA's MLP) under the layouts that split them differently:
# (config, overrides, layouts).
CONFIGS = ROOT / "examples" / "configs"
TOWER_LAYOUTS = ("TP2", "PP2", "DP2")
TOWERS = {
    "siglip": (CONFIGS / "tiny_siglip_cpu.yaml", [], TOWER_LAYOUTS),
    "clip": (CONFIGS / "tiny_clip_cpu.yaml", [], TOWER_LAYOUTS),
    # compression_first: window stage, compressor, global stage (a TP-split compressor and layers of
    # two widths).
    "compression-first": (CONFIGS / "tiny_roaya_cpu.yaml", [], TOWER_LAYOUTS),
    # LM heads wider than hidden_size / num_attention_heads (Qwen3's layout: 4 heads of 48 on a
    # width of 128) and Llama 3's RoPE scaling, under the layouts that split or stage the attention.
    "lm-variants": (CONFIGS / "tiny_clip_cpu.yaml", ["model.lm.head_dim=48", "model.lm.qk_layernorm=true",
                                                     "model.lm.rope_scaling_factor=8"], ("TP2", "PP2")),
    # Qwen3-VL's LM details: interleaved multimodal RoPE, q/k norms and no q/k/v bias.
    "qwen3-vl-lm": (TINY_CONFIG, ["model.lm.mrope_layout=interleaved", "model.lm.mrope_section=[6,5,5]",
                                  "model.lm.qk_layernorm=true", "model.lm.qkv_bias=false"], ("TP2", "PP2")),
}
TOWER_CASES = [(tower, name) for tower, (_, _, layouts) in TOWERS.items() for name in layouts]
# The gradient norm megatron reduces in fp32 from per-shard norms differs between layouts by up
# to ~1e-5 (tiny_cpu's TP2 already 6e-6 at step 0) while the gradients agree: after the clip,
# every parameter's squared gradient norm under TP2 is the single process's times one common
# factor, to 2e-7. The SigLIP model's larger gradients reach 1.1e-5 by step 3.
TOWER_GRAD_NORM_RTOL = 2e-5


def _single_process(work, config, extra=()) -> dict:
    out = work / "single.json"
    run_torchrun(1, "train_layout.py", [
        "--config", str(config), "--set", *COMMON, *extra,
        "--save-init", str(work / "init"), "--out", str(out),
    ])
    return read_json(out)


def _check_layout(work, config, single: dict, name: str, grad_norm_rtol: float = RTOL, extra=()) -> None:
    out = work / f"{name}.json"
    processes, overrides = LAYOUTS[name]
    run_torchrun(processes, "train_layout.py", [
        "--config", str(config), "--set", *COMMON, *extra, *overrides,
        "--init", str(work / "init"), "--out", str(out),
    ])
    result = read_json(out)
    # answer_tokens is the step's count over all microbatches and ranks: the same global batch.
    assert result["answer_tokens"] == single["answer_tokens"]
    assert len(result["loss"]) == 3
    for key in ("loss", "grad_norm"):
        for step, (got, want) in enumerate(zip(result[key], single[key])):
            rtol = grad_norm_rtol if key == "grad_norm" else RTOL
            assert got == pytest.approx(want, rel=rtol), f"{name} {key} at step {step}: {got} vs {want}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    work = tmp_path_factory.mktemp("equivalence")
    return work, _single_process(work, TINY_CONFIG)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(reference, name):
    work, single = reference
    _check_layout(work, TINY_CONFIG, single, name)


@pytest.fixture(scope="module")
def tower_references(tmp_path_factory):
    """The single-process run of each tower's config, made when its first layout needs it."""
    made = {}

    def reference(tower: str):
        if tower not in made:
            work = tmp_path_factory.mktemp(f"equivalence-{tower}")
            config, extra, _ = TOWERS[tower]
            made[tower] = work, _single_process(work, config, extra)
        return made[tower]

    return reference


@pytest.mark.parametrize("tower,name", TOWER_CASES)
def test_tower_layout_matches_single_process(tower_references, tower, name):
    work, single = tower_references(tower)
    config, extra, _ = TOWERS[tower]
    _check_layout(work, config, single, name, grad_norm_rtol=TOWER_GRAD_NORM_RTOL, extra=extra)


# megatron's overlapped gradient reduce and parameter all-gather (asynchronous collectives, which
# gloo runs too), with small buckets so the model spans many, and every microbatch of DP rank 1
# text only: the vision tower's buckets must still be reduced on that rank (models/vlm.py's blank
# image), in the same order as on rank 0, or the step would hang or mix buckets. The overlap pads
# each bucket differently, which moves the distributed optimizer's shard boundaries and so the
# fp32 partial sums of the gradient norm (7e-6 at step 0 here; the step-2 loss is identical).
OVERLAP = ["perf.overlap_grad_reduce=true", "perf.overlap_param_gather=true", "perf.bucket_size=20000"]


def test_overlapped_reduce_with_a_text_only_rank_matches_single_process(tmp_path):
    single = tmp_path / "single.json"
    run_torchrun(1, "train_layout.py", ["--config", str(TINY_CONFIG), "--set", *COMMON, "--text-only-odd",
                                        "--save-init", str(tmp_path / "init"), "--out", str(single)])
    overlapped = tmp_path / "dp2.json"
    run_torchrun(2, "train_layout.py", ["--config", str(TINY_CONFIG), "--set", *COMMON, *OVERLAP,
                                        "--text-only-odd", "--init", str(tmp_path / "init"), "--out", str(overlapped)])
    want, got = read_json(single), read_json(overlapped)
    assert got["answer_tokens"] == want["answer_tokens"]
    # The losses agree to 1e-8. A weight read outside its module's forward is not gathered by the
    # pre-hooks and stays stale on the ranks that do not own its shard: the patch embedding's
    # did, and moved the step-3 loss by 3.5e-6.
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-7)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=TOWER_GRAD_NORM_RTOL)


def test_the_fused_cross_entropy_trains_like_the_unfused_one(tmp_path):
    """perf.cross_entropy_fusion with megatron's own kernel (no Transformer Engine here), in bf16,
    which it needs: the same in one process, and under TP=2 (the vocabulary split) within
    bf16's rounding of the unfused single process."""
    bf16 = [*COMMON, "train.dtype=bf16"]
    runs = {}
    for name, processes, extra in (("unfused", 1, []), ("fused", 1, ["perf.cross_entropy_fusion=true"]),
                                   ("fused-TP2", 2, ["perf.cross_entropy_fusion=true", "parallel.tensor=2"])):
        out = tmp_path / f"{name}.json"
        init = ["--save-init" if name == "unfused" else "--init", str(tmp_path / "init")]
        run_torchrun(processes, "train_layout.py", ["--config", str(TINY_CONFIG), "--set", *bf16, *extra, *init,
                                                    "--out", str(out)])
        runs[name] = read_json(out)
    # The compiled kernel sums the loss in another order (1e-8 here); the gradients are the same.
    assert runs["fused"]["loss"] == pytest.approx(runs["unfused"]["loss"], rel=1e-6)
    assert runs["fused"]["grad_norm"] == pytest.approx(runs["unfused"]["grad_norm"], rel=1e-6)
    assert runs["fused-TP2"]["loss"] == pytest.approx(runs["unfused"]["loss"], rel=1e-4)
    assert runs["fused-TP2"]["grad_norm"] == pytest.approx(runs["unfused"]["grad_norm"], rel=1e-3)
