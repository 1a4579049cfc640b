"""The example configs: the layout they are written for, and what the dry run reports for them."""

from __future__ import annotations

import importlib.util

import pytest

from megavl.config import data_parallel_size, lm_layers_per_stage, load_config, validate
from megavl.models.param_count import active_language_model_parameters
from megavl.models.param_count import total_parameter_counts as parameter_counts
from megavl.training.step import num_microbatches

from conftest import ROOT

CONFIGS = ROOT / "examples" / "configs"


def _dry_run():
    spec = importlib.util.spec_from_file_location("pretrain_vlm_for_dry_run", ROOT / "pretrain_vlm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dry_run


# world size -> (data parallel, LM layers per stage, microbatches per rank, experts per EP rank),
# from each config's comments: tiny_cpu trains on 1 or 2 processes, tiny_moe_cpu holds 2 of its
# 4 experts on each of 2 processes, moe_8b_a1b is 16 nodes x 8 GPUs with 2 experts per GPU and
# 4 microbatches per rank.
LAYOUTS = {
    "tiny_cpu.yaml": {1: (1, [4], 2, None), 2: (2, [4], 1, None)},
    "tiny_moe_cpu.yaml": {2: (2, [4], 1, 2)},
    "moe_8b_a1b.yaml": {128: (128, [24], 4, 2)},
    "tiny_siglip_cpu.yaml": {1: (1, [4], 2, None), 2: (2, [4], 1, None)},
    "tiny_clip_cpu.yaml": {1: (1, [4], 2, None), 2: (2, [4], 1, None)},
    # The seed recipes on 1 node x 8 GPUs.
    "siq_vl.yaml": {8: (8, [24], 16, None)},
    "smolvlm_like.yaml": {8: (8, [24], 16, None)},
    "llava_1_5_like.yaml": {8: (4, [32], 8, None)},
    "roaya_vl_like.yaml": {8: (8, [28], 16, None)},
    "tiny_smolvlm_cpu.yaml": {1: (1, [4], 2, None), 2: (2, [4], 1, None)},
    "tiny_roaya_cpu.yaml": {1: (1, [4], 2, None), 2: (2, [4], 1, None)},
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_example_config_layout_at_its_world_sizes(name):
    config = load_config(str(CONFIGS / name))
    for world_size, (dp, stages, microbatches, experts_per_rank) in LAYOUTS[name].items():
        validate(config, world_size)
        assert data_parallel_size(config, world_size) == dp, world_size
        assert lm_layers_per_stage(config) == stages, world_size
        assert num_microbatches(config, dp) == microbatches, world_size
        assert microbatches * config.train.micro_batch_size * dp == config.train.global_batch_size
        if experts_per_rank is not None:
            assert config.model.lm.moe.num_experts // config.parallel.expert == experts_per_rank


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_dry_run_prints_the_layout_and_the_counts(name, capsys):
    config = load_config(str(CONFIGS / name))
    world_size = max(LAYOUTS[name])
    dp, stages, _, _ = LAYOUTS[name][world_size]
    _dry_run()(config, world_size)
    out = capsys.readouterr().out
    p = config.parallel
    assert (f"parallel layout: world={world_size} = TP {p.tensor} x PP {p.pipeline} x DP {dp} "
            f"(EP {p.expert}, SP {p.sequence_parallel})") in out
    assert f"LM layers per pipeline stage: {stages}" in out
    counts = parameter_counts(config)
    for component, count in counts.items():
        assert f"parameters {component:>15}: {count:>15,d}" in out
    assert f"parameters {'total':>15}: {sum(counts.values()):>15,d}" in out
    lm = config.model.lm
    active = active_language_model_parameters(config)
    embeddings = lm.vocab_size * lm.hidden_size * (1 if lm.tie_embeddings else 2)
    assert f"LM parameters active per token: {active:,d} ({active - embeddings:,d} without the embeddings)" in out


def _vision_layer(h: int, ffn: int) -> int:
    """A Qwen2.5-VL vision block: RMSNorms, QKV and projection with bias, SwiGLU with bias."""
    return 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * 2 * ffn + 2 * ffn) + (ffn * h + h)


def _lora(rank: int, d_in: int, d_out: int) -> int:
    return rank * d_in + d_out * rank  # A [rank, in], B [out, rank]


def test_production_preset_counts_weight_by_weight():
    """moe_8b_a1b's parameters from its published shapes, weight by weight, not from the count formulas."""
    config = load_config(str(CONFIGS / "moe_8b_a1b.yaml"))
    # Vision: Qwen2.5-VL's 32 blocks of width 1280 (ffn 3420) after a 3x2x14x14 patch embedding.
    vision = 1280 * (3 * 2 * 14 * 14) + 32 * _vision_layer(1280, 3420)
    # Adapter: RMSNorm, then 2x2 merged patches (5120) -> 5120 -> LM width 2048, with bias.
    adapter = 1280 + (5120 * 5120 + 5120) + (5120 * 2048 + 2048)
    # LM: width 2048, 16 heads of 128, 4 KV groups -> QKV out (16 + 2 * 4) * 128 = 3072, with bias.
    h, qkv = 2048, 3072
    attention = 2 * h + (h * qkv + qkv) + h * h + _lora(8, h, qkv) + _lora(8, h, h)
    dense_mlp = 3 * h * 5632 + _lora(32, h, 2 * 5632) + _lora(32, 5632, h)
    expert = 3 * h * 2816 + _lora(32, h, 2 * 2816) + _lora(32, 2816, h)
    moe_mlp = 16 * h + 16 * expert  # router + 16 experts
    embeddings = 2 * 151936 * h  # untied input and output
    language = embeddings + h + 24 * attention + dense_mlp + 23 * moe_mlp  # layer 0 dense, final norm
    assert parameter_counts(config) == {"vision": vision, "adapter": adapter, "language_model": language}
    # Per token: top 2 of the 16 experts in each of the 23 MoE layers.
    assert active_language_model_parameters(config) == language - 23 * (16 - 2) * expert
    # The sizes the config's comments give: ~0.67B vision encoder (with its merger), 277M of
    # expert weights per layer, ~8B in total, ~1.1B active in the LM without the embeddings.
    assert round((vision + adapter) / 1e9, 2) == 0.67
    assert round(16 * 3 * h * 2816 / 1e6) == 277
    assert round((vision + adapter + language) / 1e9) == 8
    assert round((active_language_model_parameters(config) - embeddings) / 1e9, 1) == 1.1


ZAYA1 = ROOT / "examples" / "recipes" / "zaya1"
ZAYA1_STAGES = {
    "1_align.yaml": "stage align: trains adapter; frozen: vision, lm, lm_embeddings, output_layer, vision_lora, "
                    "router; loss on all_text; optimizer Muon + AdamW",
    "2_pretrain.yaml": "stage pretrain: trains vision, adapter, lm, lm_embeddings, output_layer, vision_lora, router; "
                       "frozen: nothing; loss on answers; optimizer Muon + AdamW",
    "3_expand.yaml": "stage expand_embeddings: trains lm_embeddings, output_layer; frozen: vision, adapter, lm, "
                     "vision_lora, router; embedding rows >= 151665 only; loss on answers; optimizer AdamW",
    "4_sft.yaml": "stage sft: trains vision, adapter, lm, lm_embeddings, output_layer, vision_lora, router; "
                  "frozen: nothing; loss on answers; optimizer Muon + AdamW",
}


@pytest.mark.parametrize("name", list(ZAYA1_STAGES))
def test_zaya1_recipe_stage_validates_on_128_gpus_and_says_what_it_trains(name, capsys):
    config = load_config(str(ZAYA1 / name))
    _dry_run()(config, 128)
    out = capsys.readouterr().out
    assert "parallel layout: world=128 = TP 1 x PP 1 x DP 128 (EP 8, SP False)" in out
    assert ZAYA1_STAGES[name] in out.splitlines()


def test_zaya1_recipe_stages_chain_and_follow_the_recipe():
    stages = [load_config(str(ZAYA1 / name)) for name in ZAYA1_STAGES]
    align, pretrain, expand, sft = stages
    assert pretrain.checkpoint.pretrained == align.checkpoint.dir
    assert expand.checkpoint.pretrained.startswith(pretrain.checkpoint.dir)  # its expanded copy
    assert sft.checkpoint.pretrained == expand.checkpoint.dir
    assert sft.data.tokenizer == expand.data.tokenizer != align.data.tokenizer
    assert (align.train.seq_length, align.data.resolution.max_pixels) == (800, 301056)  # 0.3 MP
    schedule = pretrain.data.max_pixels_schedule
    assert (schedule.start_max_pixels, pretrain.data.resolution.max_pixels, schedule.fraction) == (802816, 6300224, 0.35)
    assert pretrain.train.seq_length == 16896
    assert not align.model.lm.vision_lora.enabled and pretrain.model.lm.vision_lora.enabled
    assert all(c.data.add_bos for c in stages)
    assert [c.train.optimizer for c in stages] == ["muon", "muon", "adamw", "muon"]
    # The new tokens' rows follow Qwen2.5-VL's 151,665 tokens inside the 151,936-row table.
    assert expand.train.embedding_rows_from == 151665 < expand.model.lm.vocab_size


@pytest.mark.parametrize("name,overrides,published", [
    ("siq_vl.yaml", [], 494_032_768),  # Qwen2.5-0.5B
    ("smolvlm_like.yaml", ["model.lm.vocab_size=49152"], 1_711_376_384),  # SmolLM2-1.7B
    ("llava_1_5_like.yaml", ["model.lm.vocab_size=32000"], 6_738_415_616),  # Llama-2-7B / Vicuna-7B v1.5
    ("roaya_vl_like.yaml", [], 1_543_714_304),  # Qwen2.5-1.5B
])
def test_recipe_language_models_have_their_published_parameter_counts(name, overrides, published):
    config = load_config(str(CONFIGS / name), overrides)
    assert parameter_counts(config)["language_model"] == published


def test_the_compression_first_recipe_tower_weight_by_weight():
    """SAM-base's shape over 64 x 64 patches, the 16x compressor, CLIP-L's shape over 16 x 16 tokens."""
    config = load_config(str(CONFIGS / "roaya_vl_like.yaml"))

    def layer(h, ffn):  # LayerNorms, biased QKV / projection / QuickGELU MLP
        return 2 * 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * ffn + ffn) + (ffn * h + h)

    window_stage = (768 * 3 * 16 * 16 + 768) + 64 * 64 * 768 + 12 * layer(768, 3072)
    compressor = 16 * 768 * 1024 + 1024
    global_stage = 16 * 16 * 1024 + 24 * layer(1024, 4096) + 2 * 1024
    counts = parameter_counts(config)
    assert counts["vision"] == window_stage + compressor + global_stage == 403_948_288
    assert counts["adapter"] == (1024 * 1536 + 1536) + (1536 * 1536 + 1536)
    # 1024 px -> 256 tokens, 1280 px -> 400 tokens.
    from megavl.data.resolution import plan_image, vision_token_count

    unit = 16 * 4
    for side, tokens in ((1024, 256), (1280, 400)):
        fixed = load_config(str(CONFIGS / "roaya_vl_like.yaml"), ["data.resolution.mode=fixed",
                                                                  f"data.resolution.fixed_tokens={tokens}"])
        plan = plan_image(side, side, fixed.data.resolution, unit)
        assert plan.canvas == (side, side) and vision_token_count(plan, unit) == tokens
    # The tiny regime: 96 tokens, an 8 x 12 grid.
    tiny = load_config(str(CONFIGS / "roaya_vl_like.yaml"), ["data.resolution.mode=fixed",
                                                             "data.resolution.fixed_tokens=96"])
    assert plan_image(600, 900, tiny.data.resolution, unit).canvas == (512, 768)


def test_recipe_projectors_weight_by_weight():
    siq = parameter_counts(load_config(str(CONFIGS / "siq_vl.yaml")))
    # Pixel shuffle x3 of width 1152 -> Linear(10368 -> 896) with bias -> LayerNorm(896).
    assert siq["adapter"] == 10368 * 896 + 896 + 2 * 896
    smol = parameter_counts(load_config(str(CONFIGS / "smolvlm_like.yaml")))
    assert smol["adapter"] == 10368 * 2048  # Idefics3's connector: one linear, no bias
    llava = parameter_counts(load_config(str(CONFIGS / "llava_1_5_like.yaml")))
    assert llava["adapter"] == (1024 * 4096 + 4096) + (4096 * 4096 + 4096)
    # SigLIP so400m: biased patch embedding, 27 x 27 positions, 27 layers, the post-layernorm.
    layer = 2 * 2 * 1152 + (3 * 1152 * 1152 + 3 * 1152) + (1152 * 1152 + 1152) + (1152 * 4304 + 4304) \
        + (4304 * 1152 + 1152)
    assert siq["vision"] == (1152 * 3 * 14 * 14 + 1152) + 729 * 1152 + 27 * layer + 2 * 1152


@pytest.mark.parametrize("name", ["siq_vl.yaml", "smolvlm_like.yaml", "llava_1_5_like.yaml", "roaya_vl_like.yaml"])
def test_the_seed_recipes_fit_one_node_of_8_h100(name):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--config", str(CONFIGS / name),
                             "--nodes", "1", "--gpus-per-node", "8", "--gpu", "h100"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "FITS" in result.stdout
