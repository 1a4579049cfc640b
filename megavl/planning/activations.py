"""Activation memory: the tensors autograd keeps from a microbatch's forward until its backward.

The estimate is an inventory of what megatron-core's local layers (the layers
megavl builds: megatron's ColumnParallel/RowParallel linears, megavl's norms
and vision LoRA, megatron's MoE with the all-to-all dispatcher) save for
backward, tensor by tensor. Per token of the LM (a = bytes of train.dtype, 2 or
4; h hidden, d head dim, n heads, g query groups, f FFN width, r LoRA rank,
E experts, k top-k; sizes split over TP where the layer splits them):

* each RMSNorm: its input in fp32 (4h), the fp32 reciprocal RMS (4) and the
  normalised input (a*h) (a LayerNorm: its input, mean and rstd); the next
  linear keeps the scaled output (a*h);
* attention: the fused QKV output (a*(n+2g)*d, which V is a view of), rotated
  Q and K (a*(n+g)*d), the attention output (a*n*d), the log-sum-exp (4n) and
  the rotary cos/sin for Q and K (4*a*d); the CPU's dense-mask SDPA also keeps
  its float mask (a*s per token per layer), CUDA's FlexAttention a block mask
  that is negligible;
* a SwiGLU MLP: fc1's output (2f), SiLU(gate) (f), up (f) and fc2's input (f)
  (the vision tower's compiled QuickGELU keeps only fc1's output and fc2's input);
* an MoE MLP: the router (its input a*h, fp32 logits and probabilities 8E,
  top-k indices and probabilities 20k), the dispatcher's routing map and
  permutation (5E + 8k), and per routed row (k rows per token, balanced over
  the EP ranks) the expert's input (a*h), 5f in its SwiGLU with the probability
  scaling, fc2's input (f) and the probability (4);
* q/k norms (model.lm.qk_layernorm): their fp32 inputs, rstd and normalised outputs;
* vision LoRA (where active): per linear the row mask (a), the masked input and
  the rank-r intermediate;
* first stage: token ids (8), the image-slot mask (1) and the vision tower
  (the same inventory per patch, plus the patch pixels) and adapter;
  last stage: the final norm, the output layer's input and the fp32 softmax
  over the vocabulary (4V) with the loss's target masks (9), plus, in bf16,
  the bf16 logits alive while the loss is computed (once, not per microbatch).

Hidden-size tensors outside attention and MLP are split over TP under sequence
parallelism. Pipeline: with 1F1B, stage i keeps up to min(PP - i, microbatches)
microbatches in flight; non-last stages also hold their output and (in bf16)
the received input per microbatch. ``recompute="full"`` is megatron's full
recompute of every LM decoder layer (uniform, one layer per checkpoint): a
layer keeps only its input, and one layer's activations are rebuilt at a time
in backward; the vision tower, adapter, embeddings and output are not
recomputed. The estimate assumes balanced expert routing; with train.dropout >
0 each hidden dropout keeps its mask (a boolean per element on CUDA). Memory
the allocator holds beyond live tensors (fragmentation, NCCL buffers, the CUDA
context) is not activation memory; the planner keeps a separate reserve for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from megavl.config import Config, lm_head_dim, lm_layers_per_stage
from megavl.config.towers import adapter_ffn_hidden_size, adapter_norm, tower_traits

# The device the run uses: "cuda" (FlexAttention, the GPU kernels) or "cpu" (dense-mask SDPA).
Device = Literal["cuda", "cpu"]
Recompute = Literal["none", "full"]
RECOMPUTE_CHOICES = ("none", "full")

FP32 = 4
INT64 = 8
BOOL = 1


def activation_bytes_per_element(config: Config) -> int:
    return 2 if config.train.dtype == "bf16" else 4


# --------------------------------------------------------------------------- #
# The vision budget of a microbatch
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class VisionBudget:
    tokens_per_pack: int  # merged vision tokens (LM positions) per packed row
    tokens_per_image: int  # merged tokens of one image at the largest size the resolution policy gives
    source: str  # where the number comes from, for the report

    def patches_per_image(self, config: Config) -> int:
        return self.tokens_per_image * config.model.vision.spatial_merge_size ** 2


def max_tokens_per_image(config: Config) -> int:
    """Merged vision tokens of the largest image data.resolution produces."""
    r, v = config.data.resolution, config.model.vision
    factor = v.patch_size * v.spatial_merge_size
    if r.mode == "fixed":
        return r.fixed_tokens
    if r.mode == "tiling":
        tile = (r.tile_size // factor) ** 2
        return r.max_tiles * tile + (tile if r.thumbnail and r.max_tiles > 1 else 0)
    # native: sides are multiples of factor with the area at most max_pixels.
    return r.max_pixels // (factor * factor)


def vision_budget(config: Config) -> VisionBudget:
    d, s = config.data, config.train.seq_length
    per_image = max_tokens_per_image(config)
    if d.max_vision_tokens_per_pack > 0:
        tokens = min(d.max_vision_tokens_per_pack, s)
        source = f"data.max_vision_tokens_per_pack = {d.max_vision_tokens_per_pack}"
    else:
        tokens = min(d.max_images_per_pack * per_image, s)
        source = (f"data.max_images_per_pack ({d.max_images_per_pack}) x {per_image} tokens per image at "
                  f"data.resolution ({d.resolution.mode}, max_pixels {d.resolution.max_pixels})")
    if tokens == s:
        source += f", capped at train.seq_length = {s}"
    return VisionBudget(tokens, per_image, source)


# --------------------------------------------------------------------------- #
# Layer inventories (bytes of one microbatch)
# --------------------------------------------------------------------------- #


def _norm_bytes(tokens: float, hidden: int, kind: str, a: int) -> float:
    if kind == "layernorm":
        return tokens * (a * hidden + 2 * a)  # input, mean and rstd
    return tokens * (FP32 * hidden + FP32 + a * hidden)  # fp32 input, rstd, normalised input


def _attention_core_bytes(tokens: float, heads: int, groups: int, head_dim: int, a: int,
                          sequences: int, seq: int, device: Device) -> float:
    """QKV output, rotated Q and K, output, log-sum-exp (heads and groups already per TP rank)."""
    saved = tokens * (a * head_dim * ((heads + 2 * groups) + heads + groups + heads) + FP32 * heads)
    if device == "cpu":
        saved += sequences * seq * seq * a  # the float mask SDPA makes from the boolean one, per layer
    return saved


@dataclass(frozen=True)
class _Shape:
    """The tensor shape of one microbatch of the LM on one GPU."""

    tokens: int  # b * s, whole sequence
    sequences: int
    seq: int
    hidden_tokens: float  # tokens of hidden-size tensors on this rank (split over TP under SP)


def _lm_shape(config: Config) -> _Shape:
    t, p = config.train, config.parallel
    tokens = t.micro_batch_size * t.seq_length
    return _Shape(tokens, t.micro_batch_size, t.seq_length, tokens / p.tensor if p.sequence_parallel else tokens)


def lm_layer_bytes(config: Config, layer: int, device: Device) -> dict[str, float]:
    """What one LM decoder layer keeps for backward, per microbatch, on one GPU."""
    lm, moe, p = config.model.lm, config.model.lm.moe, config.parallel
    a = activation_bytes_per_element(config)
    x = _lm_shape(config)
    h, tp = lm.hidden_size, p.tensor
    d = lm_head_dim(lm)
    heads, groups = lm.num_attention_heads // tp, lm.num_query_groups // tp
    lora = lm.vision_lora
    ra = lora.attn_rank if lora.enabled else 0
    rm = lora.mlp_rank if lora.enabled else 0
    out: dict[str, float] = {}

    out["norms"] = 2 * _norm_bytes(x.hidden_tokens, h, "rmsnorm", a)
    rotary_rows = x.tokens if lm.rope == "mrope" else x.seq  # 1d rope: one table for all sequences
    out["attention"] = (x.hidden_tokens * a * h  # QKV input
                        + rotary_rows * 4 * a * d
                        + _attention_core_bytes(x.tokens, heads, groups, d, a, x.sequences, x.seq, device))
    if lm.qk_layernorm:
        # The norms' fp32 inputs (K's is the QKV output itself in fp32), rstd, normalised outputs.
        k_input = 0 if a == FP32 else FP32 * groups * d
        out["q/k norms"] = x.tokens * (FP32 * heads * d + k_input + FP32 * (heads + groups) + a * (heads + groups) * d)
    if ra:
        # QKV (column, input gathered to the whole sequence under SP) and output projection (row).
        out["attention LoRA"] = x.tokens * (a + a * h + a * ra) + x.tokens * (a + a * heads * d + a * ra)
    if moe.num_experts and layer not in moe.dense_layers:
        out.update(_moe_bytes(config, x, a, rm))
    else:
        ffn = lm.ffn_hidden_size // tp
        out["MLP"] = x.hidden_tokens * a * h + x.tokens * a * 5 * ffn
        if rm:
            out["MLP LoRA"] = x.tokens * (a + a * h + a * rm) + x.tokens * (a + a * ffn + a * rm)
    if config.train.dropout > 0:
        out["dropout masks"] = 2 * x.hidden_tokens * h * _dropout_mask_bytes(config, device)
    return out


def _moe_bytes(config: Config, x: _Shape, a: int, rm: int) -> dict[str, float]:
    lm, moe, p = config.model.lm, config.model.lm.moe, config.parallel
    h, e, k = lm.hidden_size, moe.num_experts, moe.top_k
    ffn = (moe.ffn_hidden_size or lm.ffn_hidden_size) // p.expert_tensor
    out = {}
    # The router's input (megatron's gating function keeps it in train.dtype and computes
    # in fp32), fp32 logits and probabilities, the z-loss log-sum-exp, the top-k
    # indices (twice) and probabilities.
    out["router"] = x.hidden_tokens * (a * h + 8 * e + 20 * k + 4)
    out["dispatch"] = x.hidden_tokens * (BOOL * e + FP32 * e + INT64 * k)
    # Each rank sends k rows per token and, with balanced routing, receives as many;
    # expert-TP all-gathers them over its group.
    rows = x.hidden_tokens * k * p.expert_tensor
    out["experts"] = rows * (a * h + a * 6 * ffn + FP32)
    if rm:
        out["experts' LoRA"] = rows * (a + a * h + a * rm) + rows * (a + a * ffn + a * rm)
    if moe.shared_expert_ffn_hidden_size:
        shared = moe.shared_expert_ffn_hidden_size // p.tensor
        # Its input is the norm output the router already keeps.
        out["shared expert"] = x.tokens * a * 5 * shared
    return out


def _adapter_bytes(config: Config, patches: float, a: int) -> float:
    """What the projector (model.adapter.kind) saves for backward over `patches` patches."""
    ad, v, lm = config.model.adapter, config.model.vision, config.model.lm
    h, tp, lm_h = v.hidden_size, config.parallel.tensor, lm.hidden_size
    merge = v.spatial_merge_size ** 2
    norm = adapter_norm(ad)
    if ad.kind == "merge_mlp":
        ffn = adapter_ffn_hidden_size(config) // tp
        return (_norm_bytes(patches, h, v.norm, a) + patches * a * h
                + 2 * (patches / merge) * a * ffn)  # GELU's input and output
    if tower_traits(v).compresses:
        patches = patches / merge  # the tower's compressor has merged them already (an mlp projector)
    tokens = patches / merge if ad.kind == "pixel_shuffle" else patches
    saved = patches * a * h  # the first linear's input
    if norm == "before":
        saved += _norm_bytes(patches, h, "layernorm", a)
    elif norm == "after":
        saved += _norm_bytes(tokens, lm_h, "layernorm", a)
    if ad.kind == "mlp":
        saved += 2 * tokens * a * adapter_ffn_hidden_size(config) // tp  # GELU's input and output
    return saved


def _vision_layer_bytes(config: Config, rows: float, h: int, heads: int, ffn: int, device: Device) -> float:
    """One vision layer of width h (heads heads, MLP width ffn) over `rows` rows, on one TP rank."""
    v, tp = config.model.vision, config.parallel.tensor
    a = activation_bytes_per_element(config)
    d, heads, ffn = h // heads, heads // tp, ffn // tp
    # fc1's output (+ bias); SwiGLU also keeps SiLU(gate) and up. megatron compiles
    # QuickGELU, whose compiled backward recomputes the sigmoid from the input.
    activation = 4 * ffn if v.mlp == "swiglu" else ffn
    return (2 * _norm_bytes(rows, h, v.norm, a)
            + rows * a * h * 2  # QKV and fc1 inputs
            + rows * 4 * a * d
            + _attention_core_bytes(rows, heads, heads, d, a, 1, rows, device)
            + rows * a * (activation + ffn))


def vision_tower_bytes(config: Config, patches: float, device: Device) -> dict[str, float]:
    """The vision encoder and adapter for `patches` patches (all images of a microbatch packed as one sequence)."""
    v = config.model.vision
    a = activation_bytes_per_element(config)
    h = v.hidden_size
    pixels = v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size
    rows, layers = patches, 0.0
    if tower_traits(v).compresses:
        # The window stage over the patches, then the compressor's input; the global stage below
        # runs over the compressed tokens.
        stage = v.window_stage
        layers += stage.num_layers * _vision_layer_bytes(config, patches, stage.hidden_size,
                                                         stage.num_attention_heads, stage.ffn_hidden_size, device)
        layers += patches * a * stage.hidden_size
        rows = patches / v.spatial_merge_size**2
    # Towers without rotary positions keep no rotated Q and K (their attention core saves
    # 4 * d fewer elements per row than the inventory assumes), and a class token per
    # image adds a row per image; both are small beside the MLP's share and not modelled.
    # The LayerNorms before the first layer (CLIP) and after the last (post_norm) are.
    tower_norms = _norm_bytes(rows, h, "layernorm", a) * (int(tower_traits(v).pre_norm) + int(v.post_norm))
    layers += v.num_layers * _vision_layer_bytes(config, rows, h, v.num_attention_heads, v.ffn_hidden_size, device)
    layers += tower_norms
    return {"patch pixels": patches * a * pixels, "vision layers": layers, "adapter": _adapter_bytes(config, patches, a)}


def _dropout_mask_bytes(config: Config, device: Device) -> int:
    """Bytes per element of a hidden-dropout mask: a boolean on CUDA, train.dtype on the CPU."""
    return BOOL if device == "cuda" else activation_bytes_per_element(config)


def _embedding_bytes(config: Config, vision_tokens: int, device: Device) -> float:
    x = _lm_shape(config)
    ids = x.tokens * (INT64 + (BOOL if config.parallel.tensor > 1 else 0))  # vocab-parallel masks ids at TP > 1
    slots = x.tokens * BOOL if vision_tokens else 0  # where image embeddings are scattered in
    dropout = (x.hidden_tokens * config.model.lm.hidden_size * _dropout_mask_bytes(config, device)
               if config.train.dropout > 0 else 0)
    return ids + slots + dropout


def _output_bytes(config: Config) -> float:
    lm = config.model.lm
    a = activation_bytes_per_element(config)
    x = _lm_shape(config)
    vocab = lm.vocab_size // config.parallel.tensor
    return (_norm_bytes(x.hidden_tokens, lm.hidden_size, "rmsnorm", a) + x.hidden_tokens * a * lm.hidden_size
            + x.tokens * (FP32 * vocab + BOOL + INT64))


def logits_transient_bytes(config: Config) -> float:
    """The logits in train.dtype, alive next to their fp32 copy while the loss is computed (bf16 only)."""
    if config.train.dtype == "fp32":
        return 0.0
    x = _lm_shape(config)
    return x.tokens * activation_bytes_per_element(config) * config.model.lm.vocab_size / config.parallel.tensor


# --------------------------------------------------------------------------- #
# A pipeline stage
# --------------------------------------------------------------------------- #


def microbatches_in_flight(config: Config, stage: int, microbatches: int) -> int:
    """Microbatches whose activations a stage holds at once under megatron's 1F1B schedule."""
    if config.parallel.pipeline == 1:
        return 1
    return max(1, min(config.parallel.pipeline - stage, microbatches))


@dataclass(frozen=True)
class StageActivations:
    stage: int
    in_flight: int
    # Bytes of one microbatch, by part, as kept until its backward.
    per_microbatch: dict[str, float]
    # Held once however many microbatches are in flight (the layer being recomputed, the logits).
    working: dict[str, float] = field(default_factory=dict)

    @property
    def per_microbatch_total(self) -> float:
        return sum(self.per_microbatch.values())

    @property
    def total(self) -> float:
        return self.in_flight * self.per_microbatch_total + sum(self.working.values())

    @property
    def vision_tower(self) -> float:
        return sum(self.per_microbatch.get(name, 0.0) for name in ("patch pixels", "vision layers", "adapter"))


def stage_activations(config: Config, stage: int, microbatches: int, device: Device = "cuda",
                      recompute: Recompute = "none") -> StageActivations:
    lm, p = config.model.lm, config.parallel
    a = activation_bytes_per_element(config)
    split = lm_layers_per_stage(config)
    first_layer = sum(split[:stage])
    layers = range(first_layer, first_layer + split[stage])
    x = _lm_shape(config)
    budget = vision_budget(config)
    per_mb: dict[str, float] = {}
    working: dict[str, float] = {}

    if stage == 0:
        vision_tokens = config.train.micro_batch_size * budget.tokens_per_pack
        patches = vision_tokens * config.model.vision.spatial_merge_size ** 2
        per_mb.update(vision_tower_bytes(config, patches, device))
        per_mb["embeddings"] = _embedding_bytes(config, vision_tokens, device)

    layer_totals = [sum(lm_layer_bytes(config, layer, device).values()) for layer in layers]
    if recompute == "full":
        layer_inputs = len(layers) * x.hidden_tokens * a * lm.hidden_size
        per_mb[f"LM layer inputs ({len(layers)} layers, recomputed)"] = layer_inputs
        working["one LM layer being recomputed"] = max(layer_totals)
    else:
        per_mb[f"LM layers ({len(layers)})"] = sum(layer_totals)

    last = p.pipeline - 1
    if stage == last:
        per_mb["final norm + output"] = _output_bytes(config)
        transient = logits_transient_bytes(config)
        if transient:
            working[f"logits in {config.train.dtype} during the loss"] = transient
    else:
        # megatron keeps each in-flight microbatch's output (deallocate_pipeline_outputs is off).
        per_mb["pipeline output"] = x.hidden_tokens * a * lm.hidden_size
    if stage > 0 and a != FP32:
        # The received input; in fp32 the first norm's saved input is this same tensor.
        per_mb["pipeline input"] = x.hidden_tokens * a * lm.hidden_size
    return StageActivations(stage, microbatches_in_flight(config, stage, microbatches), per_mb, working)


def largest_vision_patches(config: Config, memory_left: float, in_flight: int,
                           device: Device = "cuda") -> int:
    """Most patches per microbatch whose vision-tower activations fit in memory_left (stage 0).

    The tower's bytes are c1 * P (+ c2 * P**2 for the dense SDPA mask), found
    from the inventory itself; each in-flight microbatch keeps its own.
    """
    if memory_left <= 0:
        return 0
    one = sum(vision_tower_bytes(config, 1.0, device).values())
    two = sum(vision_tower_bytes(config, 2.0, device).values())
    quadratic = (two - 2 * one) / 2
    linear = one - quadratic
    budget = memory_left / in_flight
    if quadratic <= 0:
        return int(budget // linear)
    return int((-linear + math.sqrt(linear * linear + 4 * quadratic * budget)) / (2 * quadratic))
