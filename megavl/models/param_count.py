"""Parameter counts per component computed from the config alone.

Used by ``--dry-run`` to size a model for a cluster without allocating it.
A test checks these formulas against a model that is actually built.
"""

from __future__ import annotations

from megavl.config import Config


def _attention_mlp_layer(
    hidden: int, heads: int, groups: int, ffn: int, qkv_bias: bool, linear_bias: bool, qk_norm: bool,
    norm_has_bias: bool = False, gated: bool = True,
) -> int:
    head_dim = hidden // heads
    qkv_out = (heads + 2 * groups) * head_dim
    count = 2 * hidden * (2 if norm_has_bias else 1)  # input and pre-MLP norms
    count += qkv_out * hidden + (qkv_out if qkv_bias else 0)
    count += heads * head_dim * hidden + (hidden if linear_bias else 0)
    fc1_out = 2 * ffn if gated else ffn  # a gated fc1 holds gate and up
    count += fc1_out * hidden + (fc1_out if linear_bias else 0)
    count += ffn * hidden + (hidden if linear_bias else 0)
    if qk_norm:
        count += 2 * head_dim
    return count


def total_parameter_counts(config: Config) -> dict[str, int]:
    """The whole model's parameters per component, unsharded (what all ranks hold together, once).

    What one rank holds of a built model is ``megavl.models.build.local_parameter_counts``.
    """
    v, a, lm = config.model.vision, config.model.adapter, config.model.lm
    patch = v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size
    vision = v.hidden_size * patch + v.num_layers * _attention_mlp_layer(
        v.hidden_size, v.num_attention_heads, v.num_attention_heads, v.ffn_hidden_size,
        qkv_bias=True, linear_bias=True, qk_norm=False,
        norm_has_bias=v.norm == "layernorm", gated=v.mlp == "swiglu",
    )
    merged = v.hidden_size * v.spatial_merge_size**2
    adapter_ffn = a.ffn_hidden_size or merged
    adapter_norm = v.hidden_size * (2 if v.norm == "layernorm" else 1)
    adapter = adapter_norm + merged * adapter_ffn + adapter_ffn + adapter_ffn * lm.hidden_size + lm.hidden_size
    language = lm.vocab_size * lm.hidden_size * (1 if lm.tie_embeddings else 2) + lm.hidden_size
    moe = lm.moe
    h = lm.hidden_size
    head_dim = h // lm.num_attention_heads
    qkv_out = (lm.num_attention_heads + 2 * lm.num_query_groups) * head_dim
    r_mlp, r_attn = lm.vision_lora.mlp_rank, lm.vision_lora.attn_rank
    attention_lora = r_attn * (h + qkv_out) + r_attn * (lm.num_attention_heads * head_dim + h)

    def mlp(ffn: int, lora: bool = True) -> int:
        weights = 3 * ffn * h
        return weights + (r_mlp * (h + 2 * ffn) + r_mlp * (ffn + h) if lora else 0)

    for layer in range(lm.num_layers):
        # The dense formula includes one MLP; MoE layers swap it for router + experts.
        language += _attention_mlp_layer(
            h, lm.num_attention_heads, lm.num_query_groups, lm.ffn_hidden_size,
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
