"""FP8 by config: validate's refusals, the precision plan, the start-up platform check, megatron's
TransformerConfig fields and the vision tower's FP8 padding (FP8 GEMMs themselves need a GPU with TE)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megavl.config import ConfigError, load_config, validate
from megavl.models.precision import FP8Hardware, check_fp8_platform, fp8_platform_problems, precision_plan
from megavl.platform.features import Platform, detect

from conftest import ROOT, TINY_CONFIG

MOE_8B = str(ROOT / "examples" / "configs" / "moe_8b_a1b.yaml")
NO_LORA = ["model.lm.vision_lora.mlp_rank=0", "model.lm.vision_lora.attn_rank=0"]
FP8_8B = NO_LORA + ["train.fp8=hybrid"]

NO_GPU = Platform(cuda=False, device_count=0, transformer_engine=False, apex=False, dali=False, flex_attention=True)
GPU_WITH_TE = Platform(cuda=True, device_count=8, transformer_engine=True, apex=True, dali=True, flex_attention=True)
GPU_WITHOUT_TE = Platform(cuda=True, device_count=8, transformer_engine=False, apex=True, dali=True,
                          flex_attention=True)


def _problems(path: str, overrides: list[str], world_size: int = 128) -> str:
    with pytest.raises(ConfigError) as error:
        validate(load_config(path, overrides), world_size)
    return str(error.value)


NEED_16 = "not a multiple of 16 as Transformer Engine's FP8 GEMMs need (train.fp8_recipe = delayed)"


@pytest.mark.parametrize("path, overrides, world_size, fragments", [
    pytest.param(str(TINY_CONFIG), ["train.fp8=hybrid", "model.lm.ffn_hidden_size=352"] + NO_LORA, 1,
                 ["train.fp8 = hybrid: needs train.dtype = bf16 (got fp32); the FP8 GEMMs run beside bf16 weights"],
                 id="fp32"),
    pytest.param(MOE_8B, ["train.fp8=hybrid"], 128,
                 ["train.fp8 = hybrid: needs Transformer Engine layers, but vision LoRA (model.lm.vision_lora.mlp_rank "
                  "= 32, attn_rank = 8) is built on megatron-core's local linears only (vision LoRA on Transformer "
                  "Engine layers is not implemented yet); set model.lm.vision_lora.mlp_rank = attn_rank = 0"],
                 id="vision-lora"),
    pytest.param(MOE_8B, FP8_8B + ["model.layer_backend=local"], 128,
                 ["train.fp8 = hybrid: needs Transformer Engine layers, and model.layer_backend = local builds "
                  "megatron-core's local linears, which have no FP8 path; use auto or te"],
                 id="local-layers"),
    pytest.param(MOE_8B, FP8_8B + ["model.lm.ffn_hidden_size=5640"], 128,
                 [f"train.fp8 = hybrid: model.lm.ffn_hidden_size = 5640 makes the input of the dense MLP's linear_fc2 "
                  f"5640 wide, {NEED_16}; make it a multiple of 16"],
                 id="lm-ffn"),
    pytest.param(MOE_8B, FP8_8B + ["train.fp8_vision=true"], 128,
                 [f"train.fp8_vision = true: model.vision.ffn_hidden_size = 3420 makes the input of the vision MLP's "
                  f"linear_fc2 3420 wide, {NEED_16}; keep the tower in bf16 (train.fp8_vision = false)"],
                 id="qwen2.5-vl-vision-mlp"),
    pytest.param(MOE_8B, FP8_8B + ["parallel.expert_tensor=2", "model.lm.moe.ffn_hidden_size=2832"], 128,
                 ["train.fp8 = hybrid: model.lm.moe.ffn_hidden_size = 2832 makes the input of each expert's "
                  f"linear_fc2 1416 wide per tensor-parallel rank (2832 / 2), {NEED_16}; make it a multiple of 32"],
                 id="expert-shard"),
    pytest.param(MOE_8B, FP8_8B + ["train.fp8_recipe=mxfp8", "model.lm.moe.ffn_hidden_size=2832"], 128,
                 ["train.fp8 = hybrid: model.lm.moe.ffn_hidden_size = 2832 makes the input of each expert's linear_fc2 "
                  "2832 wide, not a multiple of 32 as Transformer Engine's FP8 GEMMs need (train.fp8_recipe = mxfp8)"],
                 id="mxfp8-blocks-of-32"),
    pytest.param(MOE_8B, FP8_8B + ["train.seq_length=8200"], 128,
                 [f"train.fp8 = hybrid: train.seq_length * train.micro_batch_size = 8200*1 gives the LM's GEMMs "
                  f"8200 tokens, {NEED_16}; make train.seq_length a multiple of 16"],
                 id="tokens"),
    pytest.param(MOE_8B, FP8_8B + ["train.fp8_amax_history_len=0", "train.fp8_margin=-1"], 128,
                 ["train.fp8_amax_history_len = 0: must be >= 1", "train.fp8_margin = -1: must be >= 0"],
                 id="amax-settings"),
    pytest.param(MOE_8B, NO_LORA + ["train.fp8_vision=true"], 128,
                 ["train.fp8_vision = true: needs train.fp8 (e4m3 or hybrid)"],
                 id="vision-without-fp8"),
    pytest.param(MOE_8B, ["train.fp8=fp16", "train.fp8_recipe=nvfp4"], 128,
                 ["train.fp8 = 'fp16': must be one of e4m3, hybrid (or null)",
                  "train.fp8_recipe = 'nvfp4': must be one of delayed, tensorwise, blockwise, mxfp8"],
                 id="choices"),
])
def test_fp8_is_refused_naming_the_field_and_the_fix(path, overrides, world_size, fragments):
    message = _problems(path, overrides, world_size)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_every_fp8_problem_is_reported_at_once():
    message = _problems(MOE_8B, ["train.fp8=e4m3", "train.dtype=fp32", "model.layer_backend=local",
                                 "model.lm.ffn_hidden_size=5640"])
    assert "(4 problems)" in message
    for fragment in ("needs train.dtype = bf16", "model.layer_backend = local builds", "but vision LoRA",
                     "model.lm.ffn_hidden_size = 5640"):
        assert fragment in message


def test_the_same_widths_pass_where_the_recipe_allows_them():
    # 2832 = 16 * 177: whole for delayed scaling, not for MXFP8's 32-element blocks (previous test).
    validate(load_config(MOE_8B, FP8_8B + ["model.lm.moe.ffn_hidden_size=2832"]), 128)
    # The Qwen2.5-VL tower stays in bf16 by default, so its MLP width does not matter then.
    validate(load_config(MOE_8B, FP8_8B), 128)


PLAN_8B = ("precision: vision tower bf16 (train.fp8_vision = false) | adapter bf16 | "
           "LM linears fp8 hybrid (delayed, amax history 1024, max) | experts fp8 hybrid (delayed, amax history 1024, "
           "max) | attention, norms, embeddings, output layer bf16 | router fp32 | main grads fp32")


def _dry_run():
    spec = importlib.util.spec_from_file_location("pretrain_vlm_for_fp8", ROOT / "pretrain_vlm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dry_run


def test_fp8_production_config_validates_on_128_gpus_and_the_dry_run_prints_its_plan(capsys):
    config = load_config(MOE_8B, FP8_8B)
    _dry_run()(config, 128)
    lines = capsys.readouterr().out.splitlines()
    assert PLAN_8B in lines
    # The dry run says what this machine lacks without failing.
    problems = fp8_platform_problems(config)
    if problems:
        assert "on this machine: " + "; ".join(problems) in lines
    if not detect().transformer_engine:
        assert any(line.startswith("on this machine: train.fp8 = hybrid: needs Transformer Engine") for line in lines)


@pytest.mark.parametrize("path, overrides, plan", [
    (MOE_8B, FP8_8B, PLAN_8B),
    (MOE_8B, [], "precision: everything bf16 (router fp32), main grads fp32"),
    (str(TINY_CONFIG), [], "precision: everything fp32"),
    (str(TINY_CONFIG), ["train.dtype=bf16"], "precision: everything bf16, main grads fp32"),
    (MOE_8B, FP8_8B + ["train.fp8=e4m3", "train.fp8_recipe=tensorwise", "train.fp8_vision=true",
                       "model.vision.ffn_hidden_size=3424"],
     "precision: vision tower fp8 e4m3 (tensorwise) | adapter bf16 | LM linears fp8 e4m3 (tensorwise) | "
     "experts fp8 e4m3 (tensorwise) | attention, norms, embeddings, output layer bf16 | router fp32 | main grads fp32"),
    (str(TINY_CONFIG), NO_LORA + ["train.dtype=bf16", "train.fp8=hybrid", "model.lm.ffn_hidden_size=352",
                                  "train.fp8_amax_history_len=16", "train.fp8_amax_compute_algo=most_recent",
                                  "train.fp8_margin=1"],
     "precision: vision tower bf16 (train.fp8_vision = false) | adapter bf16 | LM linears fp8 hybrid (delayed, "
     "amax history 16, most_recent, margin 1) | attention, norms, embeddings, output layer bf16 | main grads fp32"),
], ids=["moe-fp8", "moe-bf16", "tiny-fp32", "tiny-bf16", "fp8-vision-tensorwise", "dense-fp8-delayed-settings"])
def test_precision_plan_names_each_components_precision(path, overrides, plan):
    config = load_config(path, overrides)
    validate(config, 128 if path == MOE_8B else 1)
    assert precision_plan(config) == plan


def _recipe(recipe: str):
    return load_config(MOE_8B, FP8_8B + [f"train.fp8_recipe={recipe}"])


def test_platform_without_transformer_engine_or_a_gpu():
    config = _recipe("delayed")
    assert fp8_platform_problems(config, NO_GPU) == [
        "train.fp8 = hybrid: needs Transformer Engine, which is not installed (or not usable) here "
        "(pip install transformer-engine[pytorch])",
        "train.fp8 = hybrid: needs a CUDA GPU, and this process has none",
    ]
    assert fp8_platform_problems(config, GPU_WITHOUT_TE, FP8Hardware((9, 0), "12.9", None)) == [
        "train.fp8 = hybrid: needs Transformer Engine, which is not installed (or not usable) here "
        "(pip install transformer-engine[pytorch])",
    ]
    # Without train.fp8 nothing about the machine matters.
    assert fp8_platform_problems(load_config(MOE_8B), NO_GPU) == []


@pytest.mark.parametrize("recipe, capability, refused", [
    ("delayed", (8, 0), "FP8 GEMMs need compute capability 8.9 or higher (Ada, Hopper or newer); this GPU has 8.0; "
                        "leave train.fp8 unset"),
    ("delayed", (8, 9), None),
    ("delayed", (9, 0), None),
    ("tensorwise", (10, 0), None),
    ("blockwise", (8, 9), "FP8 block-scaled GEMMs need compute capability 9.0 or higher (Hopper or newer); this GPU "
                          "has 8.9; use train.fp8_recipe = delayed or tensorwise"),
    ("blockwise", (9, 0), None),
    ("mxfp8", (9, 0), "MXFP8 GEMMs need compute capability 10.0 or higher (Blackwell); this GPU has 9.0; use "
                      "train.fp8_recipe = delayed, tensorwise or blockwise"),
    ("mxfp8", (10, 0), None),
])
def test_gpu_compute_capability_per_recipe(recipe, capability, refused):
    problems = fp8_platform_problems(_recipe(recipe), GPU_WITH_TE, FP8Hardware(capability, "12.9", "2.8.0"))
    assert problems == ([f"train.fp8 = hybrid (train.fp8_recipe = {recipe}): {refused}"] if refused else [])


def test_cuda_and_transformer_engine_versions_and_te_own_verdict():
    hopper = FP8Hardware((9, 0), "12.8", "2.2.1")
    assert fp8_platform_problems(_recipe("blockwise"), GPU_WITH_TE, hopper) == [
        "train.fp8 = hybrid (train.fp8_recipe = blockwise): Transformer Engine's block-scaled GEMMs need CUDA 12.9 "
        "or newer; torch here is built for CUDA 12.8",
        "train.fp8 = hybrid (train.fp8_recipe = blockwise): needs Transformer Engine 2.3.0 or newer (megatron-core "
        "builds the recipe from it); installed: 2.2.1",
    ]
    assert fp8_platform_problems(_recipe("tensorwise"), GPU_WITH_TE, hopper) == []
    refused = FP8Hardware((12, 0), "12.9", "2.8.0", te_refusal="MXFP8 is not supported on 12.0+ architectures yet.")
    assert fp8_platform_problems(_recipe("mxfp8"), GPU_WITH_TE, refused) == [
        "train.fp8 = hybrid (train.fp8_recipe = mxfp8): Transformer Engine refuses it on this GPU: MXFP8 is not "
        "supported on 12.0+ architectures yet."]
    # A cause megavl's rules already name is not repeated in Transformer Engine's words.
    old_cuda = FP8Hardware((9, 0), "12.8", "2.8.0", te_refusal="FP8 block scaled GEMM requires CUDA >= 12.9.")
    problems = fp8_platform_problems(_recipe("blockwise"), GPU_WITH_TE, old_cuda)
    assert len(problems) == 1 and "need CUDA 12.9 or newer" in problems[0]


def test_start_up_check_raises_listing_every_problem():
    with pytest.raises(ConfigError) as error:
        check_fp8_platform(_recipe("mxfp8"), GPU_WITH_TE, FP8Hardware((8, 0), "12.9", "2.0.0"))
    text = str(error.value)
    assert text.startswith("train.fp8 cannot run on this machine (2 problems):")
    assert "MXFP8 GEMMs need compute capability 10.0" in text and "needs Transformer Engine 2.1.0" in text
    check_fp8_platform(_recipe("delayed"), GPU_WITH_TE, FP8Hardware((9, 0), "12.9", "2.8.0"))


def test_megatron_fp8_fields_go_to_the_lm_and_to_the_tower_only_with_fp8_vision():
    from megavl.models.transformer_configs import fp8_fields, lm_transformer_config, vision_transformer_config

    dense = ["train.dtype=bf16", "train.fp8=e4m3", "train.fp8_recipe=tensorwise", "train.fp8_margin=2",
             "train.fp8_amax_history_len=8", "train.fp8_amax_compute_algo=most_recent"]
    config = load_config(str(TINY_CONFIG), dense)
    lm, vision = lm_transformer_config(config), vision_transformer_config(config)
    assert (lm.fp8, lm.fp8_recipe, lm.fp8_margin, lm.fp8_amax_history_len, lm.fp8_amax_compute_algo) == (
        "e4m3", "tensorwise", 2, 8, "most_recent")
    assert lm.tp_only_amax_red is False
    assert vision.fp8 is None
    vision = vision_transformer_config(load_config(str(TINY_CONFIG), dense + ["train.fp8_vision=true"]))
    assert (vision.fp8, vision.fp8_recipe, vision.tp_only_amax_red) == ("e4m3", "tensorwise", True)
    assert lm_transformer_config(load_config(str(TINY_CONFIG))).fp8 is None

    # megatron's TransformerConfig asks Transformer Engine's version for MoE with FP8, so the
    # production config's fields are checked as the dict the builders pass on.
    moe = load_config(MOE_8B, FP8_8B)
    assert fp8_fields(moe, "lm") == dict(fp8="hybrid", fp8_recipe="delayed", fp8_margin=0,
                                         fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    assert fp8_fields(moe, "vision") == {}
    assert fp8_fields(load_config(MOE_8B), "lm") == {}


def test_fp8_vision_tower_pads_its_patches_and_leaves_them_unchanged(megatron_world):
    """With FP8 the tower runs on a multiple of 16 rows (TE's GEMMs need it); the padding rows are
    their own attention segment, so every patch's output is what it is without them."""
    from megavl.data.image_patches import image_to_patches
    from megavl.models.specs import layer_spec
    from megavl.models.transformer_configs import vision_transformer_config
    from megavl.models.vision import VisionEncoder

    v = megatron_world.model.vision
    images = [image_to_patches(torch.randn(3, h, w), v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
              for h, w in ((56, 84), (84, 84))]
    pixels, grid = torch.cat([p for p, _ in images]), torch.tensor([g for _, g in images])
    assert pixels.shape[0] % 16 != 0  # 24 + 36 patches

    def encoder(overrides):
        config = load_config(str(TINY_CONFIG), overrides)
        torch.manual_seed(0)
        return VisionEncoder(vision_transformer_config(config), config.model.vision,
                             layer_spec("local", "sdpa"), "sdpa")

    plain = encoder([])
    fp8 = encoder(["train.fp8=hybrid", "train.fp8_vision=true"])
    fp8.load_state_dict(plain.state_dict())
    rows = []
    fp8.layers[0].register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    with torch.no_grad():
        expected, padded = plain(pixels, grid), fp8(pixels, grid)
    assert rows == [64]
    assert padded.shape == expected.shape == (60, v.hidden_size)
    torch.testing.assert_close(padded, expected, atol=1e-5, rtol=1e-5)
