"""Training FLOPs of one optimizer step and the step time they give at a stated MFU.

Formulas (training = forward + backward = 3 forward passes; a matmul of an
N-parameter layer costs 2N FLOPs per row forward):

* LM: 6 * N * T + 6 * L * s^2 * n * d * sequences, with N the active LM
  parameters without the input embedding (a lookup, not a matmul; the output
  layer is a matmul and counts), T = global_batch_size * seq_length tokens,
  and the attention term for causal attention over each packed row of s
  tokens (QK^T and AV, each 2 * s^2 * n*d forward, halved by the causal mask;
  L layers, n heads of d). Vision LoRA counts for every token because its
  matmuls run over every row (text rows are zeroed, not skipped).
* Vision tower: 6 * N_vision * P + 6 * N_adapter * P / merge^2, with P the
  patches of the step at the configured vision budget, plus attention:
  4 * n * m * hidden forward per image of n patches and layer, where m = n in
  full-attention layers and m = min(n, window patches) in windowed layers,
  images taken at the largest size the resolution policy gives.
* --recompute full adds one more forward of the LM decoder layers (hardware
  FLOPs, not model FLOPs).

Step time = hardware FLOPs / (GPUs * peak bf16 dense * MFU) * (1 + (PP - 1) / M),
the last factor being the 1F1B pipeline bubble with M microbatches per step;
the MFU is that of the compute itself, without the bubble.
"""

from __future__ import annotations

from dataclasses import dataclass

from megavl.config import Config, lm_head_dim
from megavl.config.towers import tower_traits, window_stage_windowed_layers, windowed_layers
from megavl.models.param_count import vision_parameter_pieces
from megavl.planning.activations import Recompute, vision_budget
from megavl.planning.hardware import Cluster
from megavl.planning.parameters import model_parameters

# The formulas above, one line each, as the report prints them.
FORMULAS = (
    "LM: 6 * N * T + 6 * L * s^2 * n * d * rows (N: active LM parameters less the input embedding; "
    "T: tokens per step; causal attention over each packed row of s tokens, L layers of n heads of d)",
    "vision: 6 * (N_vision * patches + N_adapter * vision tokens) + 12 * n * m * hidden per image and layer, "
    "every pack filled to its vision budget (an upper bound) with images of n patches (the largest the "
    "resolution policy gives, a tile when it tiles); m = n in full-attention layers, min(n, window patches) in windowed ones; "
    "a compressing tower's window stage per patch and its global stage per compressed token",
    "step time = FLOPs / (GPUs * peak bf16 dense * MFU) * (1 + (PP - 1) / microbatches per step)",
)


@dataclass(frozen=True)
class StepFlops:
    lm_dense: float  # 6 * N * T
    lm_attention: float
    vision_dense: float
    vision_attention: float
    recompute: float  # extra hardware FLOPs of recomputation
    tokens: int  # LM tokens per step
    vision_tokens: int  # merged vision tokens per step (at the budget)

    @property
    def model(self) -> float:
        return self.lm_dense + self.lm_attention + self.vision_dense + self.vision_attention

    @property
    def hardware(self) -> float:
        return self.model + self.recompute


def _lm_matmul_parameters(config: Config) -> int:
    lm = config.model.lm
    active = model_parameters(config)["language_model"].active
    input_embedding = lm.vocab_size * lm.hidden_size if not lm.tie_embeddings else 0
    return active - input_embedding


def step_flops(config: Config, recompute: Recompute = "none") -> StepFlops:
    lm, v, t = config.model.lm, config.model.vision, config.train
    params = model_parameters(config)
    tokens = t.global_batch_size * t.seq_length
    heads_dim = lm.num_attention_heads * lm_head_dim(lm)
    forward_attention_per_layer = 2 * t.seq_length**2 * heads_dim * t.global_batch_size  # causal: 4 s^2 nd / 2
    lm_dense = 6 * _lm_matmul_parameters(config) * tokens
    lm_attention = 3 * lm.num_layers * forward_attention_per_layer

    budget = vision_budget(config)
    vision_tokens = t.global_batch_size * budget.tokens_per_pack
    merge = v.spatial_merge_size**2
    patches = vision_tokens * merge
    per_image = budget.patches_per_image(config)
    if config.data.resolution.mode == "tiling":
        # Each tile (and the global view) is an image of its own to the tower's attention.
        per_image = min(per_image, (config.data.resolution.tile_size // v.patch_size) ** 2)
    images = patches / per_image if per_image else 0
    window = (v.window_size // v.patch_size) ** 2
    if tower_traits(v).compresses:
        # The window stage (and patch embedding, compressor) per patch, the global stage per token.
        stage = v.window_stage
        per_patch = sum(count for name, count, _ in vision_parameter_pieces(config)
                        if name.startswith(("patch embedding", "window stage")))
        per_token = params["vision"].total - per_patch
        vision_dense = 6 * (per_patch * patches + per_token * vision_tokens)
        windowed = len(window_stage_windowed_layers(v))
        stage_attended = (stage.num_layers - windowed) * per_image + windowed * min(per_image, window)
        tokens_per_image = per_image / merge
        vision_attention = 3 * images * 4 * (per_image * stage_attended * stage.hidden_size
                                             + tokens_per_image * v.num_layers * tokens_per_image * v.hidden_size)
    else:
        vision_dense = 6 * params["vision"].total * patches
        windowed = len(windowed_layers(v))
        attended = (v.num_layers - windowed) * per_image + windowed * min(per_image, window)
        vision_attention = 3 * images * 4 * per_image * attended * v.hidden_size
    vision_dense += 6 * params["adapter"].total * vision_tokens

    recompute_flops = 0.0
    if recompute == "full":
        output_layer = lm.vocab_size * lm.hidden_size
        recompute_flops = 2 * (_lm_matmul_parameters(config) - output_layer) * tokens \
            + lm.num_layers * forward_attention_per_layer
    return StepFlops(lm_dense, lm_attention, vision_dense, vision_attention, recompute_flops, tokens, vision_tokens)


@dataclass(frozen=True)
class StepTime:
    flops: StepFlops
    seconds: float
    bubble: float  # fraction added by the pipeline bubble
    tokens_per_second: float


def step_time(config: Config, cluster: Cluster, microbatches: int, mfu: float,
              recompute: Recompute = "none") -> StepTime:
    flops = step_flops(config, recompute)
    compute = flops.hardware / (cluster.world_size * cluster.gpu.peak_bf16_dense_flops * mfu)
    bubble = (config.parallel.pipeline - 1) / microbatches
    seconds = compute * (1 + bubble)
    return StepTime(flops, seconds, bubble, flops.tokens / seconds)
