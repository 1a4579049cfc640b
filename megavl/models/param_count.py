"""Parameter counts per component computed from the config alone.

Used by ``--dry-run`` to size a model for a cluster without allocating it.
A test checks these formulas against a model that is actually built.
"""

from __future__ import annotations

from megavl.config import Config


def _attention_mlp_layer(hidden: int, heads: int, groups: int, ffn: int, qkv_bias: bool, linear_bias: bool, qk_norm: bool) -> int:
    head_dim = hidden // heads
    qkv_out = (heads + 2 * groups) * head_dim
    count = 2 * hidden  # input and pre-MLP RMSNorm
    count += qkv_out * hidden + (qkv_out if qkv_bias else 0)
    count += heads * head_dim * hidden + (hidden if linear_bias else 0)
    count += 2 * ffn * hidden + (2 * ffn if linear_bias else 0)  # gated fc1 (gate and up)
    count += ffn * hidden + (hidden if linear_bias else 0)
    if qk_norm:
        count += 2 * head_dim
    return count


def parameter_counts(config: Config) -> dict[str, int]:
    v, a, lm = config.model.vision, config.model.adapter, config.model.lm
    patch = v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size
    vision = v.hidden_size * patch + v.num_layers * _attention_mlp_layer(
        v.hidden_size, v.num_attention_heads, v.num_attention_heads, v.ffn_hidden_size,
        qkv_bias=True, linear_bias=True, qk_norm=False,
    )
    merged = v.hidden_size * v.spatial_merge_size**2
    adapter_ffn = a.ffn_hidden_size or merged
    adapter = v.hidden_size + merged * adapter_ffn + adapter_ffn + adapter_ffn * lm.hidden_size + lm.hidden_size
    language = lm.vocab_size * lm.hidden_size * (1 if lm.tie_embeddings else 2) + lm.hidden_size
    language += lm.num_layers * _attention_mlp_layer(
        lm.hidden_size, lm.num_attention_heads, lm.num_query_groups, lm.ffn_hidden_size,
        qkv_bias=lm.qkv_bias, linear_bias=False, qk_norm=lm.qk_layernorm,
    )
    return {"vision": vision, "adapter": adapter, "language_model": language}
