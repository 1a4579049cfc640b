"""Parameter counts per component computed from the config alone.

Used by ``--dry-run`` to size a model for a cluster without allocating it.
A test checks these formulas against a model that is actually built.
"""

from __future__ import annotations

from megavl.config import Config, lm_head_dim
from megavl.config.towers import (
    adapter_ffn_hidden_size, adapter_norm, position_grid_side, tower_traits, window_stage_grid_side,
)


def _attention_mlp_layer(
    hidden: int, heads: int, groups: int, head_dim: int, ffn: int, qkv_bias: bool, linear_bias: bool,
    qk_norm: bool,
) -> int:
    """One LM layer with RMSNorms and a gated (SwiGLU) MLP."""
    qkv_out = (heads + 2 * groups) * head_dim
    count = 2 * hidden  # input and pre-MLP norms
    count += qkv_out * hidden + (qkv_out if qkv_bias else 0)
    count += heads * head_dim * hidden + (hidden if linear_bias else 0)
    fc1_out = 2 * ffn  # the gated fc1 holds gate and up
    count += fc1_out * hidden + (fc1_out if linear_bias else 0)
    count += ffn * hidden + (hidden if linear_bias else 0)
    if qk_norm:
        count += 2 * head_dim
    return count


# (name, unsharded count, how tensor parallelism splits it: "replicated" or "tensor").
Piece = tuple[str, int, str]


def _vision_layer_pieces(v, n: int, h: int, ffn: int, label: str) -> list[Piece]:
    """n vision layers of width h and MLP width ffn (the tower's norm and MLP kinds)."""
    norm = 2 * h if v.norm == "layernorm" else h
    fc1_out = 2 * ffn if v.mlp == "swiglu" else ffn
    return [
        (f"{label}{n} layers: norms", n * 2 * norm, "replicated"),
        (f"{label}{n} layers: qkv weight + bias", n * (3 * h * h + 3 * h), "tensor"),
        (f"{label}{n} layers: attention output weight", n * h * h, "tensor"),
        (f"{label}{n} layers: attention output bias", n * h, "replicated"),
        (f"{label}{n} layers: fc1 weight + bias", n * (fc1_out * h + fc1_out), "tensor"),
        (f"{label}{n} layers: fc2 weight", n * ffn * h, "tensor"),
        (f"{label}{n} layers: fc2 bias", n * h, "replicated"),
    ]


def vision_parameter_pieces(config: Config) -> list[Piece]:
    """The vision tower's parameters, by what holds them (model.vision.kind decides which exist)."""
    v = config.model.vision
    traits = tower_traits(v)
    h = v.hidden_size
    layer_norm = 2 * h  # LayerNorm: weight and bias
    patch = v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size
    # A compressing tower embeds its patches at its window stage's width.
    embed = v.window_stage.hidden_size if traits.compresses else h
    pieces: list[Piece] = [("patch embedding", embed * patch + (embed if traits.patch_bias else 0), "replicated")]
    if traits.compresses:
        stage, side = v.window_stage, window_stage_grid_side(v)
        pieces.append(("window stage: position embedding", side * side * stage.hidden_size, "replicated"))
        pieces += _vision_layer_pieces(v, stage.num_layers, stage.hidden_size, stage.ffn_hidden_size,
                                       "window stage: ")
        merged = stage.hidden_size * v.spatial_merge_size**2
        # A column-parallel linear: its bias is split with its columns.
        pieces.append(("compressor weight + bias", merged * h + h, "tensor"))
    if traits.positions == "learned":
        side = position_grid_side(v)
        rows = side * side + int(traits.class_token)
        pieces.append(("position embedding", rows * h, "replicated"))
        if traits.class_token:
            pieces.append(("class embedding", h, "replicated"))
    if traits.pre_norm:
        pieces.append(("pre-layer norm", layer_norm, "replicated"))
    pieces += _vision_layer_pieces(v, v.num_layers, h, v.ffn_hidden_size, "")
    if v.post_norm:
        pieces.append(("post-layer norm", layer_norm, "replicated"))
    return pieces


def adapter_parameter_pieces(config: Config) -> list[Piece]:
    """The projector's parameters (model.adapter.kind, megavl/models/adapter.py)."""
    a, v, lm = config.model.adapter, config.model.vision, config.model.lm
    h, out = v.hidden_size, lm.hidden_size
    merged = h * v.spatial_merge_size**2
    norm = adapter_norm(a)
    pieces: list[Piece] = []
    if a.kind == "merge_mlp":
        pieces.append(("norm", h * (2 if v.norm == "layernorm" else 1), "replicated"))
    elif norm != "none":
        pieces.append((f"norm ({norm})", 2 * (h if norm == "before" else out), "replicated"))
    bias = int(a.bias)
    if a.kind == "pixel_shuffle":
        # One column-parallel linear: its bias is split with its columns.
        pieces.append(("linear weight" + (" + bias" if bias else ""), merged * out + bias * out, "tensor"))
        return pieces
    width = merged if a.kind == "merge_mlp" else h
    ffn = adapter_ffn_hidden_size(config)
    pieces += [
        ("fc1 weight" + (" + bias" if bias else ""), width * ffn + bias * ffn, "tensor"),
        ("fc2 weight", ffn * out, "tensor"),
    ]
    if bias:
        pieces.append(("fc2 bias", out, "replicated"))  # row-parallel: added once, after the reduce
    return pieces


def total_parameter_counts(config: Config) -> dict[str, int]:
    """The whole model's parameters per component, unsharded (what all ranks hold together, once).

    What one rank holds of a built model is ``megavl.models.build.local_parameter_counts``.
    """
    lm = config.model.lm
    vision = sum(count for _, count, _ in vision_parameter_pieces(config))
    adapter = sum(count for _, count, _ in adapter_parameter_pieces(config))
    language = lm.vocab_size * lm.hidden_size * (1 if lm.tie_embeddings else 2) + lm.hidden_size
    moe = lm.moe
    h = lm.hidden_size
    head_dim = lm_head_dim(lm)
    qkv_out = (lm.num_attention_heads + 2 * lm.num_query_groups) * head_dim
    r_mlp, r_attn = lm.vision_lora.mlp_rank, lm.vision_lora.attn_rank
    attention_lora = r_attn * (h + qkv_out) + r_attn * (lm.num_attention_heads * head_dim + h)

    def mlp(ffn: int, lora: bool = True) -> int:
        weights = 3 * ffn * h
        return weights + (r_mlp * (h + 2 * ffn) + r_mlp * (ffn + h) if lora else 0)

    for layer in range(lm.num_layers):
        # The dense formula includes one MLP; MoE layers swap it for router + experts.
        language += _attention_mlp_layer(
            h, lm.num_attention_heads, lm.num_query_groups, head_dim, lm.ffn_hidden_size,
            qkv_bias=lm.qkv_bias, linear_bias=False, qk_norm=lm.qk_layernorm,
        ) + attention_lora
        if moe.num_experts and layer not in moe.dense_layers:
            language -= 3 * lm.ffn_hidden_size * h
            language += moe.num_experts * h  # router
            language += moe.num_experts * mlp(moe.ffn_hidden_size or lm.ffn_hidden_size)
            if moe.shared_expert_ffn_hidden_size:
                language += mlp(moe.shared_expert_ffn_hidden_size, lora=False)
        else:
            language += mlp(lm.ffn_hidden_size) - 3 * lm.ffn_hidden_size * h
    return {"vision": vision, "adapter": adapter, "language_model": language}


def active_language_model_parameters(config: Config) -> int:
    """LM parameters one token passes through: experts beyond its top-k are not counted."""
    lm, moe = config.model.lm, config.model.lm.moe
    total = total_parameter_counts(config)["language_model"]
    if not moe.num_experts:
        return total
    h, ffn = lm.hidden_size, moe.ffn_hidden_size or lm.ffn_hidden_size
    r = lm.vision_lora.mlp_rank
    per_expert = 3 * ffn * h + r * (h + 2 * ffn) + r * (ffn + h)
    moe_layers = lm.num_layers - len(set(moe.dense_layers))
    return total - moe_layers * (moe.num_experts - moe.top_k) * per_expert
