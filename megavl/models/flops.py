"""Model FLOPs of training microbatches, counted from what each microbatch holds.

The planner (megavl/planning/flops.py) estimates a step from the config alone;
this counts the step that ran: its rows, documents, turns and images. The
trainer logs it as TFLOP/s per GPU and MFU (megavl/training/metrics.py).

What is counted, per microbatch of b rows of s positions:

* Matmuls, 2 FLOPs per multiply-add. A linear of fan-in i and fan-out o over r
  rows costs 2 * r * i * o forward, and in backward the same again for the
  gradient of its input (when that input needs one) and again for the gradient
  of its weight (when the weight trains). Full training thus gives megatron's
  3x the forward for every layer, except the patch embedding (2x: pixels take
  no gradient); with parts frozen (``train.parts``) the backward shrinks as
  autograd's does, e.g. a vision tower frozen entirely costs its forward only.
* Vision tower, per image of ``image_grid_thw`` (t, h, w): the patch embedding
  and each layer's linears (QKV, output projection, MLP) over its t*h*w
  patches; attention over the pairs its mask allows: all (t*h*w)^2 pairs of
  the image in full-attention layers, in windowed layers each window's own
  (window rows * window columns)^2 per temporal slice, windows of
  ``window_size // patch_size`` patches a side cut from the patch grid as
  megavl.models.vision.window_segments does.
* Vision towers with a class token (CLIP) run their layers over one more row
  per image, which also attends and is attended to within its image; towers
  without windows (SigLIP, CLIP) attend over the whole image in every layer.
* A compressing tower (compression_first): the patch embedding and its window stage's
  layers over the patches (windows as above, at the stage's width), the compressor's linear
  over the compressed tokens (patches / merge^2), then its global layers over those tokens,
  attending over each image's tokens.
* Adapter (``model.adapter.kind``): merge_mlp's two linears over the merged
  tokens (patches / merge^2), pixel_shuffle's one linear over them, mlp's two
  linears over every patch.
* LM: every linear over all b*s positions, padding included (the matmuls run
  over it): QKV (grouped-query width), output projection, the dense MLPs or,
  in MoE layers, the router and top_k experts per position (dropless routing:
  top_k * b*s expert rows however they spread), plus the shared expert; the
  vision LoRA adapters, when enabled, also over all b*s positions, because
  they run over every row with the text rows zeroed (vision_lora.py); the
  output layer over all positions; the input embedding is a lookup (0).
* LM attention: QK^T and AV, 4 * d FLOPs per query head of width d and per
  (query, key) pair the mask of megavl.attention.mask allows, backward twice
  that: within each document causal pairs (megatron's convention, counted
  exactly as s(s+1)/2 for one turn), less the pairs conversation masking
  hides between turns, plus, with bidirectional image attention, the image
  tokens' pairs with later image tokens. Padding counts no pairs: it only
  attends to itself to keep the softmax finite.

Not counted: norms, activations, softmax, RoPE, the loss, the embedding's
gradient (a scatter-add), work repeated by recomputation or across tensor-
parallel ranks, and the extra pairs a kernel computes beyond the mask (SDPA on
the CPU computes all s^2 pairs; flex attention skips only whole masked blocks).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence
from dataclasses import dataclass

import torch

from megavl.config import Config, VisionConfig, lm_head_dim
from megavl.config.towers import (
    adapter_ffn_hidden_size, tower_output_rows, tower_traits, window_stage_windowed_layers, windowed_layers,
)
from megavl.models.inputs import PAD_DOCUMENT_ID, TEXT_IMAGE_ID, Microbatch

__all__ = ["ModelFlops", "lm_attention_pairs", "microbatch_flops", "vision_attention_pairs"]


@dataclass(frozen=True)
class ModelFlops:
    """Training FLOPs (forward and backward) by component, exact integers."""

    vision: int = 0  # patch embedding and the tower's linears
    vision_attention: int = 0
    adapter: int = 0
    lm: int = 0  # the decoder's linears: projections, MLPs, routers, experts, shared experts
    vision_lora: int = 0
    output_layer: int = 0
    lm_attention: int = 0

    @property
    def attention(self) -> int:
        return self.vision_attention + self.lm_attention

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))


def _rank_within(keys: torch.Tensor) -> torch.Tensor:
    """Each element's 0-based place among the elements with its key, in their order."""
    order = torch.argsort(keys, stable=True)
    ordered = keys[order]
    index = torch.arange(len(keys))
    first = torch.ones(len(keys), dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    start = torch.cummax(torch.where(first, index, 0), dim=0).values
    rank = torch.empty_like(index)
    rank[order] = index - start
    return rank


def _within_group_pairs(keys: torch.Tensor, with_self: bool) -> int:
    """Ordered pairs (earlier, later) of elements sharing a key, each element with itself too when asked."""
    if keys.numel() == 0:
        return 0
    counts = torch.unique(keys, return_counts=True)[1]  # keys span documents x turns: no bincount
    return int((counts * (counts + 1 if with_self else counts - 1)).sum()) // 2


def lm_attention_pairs(batch: Microbatch, bidirectional_images: bool) -> int:
    """The (query, key) pairs the LM's attention mask allows, over all rows, padding excluded.

    The same rule as megavl.attention.mask.vlm_mask_mod, counted in O(b*s): a key
    of turn 0 is seen by every query of its document at or after it (and, when
    both are image tokens and images attend both ways, before it); a key of turn
    j > 0 only by the queries of turn j.
    """
    documents = batch["document_ids"]
    b, s = documents.shape
    documents = documents.reshape(-1).cpu()
    real = documents != PAD_DOCUMENT_ID
    if not bool(real.any()):
        return 0
    rows = torch.arange(b).repeat_interleave(s)[real]
    document = rows * (int(documents.max()) + 1) + documents[real]  # one key per (row, document)
    turn = batch["turn_ids"].reshape(-1).cpu()[real]
    image = batch["image_ids"].reshape(-1).cpu()[real] != TEXT_IMAGE_ID
    turn_key = document * (int(turn.max()) + 1) + turn  # one key per (row, document, turn)

    shared = turn == 0
    # The key itself and the later tokens of its document (document keys < b * s: bincount is small).
    tokens_from_here = torch.bincount(document)[document] - _rank_within(document)
    pairs = int(tokens_from_here[shared].sum()) + _within_group_pairs(turn_key[~shared], with_self=True)
    if bidirectional_images and bool(image.any()):
        # An image key of turn 0 is also seen by the earlier image tokens of its document;
        # one of turn j > 0 by the earlier image tokens of turn j.
        earlier_images = _rank_within(document[image])
        pairs += int(earlier_images[shared[image]].sum())
        pairs += _within_group_pairs(turn_key[image & ~shared], with_self=False)
    return pairs


def _pairs(grid_thw: torch.Tensor, extra_rows: int, window_side: int) -> tuple[int, int]:
    """(full, windowed) pairs over grids of (t, h, w) rows, each image with extra_rows more rows in
    full attention, windows of window_side rows a side (0: none)."""
    t, h, w = grid_thw.cpu().to(torch.int64).unbind(-1)
    full = int(((t * h * w + extra_rows) ** 2).sum())
    if not window_side:
        return full, full

    def squared_window_sides(n: torch.Tensor) -> torch.Tensor:
        # Whole windows of `side` patches, then the remainder at the image's edge.
        return (n // window_side) * window_side * window_side + (n % window_side) ** 2

    return full, int((t * squared_window_sides(h) * squared_window_sides(w)).sum())


def vision_attention_pairs(grid_thw: torch.Tensor, vision: VisionConfig) -> tuple[int, int]:
    """(pairs of one full-attention layer, pairs of one windowed layer) over the images of a microbatch.

    A tower with a class token (CLIP) attends over each image's patches and its class token; a
    compressing tower's (last) stage over each image's compressed tokens."""
    if grid_thw is None or len(grid_thw) == 0:
        return 0, 0
    traits = tower_traits(vision)
    if traits.compresses:
        grid_thw = grid_thw.clone()
        grid_thw[:, 1:] //= vision.spatial_merge_size
    side = vision.window_size // vision.patch_size if traits.windows else 0
    return _pairs(grid_thw, int(traits.class_token), side)


def window_stage_attention_pairs(grid_thw: torch.Tensor, vision: VisionConfig) -> tuple[int, int]:
    """(full, windowed) pairs of one layer of a compressing tower's window stage, over the patches."""
    if grid_thw is None or len(grid_thw) == 0:
        return 0, 0
    return _pairs(grid_thw, 0, vision.window_size // vision.patch_size)


@dataclass(frozen=True)
class _Trains:
    """Which weights take a gradient (train.parts, as megavl.models.parts.trains decides)."""

    patch_embedding: bool
    vision_layers: tuple[bool, ...]
    adapter: bool
    embeddings: bool
    lm: bool
    router: bool
    lora: bool
    output_layer: bool

    @classmethod
    def of(cls, config: Config) -> "_Trains":
        parts, v, lm = config.train.parts, config.model.vision, config.model.lm
        vision = parts.vision.train
        last = parts.vision_last_layers
        first_trained = 0 if last is None else v.num_layers - last
        return cls(
            patch_embedding=vision and first_trained <= 0,
            vision_layers=tuple(vision and i >= first_trained for i in range(v.num_layers)),
            adapter=parts.adapter.train,
            embeddings=parts.lm_embeddings.train,
            lm=parts.lm.train,
            router=parts.router.train,
            lora=parts.vision_lora.train and lm.vision_lora.enabled,
            # A tied output layer is the input embedding's weight.
            output_layer=parts.lm_embeddings.train if lm.tie_embeddings else parts.output_layer.train,
        )


class _Count:
    """Accumulates FLOPs per component while following which activations carry a gradient."""

    def __init__(self, lora_enabled: bool):
        self.flops = dict.fromkeys((f.name for f in dataclasses.fields(ModelFlops)), 0)
        self.lora_enabled = lora_enabled

    def linear(self, part: str, rows: int, fan_in: int, fan_out: int, grad: bool, trains: bool) -> bool:
        """Adds one linear layer; returns whether its output carries a gradient."""
        self.flops[part] += 2 * rows * fan_in * fan_out * (1 + grad + trains)
        return grad or trains

    def lora_linear(self, rows: int, fan_in: int, fan_out: int, rank: int, grad: bool, trains: bool,
                    lora_trains: bool) -> bool:
        """An LM linear with its vision LoRA (A: fan_in -> rank, B: rank -> fan_out) where one runs."""
        out = self.linear("lm", rows, fan_in, fan_out, grad, trains)
        if rank and self.lora_enabled:
            low = self.linear("vision_lora", rows, fan_in, rank, grad, lora_trains)
            out = self.linear("vision_lora", rows, rank, fan_out, low, lora_trains) or out
        return out

    def attention(self, part: str, pairs: int, width: int, grad: bool) -> None:
        """QK^T and AV over `pairs` for query heads of total width `width`; backward twice the forward."""
        self.flops[part] += 4 * pairs * width * (1 + 2 * grad)


def _vision_layers(count: _Count, v: VisionConfig, rows: int, h: int, ffn: int, pairs: list[int],
                   layer_trains: Sequence[bool], grad: bool) -> bool:
    """Vision layers of width h over `rows` rows, layer i attending over pairs[i] (heads of
    h / num_attention_heads, the tower's MLP kind); returns whether the output carries a gradient."""
    fc1_out = 2 * ffn if v.mlp == "swiglu" else ffn
    for attended, trains in zip(pairs, layer_trains, strict=True):
        # Each linear reads a norm's output, and the norm's weight trains with its layer.
        qkv = count.linear("vision", rows, h, 3 * h, grad or trains, trains)
        count.attention("vision_attention", attended, h, qkv)
        grad = count.linear("vision", rows, h, h, qkv, trains) or grad
        hidden = count.linear("vision", rows, h, fc1_out, grad or trains, trains)
        grad = count.linear("vision", rows, ffn, h, hidden, trains) or grad
    return grad


def _adapter_flops(count: _Count, config: Config, patches: int, grad: bool, trains: bool) -> bool:
    """The projector's linears (model.adapter.kind); returns whether its output carries a gradient."""
    a, v, lm = config.model.adapter, config.model.vision, config.model.lm
    merged = patches // v.spatial_merge_size**2
    merged_width = v.hidden_size * v.spatial_merge_size**2
    # megatron's linears compute their input's gradient whenever their backward runs, so the
    # first one does when the tower below trains or its own weights do.
    grad = grad or trains
    if a.kind == "pixel_shuffle":
        return count.linear("adapter", merged, merged_width, lm.hidden_size, grad, trains)
    ffn = adapter_ffn_hidden_size(config)
    if a.kind == "mlp":
        rows = tower_output_rows(patches, v)  # every patch, or every compressed token
        hidden = count.linear("adapter", rows, v.hidden_size, ffn, grad, trains)
        return count.linear("adapter", rows, ffn, lm.hidden_size, hidden, trains)
    hidden = count.linear("adapter", merged, merged_width, ffn, grad, trains)
    return count.linear("adapter", merged, ffn, lm.hidden_size, hidden, trains)


def microbatch_flops(batch: Microbatch, config: Config) -> ModelFlops:
    """The training FLOPs of one microbatch (see the module docstring for what counts)."""
    v, lm = config.model.vision, config.model.lm
    trains = _Trains.of(config)
    count = _Count(lm.vision_lora.enabled)

    grid = batch.get("image_grid_thw")
    has_images = grid is not None and len(grid) > 0
    image_grad = False
    if has_images:
        patches = int(grid.to(torch.int64).prod(dim=-1).sum())
        traits = tower_traits(v)
        patch_inputs = v.in_channels * v.temporal_patch_size * v.patch_size**2
        grad = False
        if traits.compresses:
            # The window stage over the patches, then the compressor; they train with the patch embedding.
            stage, stage_trains = v.window_stage, trains.patch_embedding
            grad = count.linear("vision", patches, patch_inputs, stage.hidden_size, False, stage_trains)
            full, windowed = window_stage_attention_pairs(grid, v)
            pairs = [windowed if i in window_stage_windowed_layers(v) else full for i in range(stage.num_layers)]
            grad = _vision_layers(count, v, patches, stage.hidden_size, stage.ffn_hidden_size, pairs,
                                  [stage_trains] * stage.num_layers, grad)
            tokens = tower_output_rows(patches, v)
            merged = stage.hidden_size * v.spatial_merge_size**2
            grad = count.linear("vision", tokens, merged, v.hidden_size, grad, stage_trains)
        else:
            grad = count.linear("vision", patches, patch_inputs, v.hidden_size, False, trains.patch_embedding)
            tokens = patches
        # The layers also run over the class tokens, one per image (CLIP).
        rows = tokens + len(grid) * int(traits.class_token)
        full, windowed = vision_attention_pairs(grid, v)
        pairs = [windowed if i in windowed_layers(v) else full for i in range(v.num_layers)]
        grad = _vision_layers(count, v, rows, v.hidden_size, v.ffn_hidden_size, pairs, trains.vision_layers, grad)
        image_grad = _adapter_flops(count, config, patches, grad, trains.adapter)

    b, s = batch["tokens"].shape
    rows = b * s
    h, heads = lm.hidden_size, lm.num_attention_heads
    width = heads * lm_head_dim(lm)
    qkv_out = width + 2 * lm.num_query_groups * lm_head_dim(lm)
    r_attn, r_mlp = lm.vision_lora.attn_rank, lm.vision_lora.mlp_rank
    moe = lm.moe
    pairs = lm_attention_pairs(batch, lm.image_attention == "bidirectional")
    # The decoder's input: the embedding lookup with the image embeddings scattered in.
    grad = trains.embeddings or image_grad
    for index in range(lm.num_layers):
        # As in the tower, each linear (and router) reads the output of a norm that trains with the LM.
        qkv = count.lora_linear(rows, h, qkv_out, r_attn, grad or trains.lm, trains.lm, trains.lora)
        count.attention("lm_attention", pairs, width, qkv)
        grad = count.lora_linear(rows, width, h, r_attn, qkv, trains.lm, trains.lora) or grad
        normed = grad or trains.lm
        if moe.num_experts and index not in moe.dense_layers:
            probs = count.linear("lm", rows, h, moe.num_experts, normed, trains.router)
            ffn = moe.ffn_hidden_size or lm.ffn_hidden_size
            expert_rows = moe.top_k * rows
            hidden = count.lora_linear(expert_rows, h, 2 * ffn, r_mlp, normed, trains.lm, trains.lora)
            # The routing probabilities scale the experts' activations before fc2.
            out = count.lora_linear(expert_rows, ffn, h, r_mlp, hidden or probs, trains.lm, trains.lora)
            if moe.shared_expert_ffn_hidden_size:
                shared = moe.shared_expert_ffn_hidden_size
                hidden = count.linear("lm", rows, h, 2 * shared, normed, trains.lm)
                out = count.linear("lm", rows, shared, h, hidden, trains.lm) or out
        else:
            hidden = count.lora_linear(rows, h, 2 * lm.ffn_hidden_size, r_mlp, normed, trains.lm, trains.lora)
            out = count.lora_linear(rows, lm.ffn_hidden_size, h, r_mlp, hidden, trains.lm, trains.lora)
        grad = grad or out
    # The output layer reads the final norm (an LM weight).
    count.linear("output_layer", rows, h, lm.vocab_size, grad or trains.lm, trains.output_layer)
    return ModelFlops(**count.flops)
