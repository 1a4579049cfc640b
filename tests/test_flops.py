"""Model FLOPs of the step (megavl/models/flops.py) and the throughput the trainer logs from them.

* Against torch's FlopCounterMode on a forward and backward of the tiny dense and MoE models on the
  CPU: the matmul FLOPs agree exactly, for full training and with parts frozen (autograd then skips
  gradients the count skips too); the attention FLOPs agree once the count is given the pairs SDPA
  computes (all s^2 of each row, all patches^2 of the packed images) instead of those the mask
  allows. Component by component on a forward.
* The pairs the mask allows are exactly the dense mask's (random ids, conversation turns, image
  tokens in any turn, both image-attention modes), and the vision windows exactly vision.py's.
* The step's tokens and FLOPs travel in one float64 all-reduce; step_metrics and the writer log
  tflops_per_gpu always and mfu only with a known peak.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json

import pytest
import torch

from megavl.config import load_config
from megavl.models import flops
from megavl.models.flops import ModelFlops, lm_attention_pairs, microbatch_flops, vision_attention_pairs

from conftest import ROOT, TINY_CONFIG

MOE_CONFIG = ROOT / "examples" / "configs" / "tiny_moe_cpu.yaml"
SIGLIP_CONFIG = ROOT / "examples" / "configs" / "tiny_siglip_cpu.yaml"
CLIP_CONFIG = ROOT / "examples" / "configs" / "tiny_clip_cpu.yaml"
ROAYA_CONFIG = ROOT / "examples" / "configs" / "tiny_roaya_cpu.yaml"
SHORT = ["train.seq_length=256"]
# The one matmul FlopCounterMode sees that is no model FLOP: multimodal RoPE's frequencies, an
# outer product of positions and inverse frequencies written as a matmul (3 * b * s * head_dim
# FLOPs, 0.002% of these steps).
ROPE_SHARE = 1e-4
NOTHING_TRAINS = [f"train.parts.{part}.train=false" for part in
                  ("vision", "adapter", "lm", "lm_embeddings", "output_layer", "vision_lora", "router")]

CASES = {
    "dense": (TINY_CONFIG, SHORT),
    # parallel.expert=1: one process holds all experts; a shared expert adds its own MLP.
    "moe": (MOE_CONFIG, [*SHORT, "parallel.expert=1", "model.lm.moe.shared_expert_ffn_hidden_size=96"]),
    # Only the adapter trains: the tower runs forward only, the LM computes input gradients only.
    "dense-align": (TINY_CONFIG, [*SHORT, "train.stage=align"]),
    # The tower's first layers and patch embedding frozen, the LM frozen but its LoRA training.
    "dense-last-vision-layers": (TINY_CONFIG, [*SHORT, "train.parts.vision_last_layers=2",
                                               "train.parts.lm.train=false"]),
    # Only the LM's layers train: their first linear still computes its input's gradient, for the
    # norm weight before it.
    "dense-lm-only": (TINY_CONFIG, [*SHORT, "train.parts.vision.train=false", "train.parts.adapter.train=false",
                                    "train.parts.lm_embeddings.train=false", "train.parts.output_layer.train=false",
                                    "train.parts.vision_lora.train=false"]),
    # Only routers and LoRA train: gradients start inside the LM.
    "moe-routers-and-lora": (MOE_CONFIG, [*SHORT, "parallel.expert=1", "train.parts.vision.train=false",
                                          "train.parts.adapter.train=false", "train.parts.lm.train=false",
                                          "train.parts.lm_embeddings.train=false",
                                          "train.parts.output_layer.train=false"]),
    # SigLIP + pixel shuffle (one linear, norm after); with only the adapter training, its linear
    # (megatron's) still computes its input's gradient, which nothing below uses.
    "siglip": (SIGLIP_CONFIG, SHORT),
    "siglip-align": (SIGLIP_CONFIG, [*SHORT, "train.stage=align"]),
    # CLIP (a class token per image) + LLaVA's MLP on every patch, a norm before it.
    "clip": (CLIP_CONFIG, [*SHORT, "model.adapter.norm=before"]),
    # compression_first: a window stage over the patches, the compressor, a global stage over tokens.
    "compression-first": (ROAYA_CONFIG, SHORT),
    # ... with only its last layer training: the window stage and compressor run forward only.
    "compression-first-last-layer": (ROAYA_CONFIG, [*SHORT, "train.parts.vision_last_layers=1"]),
    # Heads wider than hidden_size / num_attention_heads (Qwen3's layout): 4 heads of 48 on a width of 128.
    "wide-heads": (CLIP_CONFIG, [*SHORT, "model.lm.head_dim=48", "model.lm.qk_layernorm=true"]),
}


def _model(config):
    from megavl.models.build import build_model
    from megavl.models.parts import freeze

    torch.manual_seed(0)
    model = build_model(config)
    freeze(config, model)  # as wrap_for_training does: frozen weights take no gradient
    model.train()
    return model


def _counted(model, config, batch, backward: bool):
    """FlopCounterMode's counts over one forward (and backward), SDPA as plain matmuls.

    SDPA's fused CPU kernel has no FLOP formula in FlopCounterMode (it would count 0); the math
    back end runs attention as bmm over every (query, key) pair, which it does count.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megavl.models import inputs
    from megavl.platform.features import detect

    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    platform = detect()
    batch = inputs.to_device(batch, config, platform.device)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            loss = inputs.forward(model, batch, config, platform)
            if backward:
                (loss * batch["loss_mask"]).sum().backward()
    finally:
        # A backward outside megatron's schedule leaves the MoE aux-loss scale as megatron's
        # 0-d default, which the schedule's later [1]-shaped set_loss_scale cannot copy into.
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
    return counter.get_flop_counts()


def _dense_attention_count(batch, config, monkeypatch) -> ModelFlops:
    """The count with the pairs SDPA computes over a dense mask instead of those the mask allows."""
    from megavl.config.towers import tower_traits

    from megavl.config.towers import tower_output_rows

    b, s = batch["tokens"].shape
    grid = batch["image_grid_thw"]
    v = config.model.vision
    patches = int(grid.prod(dim=-1).sum())
    # The tower's rows: every patch (or compressed token), and a class token per image where the
    # tower has one; a compressing tower's window stage runs over every patch.
    rows = tower_output_rows(patches, v) + len(grid) * int(tower_traits(v).class_token)
    with monkeypatch.context() as patched:
        patched.setattr(flops, "lm_attention_pairs", lambda batch, bidirectional: b * s * s)
        patched.setattr(flops, "vision_attention_pairs", lambda grid, vision: (rows**2, rows**2))
        patched.setattr(flops, "window_stage_attention_pairs", lambda grid, vision: (patches**2, patches**2))
        return microbatch_flops(batch, config)


@pytest.mark.parametrize("name", list(CASES))
def test_count_matches_flop_counter_mode(megatron_world, monkeypatch, name):
    from megavl.data.random_samples import random_batches

    path, overrides = CASES[name]
    config = load_config(str(path), overrides)
    model = _model(config)
    batch = random_batches(config, 1, seed=1)[0]
    assert batch["image_grid_thw"] is not None and batch["turn_ids"].max() > 0  # images and turns

    counted = _counted(model, config, batch, backward=True)["Global"]
    ours = microbatch_flops(batch, config)
    dense = _dense_attention_count(batch, config, monkeypatch)
    # A biased linear outside megatron (SigLIP's patch embedding) is an addmm.
    mm = counted.get(torch.ops.aten.mm, 0) + counted.get(torch.ops.aten.addmm, 0)
    bmm = counted.get(torch.ops.aten.bmm, 0)
    # Every linear, router and expert is an mm; attention (and RoPE's frequencies) are bmm.
    assert mm == ours.total - ours.attention
    assert dense.total - dense.attention == ours.total - ours.attention
    assert bmm == pytest.approx(dense.attention, rel=ROPE_SHARE)
    assert sum(counted.values()) == pytest.approx(dense.total, rel=ROPE_SHARE)
    # The mask allows far fewer pairs than SDPA computes: causal halves, documents, windows.
    assert ours.lm_attention < dense.lm_attention / 2
    assert ours.vision_attention < dense.vision_attention


def test_forward_component_by_component(megatron_world, monkeypatch):
    """With nothing training the count is the forward's; FlopCounterMode names each module's share."""
    from megavl.data.random_samples import random_batches

    config = load_config(str(MOE_CONFIG), [*SHORT, "parallel.expert=1"])
    model = _model(config)
    batch = random_batches(config, 1, seed=2)[0]
    forward_only = load_config(str(MOE_CONFIG), [*SHORT, "parallel.expert=1", *NOTHING_TRAINS])
    ours = _dense_attention_count(batch, forward_only, monkeypatch)
    counted = _counted(model, config, batch, backward=False)
    mm, bmm = torch.ops.aten.mm, torch.ops.aten.bmm

    def module(name):
        return counted.get(f"VisionLanguageModel.{name}", {})

    assert module("vision").get(mm) == ours.vision
    assert module("vision").get(bmm) == ours.vision_attention
    assert module("adapter").get(mm) == ours.adapter
    # The LoRA adapters run inside the decoder's linears.
    assert module("language_model.decoder").get(mm) == ours.lm + ours.vision_lora
    assert module("language_model.decoder").get(bmm) == ours.lm_attention
    assert module("language_model.output_layer").get(mm) == ours.output_layer


def _random_ids(rng: torch.Generator, b: int, s: int) -> dict:
    """Arbitrary valid ids: documents in any order with padding anywhere, images in any turn."""
    documents = torch.randint(-1, 3, (b, s), generator=rng)
    return {
        "tokens": torch.zeros(b, s, dtype=torch.long),
        "document_ids": documents,
        "turn_ids": torch.randint(0, 4, (b, s), generator=rng),
        "image_ids": torch.where(torch.rand(b, s, generator=rng) < 0.4, 0, -1),
    }


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional-images", "causal-images"])
def test_attention_pairs_are_the_masks_pairs(bidirectional):
    from megavl.data.random_samples import random_batches
    from megavl.models.inputs import PAD_DOCUMENT_ID, attention_mask_for

    config = load_config(str(TINY_CONFIG), ["train.micro_batch_size=3"])
    rng = torch.Generator().manual_seed(0)
    batches = [_random_ids(rng, 3, 64) for _ in range(20)]
    batches += random_batches(config, 5, seed=3, samples_per_row=4)
    for batch in batches:
        mask = attention_mask_for(batch, bidirectional, "sdpa")
        # The mask lets each padding token see itself (a finite softmax); that is no work to count.
        padding = int((batch["document_ids"] == PAD_DOCUMENT_ID).sum())
        assert lm_attention_pairs(batch, bidirectional) == int(mask.sum()) - padding


def test_vision_pairs_are_the_towers_segments():
    from megavl.models.vision import patch_coordinates, window_segments

    vision = load_config(str(TINY_CONFIG)).model.vision  # windows of 4 x 4 patches
    # Sides that are and are not multiples of the window, a single window, two temporal slices.
    grid = torch.tensor([[1, 4, 4], [1, 6, 10], [2, 8, 6], [1, 2, 4], [1, 12, 2]])
    coords = patch_coordinates(grid, vision.spatial_merge_size)
    full = int((torch.unique(coords[:, 0], return_counts=True)[1] ** 2).sum())
    windows = window_segments(coords, grid, vision.window_size // vision.patch_size)
    windowed = int((torch.unique(windows, return_counts=True)[1] ** 2).sum())
    assert vision_attention_pairs(grid, vision) == (full, windowed)


def test_a_compressing_towers_pairs_are_its_window_stage_segments_then_its_tokens():
    """compression_first: the window stage's windows over the patches (SAM's 14-patch windows do not
    align with the compressor's blocks), then whole images of compressed tokens."""
    from megavl.models.flops import window_stage_attention_pairs
    from megavl.models.vision import patch_coordinates, window_segments

    vision = load_config(str(ROAYA_CONFIG), ["model.vision.window_size=24"]).model.vision  # 3 x 3 patch windows
    grid = torch.tensor([[1, 8, 8], [1, 4, 12], [1, 2, 2]])
    coords = patch_coordinates(grid, vision.spatial_merge_size)
    full = int((torch.unique(coords[:, 0], return_counts=True)[1] ** 2).sum())
    windows = window_segments(coords, grid, vision.window_size // vision.patch_size)
    windowed = int((torch.unique(windows, return_counts=True)[1] ** 2).sum())
    assert window_stage_attention_pairs(grid, vision) == (full, windowed)
    tokens = (16**2 + 12**2 + 1**2)  # 4 x 4, 2 x 6 and 1 x 1 compressed tokens
    assert vision_attention_pairs(grid, vision) == (tokens, tokens)


def test_towers_without_windows_attend_over_each_image_and_its_class_token():
    grid = torch.tensor([[1, 4, 4], [1, 2, 6]])
    siglip = load_config(str(SIGLIP_CONFIG)).model.vision
    clip = load_config(str(CLIP_CONFIG)).model.vision
    assert vision_attention_pairs(grid, siglip) == (16**2 + 12**2, 16**2 + 12**2)
    assert vision_attention_pairs(grid, clip) == (17**2 + 13**2, 17**2 + 13**2)


def _row(documents: list[int]) -> dict:
    """One text-only row whose tokens belong to these documents (-1: padding)."""
    s = len(documents)
    return {
        "tokens": torch.full((1, s), 20), "document_ids": torch.tensor([documents]),
        "turn_ids": torch.zeros(1, s, dtype=torch.long), "image_ids": torch.full((1, s), -1),
        "image_grid_thw": None,
    }


def test_packed_documents_and_windows_count_less_attention():
    config = load_config(str(TINY_CONFIG), ["train.seq_length=128"])
    heads_width, layers = config.model.lm.hidden_size, config.model.lm.num_layers
    one = microbatch_flops(_row([0] * 128), config)
    two = microbatch_flops(_row([0] * 64 + [1] * 64), config)
    padded = microbatch_flops(_row([0] * 64 + [-1] * 64), config)
    # Causal pairs s(s+1)/2 per document, 4 FLOPs per pair and unit of head width, 3 passes.
    assert one.lm_attention == 3 * layers * 4 * heads_width * 128 * 129 // 2
    assert two.lm_attention == 3 * layers * 4 * heads_width * 2 * (64 * 65 // 2)
    assert padded.lm_attention == two.lm_attention / 2
    # The linears run over every position, padding included.
    assert one.total - one.attention == two.total - two.attention == padded.total - padded.attention

    vision = config.model.vision
    large, small = torch.tensor([[1, 16, 16]]), torch.tensor([[1, 4, 4]])  # 4 x 4 windows, one window
    full, windowed = vision_attention_pairs(large, vision)
    assert windowed == full // 16
    assert vision_attention_pairs(small, vision) == (256, 256)
    batch = {**_row([0] * 128), "image_grid_thw": large}
    all_full = dataclasses.replace(config.model.vision, full_attention_layers=list(range(vision.num_layers)))
    full_config = dataclasses.replace(config, model=dataclasses.replace(config.model, vision=all_full))
    assert microbatch_flops(batch, config).vision_attention < microbatch_flops(batch, full_config).vision_attention


def test_step_totals_are_one_float64_all_reduce(megatron_world, monkeypatch):
    import torch.distributed as dist

    from megavl.data.random_samples import random_batches
    from megavl.training import metrics

    config = megatron_world
    batches = random_batches(config, 2, seed=4)
    reduced = []
    real_all_reduce = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        reduced.append((tensor.dtype, tuple(tensor.shape)))
        return real_all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(metrics.dist, "all_reduce", recording)
    totals = metrics.step_totals(batches, config, group=dist.group.WORLD)
    assert reduced == [(torch.float64, (2,))]
    assert totals.tokens == sum(int((b["document_ids"] >= 0).sum()) for b in batches)
    assert totals.model_flops == sum(microbatch_flops(b, config).total for b in batches)


def _logged(model_flops, peak, tmp_path):
    from megavl.training.metrics import MetricsWriter, step_metrics

    result = type("Result", (), dict(loss=2.0, lr=1e-3, grad_norm=0.5, answer_tokens=100))()
    stats = type("Stats", (), dict(packing_efficiency=0.9, skipped={}))()
    m = step_metrics(result, 4000, 2.0, stats, None, None, None, 0, model_flops, 8, peak)
    console = io.StringIO()
    writer = MetricsWriter(str(tmp_path), 10, stream=console)
    writer.log_step(1, m)
    writer.close()
    with open(tmp_path / "metrics.jsonl") as f:
        return m, json.loads(f.readline()), console.getvalue()


def test_step_metrics_log_tflops_and_mfu_only_with_a_peak(tmp_path):
    m, line, console = _logged(8e15, 989e12, tmp_path / "gpu")
    assert m["tflops_per_gpu"] == pytest.approx(500.0)  # 8e15 FLOPs / 2 s / 8 GPUs
    assert m["mfu"] == pytest.approx(500 / 989)
    assert line["tflops_per_gpu"] == pytest.approx(500.0) and line["mfu"] == pytest.approx(500 / 989)
    assert "500 TFLOP/s/GPU" in console and "MFU 50.6%" in console

    m, line, console = _logged(8e11, None, tmp_path / "cpu")
    assert m["tflops_per_gpu"] == pytest.approx(0.05)
    assert "mfu" not in m and "mfu" not in line and "MFU" not in console
    assert "0.05 TFLOP/s/GPU" in console


def test_peak_comes_from_the_gpu_the_dtype_or_the_config(monkeypatch):
    from megavl.planning.hardware import gpu_by_device_name, peak_flops

    assert gpu_by_device_name("NVIDIA H100 80GB HBM3").name == "h100"
    assert gpu_by_device_name("NVIDIA H200").name == "h200"
    assert gpu_by_device_name("NVIDIA B200").name == "b200"
    for other in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA GH200 480GB", "NVIDIA GB200", "NVIDIA A100-SXM4-80GB"):
        assert gpu_by_device_name(other) is None, other
    assert peak_flops("NVIDIA H200", "bf16") == 989e12
    assert peak_flops("NVIDIA H200", "fp32") is None
    assert peak_flops(None, "bf16") is None

    spec = importlib.util.spec_from_file_location("pretrain_vlm_for_flops", ROOT / "pretrain_vlm.py")
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    cpu, gpu = type("Platform", (), {"cuda": False}), type("Platform", (), {"cuda": True})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA H200")
    bf16 = load_config(str(TINY_CONFIG), ["train.dtype=bf16"])
    assert trainer._peak_flops(bf16, gpu)[0] == 989e12
    assert trainer._peak_flops(bf16, cpu)[0] is None
    assert trainer._peak_flops(load_config(str(TINY_CONFIG)), gpu)[0] is None  # fp32
    assert trainer._peak_flops(load_config(str(TINY_CONFIG), ["logging.peak_tflops=100"]), cpu)[0] == 100e12
    from megavl.config import ConfigError, validate

    with pytest.raises(ConfigError, match="logging.peak_tflops = 0.0: must be > 0"):
        validate(load_config(str(TINY_CONFIG), ["logging.peak_tflops=0"]), world_size=1)
