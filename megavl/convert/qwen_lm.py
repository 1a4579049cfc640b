"""The Qwen language models (Qwen2's of Qwen2-VL / Qwen2.5-VL, and Qwen3-MoE) <-> megavl's LM.

One mapping list covers both: which tensors a model has follows its
config.model.lm (q/k/v biases for Qwen2, q/k norms and experts for
Qwen3-MoE). One field table (LM_FIELDS) gives the config.json fields both
directions read. What differs between the two config.json layouts (Qwen2's
fields sit in text_config and use multimodal RoPE) is passed in by the
descriptions.

Hugging Face names here are the saved (safetensors) names, which differ from the
names of the loaded modules (transformers renames on load).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from megavl.config import Config, LMConfig, lm_head_dim
from megavl.convert.fields import Field, FieldTable
from megavl.convert.mapping import QKV, Direct, GatedMLP, Mapping, MegavlOnly, Replicated, SharedLoRAInput

_LM = "language_model.decoder.layers.*."
_HF = "model.layers.*."
_ATTN = _HF + "self_attn."
_EXPERT = _LM + "mlp.experts.local_experts.*."
_HF_EXPERT = _HF + "mlp.experts.*."
# The linears megavl's vision-only LoRA adapts.
_ADAPTED = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
_ADAPTED_EXPERT = ("linear_fc1", "linear_fc2")

CAUSAL_NOTE = (
    "model.lm.image_attention = causal: Hugging Face's Qwen models attend causally over image "
    "tokens; megavl's default (bidirectional) would change the logits"
)
LORA_NOTE = (
    "model.lm.vision_lora.mlp_rank = attn_rank = 0: the Hugging Face model has no vision-only "
    "LoRA adapters"
)

# megavl's LMConfig fields and the text config's fields of the same meaning.
LM_FIELDS = FieldTable(
    Field("num_layers", "num_hidden_layers"),
    Field("hidden_size", "hidden_size"),
    Field("num_attention_heads", "num_attention_heads"),
    Field("num_query_groups", "num_key_value_heads"),
    Field("ffn_hidden_size", "intermediate_size"),
    Field("vocab_size", "vocab_size"),
    Field("norm_eps", "rms_norm_eps", float),
    Field("max_position_embeddings", "max_position_embeddings"),
)


# ---------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------


def lm_mappings(config: Config, with_lora: bool = False) -> list[Mapping]:
    """The LM's mappings. with_lora: the vision-only LoRA adapters map to the lora_a / lora_b
    of megavl's remote-code class; without, they have no Hugging Face counterpart."""
    lm = config.model.lm
    heads, groups = lm.num_attention_heads, lm.num_query_groups
    mappings: list[Mapping] = [
        Direct("language_model.embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        Replicated(_LM + "input_layernorm.weight", _HF + "input_layernorm.weight"),
        QKV(_LM + "self_attention.linear_qkv.weight", _ATTN + "q_proj.weight",
            _ATTN + "k_proj.weight", _ATTN + "v_proj.weight", heads, groups),
    ]
    if lm.qkv_bias:
        mappings.append(QKV(_LM + "self_attention.linear_qkv.bias", _ATTN + "q_proj.bias",
                            _ATTN + "k_proj.bias", _ATTN + "v_proj.bias", heads, groups))
    if lm.qk_layernorm:
        mappings += [
            Replicated(_LM + "self_attention.q_layernorm.weight", _ATTN + "q_norm.weight"),
            Replicated(_LM + "self_attention.k_layernorm.weight", _ATTN + "k_norm.weight"),
        ]
    mappings += [
        Direct(_LM + "self_attention.linear_proj.weight", _ATTN + "o_proj.weight"),
        Replicated(_LM + "pre_mlp_layernorm.weight", _HF + "post_attention_layernorm.weight"),
        # Dense layers (every layer of a dense LM, mlp_only_layers of a MoE one).
        GatedMLP(_LM + "mlp.linear_fc1.weight", _HF + "mlp.gate_proj.weight", _HF + "mlp.up_proj.weight"),
        Direct(_LM + "mlp.linear_fc2.weight", _HF + "mlp.down_proj.weight"),
    ]
    if lm.moe.num_experts:
        mappings += [
            # The router is whole on every tensor-parallel rank.
            Replicated(_LM + "mlp.router.weight", _HF + "mlp.gate.weight"),
            GatedMLP(_EXPERT + "linear_fc1.weight", _HF_EXPERT + "gate_proj.weight", _HF_EXPERT + "up_proj.weight"),
            Direct(_EXPERT + "linear_fc2.weight", _HF_EXPERT + "down_proj.weight"),
        ]
    mappings.append(Replicated("language_model.decoder.final_layernorm.weight", "model.norm.weight"))
    if not lm.tie_embeddings:
        mappings.append(Direct("language_model.output_layer.weight", "lm_head.weight"))
    if with_lora:
        return mappings + lora_mappings(config)
    # Without a Hugging Face counterpart; the descriptions' export_problems refuse a
    # model in which they change the outputs.
    adapted = [_LM + linear for linear in _ADAPTED]
    if lm.moe.num_experts:
        adapted += [_EXPERT + linear for linear in _ADAPTED_EXPERT]
    return mappings + [MegavlOnly(f"{linear}.{part}") for linear in adapted for part in ("lora_a", "lora_b")]


def lora_mappings(config: Config) -> list[Mapping]:
    """Vision-only LoRA adapters <-> the lora_a / lora_b of megavl's remote-code model class."""
    lm = config.model.lm
    heads, groups = lm.num_attention_heads, lm.num_query_groups
    return [
        SharedLoRAInput(_LM + "self_attention.linear_qkv.lora_a",
                        _ATTN + "q_proj.lora_a", _ATTN + "k_proj.lora_a", _ATTN + "v_proj.lora_a"),
        QKV(_LM + "self_attention.linear_qkv.lora_b",
            _ATTN + "q_proj.lora_b", _ATTN + "k_proj.lora_b", _ATTN + "v_proj.lora_b", heads, groups),
        Direct(_LM + "self_attention.linear_proj.lora_a", _ATTN + "o_proj.lora_a"),
        Direct(_LM + "self_attention.linear_proj.lora_b", _ATTN + "o_proj.lora_b"),
        SharedLoRAInput(_LM + "mlp.linear_fc1.lora_a", _HF + "mlp.gate_proj.lora_a", _HF + "mlp.up_proj.lora_a"),
        GatedMLP(_LM + "mlp.linear_fc1.lora_b", _HF + "mlp.gate_proj.lora_b", _HF + "mlp.up_proj.lora_b"),
        Direct(_LM + "mlp.linear_fc2.lora_a", _HF + "mlp.down_proj.lora_a"),
        Direct(_LM + "mlp.linear_fc2.lora_b", _HF + "mlp.down_proj.lora_b"),
    ]


def ignorable_hf_tensors(config: Config) -> tuple[str, ...]:
    # A tied model's head is the embedding; some checkpoints store it anyway.
    return ("lm_head.weight",) if config.model.lm.tie_embeddings else ()


# ---------------------------------------------------------------------------
# config.json -> megavl
# ---------------------------------------------------------------------------


# What megatron-core's Llama 3 RoPE scaling fixes (RotaryEmbedding._apply_scaling); only the
# factor is a model.lm field (rope_scaling_factor).
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.0}


def check_text_config(text, where: str, rope_types: Sequence[str], problems: list[str]) -> dict:
    """What every Qwen text config must satisfy for megavl's LM; where prefixes the field
    names in messages ("text_config." or ""). Returns the config's rope_parameters."""
    if text.hidden_act != "silu":
        problems.append(f"{where}hidden_act = {text.hidden_act!r}: megavl's LM MLP is SwiGLU (silu)")
    if getattr(text, "use_sliding_window", False):
        problems.append(f"{where}use_sliding_window = true: megavl's LM has no sliding-window attention")
    rope = dict(getattr(text, "rope_parameters", None) or {})
    rope_type = rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in rope_types:
        problems.append(
            f"{where}rope_parameters.rope_type = {rope_type!r}: megavl reproduces "
            f"{', '.join(repr(t) for t in rope_types)} RoPE for this model"
        )
    elif rope_type == "llama3":
        for name, fixed in LLAMA3_FIXED.items():
            if float(rope.get(name, fixed)) != fixed:
                problems.append(
                    f"{where}rope_parameters.{name} = {rope[name]}: megatron-core's Llama 3 scaling fixes it at "
                    f"{fixed:g} (valid: {fixed:g})"
                )
    return rope


def lm_fields_from_hf(text, rope: dict, tie_embeddings: bool, image_token_id: int) -> dict:
    """LMConfig fields every Qwen text config gives the same way.

    The imported model attends causally over images and has no vision adapters,
    as the Hugging Face model it reproduces.
    """
    defaults = LMConfig()
    fields = LM_FIELDS.from_hf(text)
    # Without num_key_value_heads, every query head has its own key/value head.
    fields["num_query_groups"] = fields["num_query_groups"] or text.num_attention_heads
    # A head width set apart from hidden_size / num_attention_heads (Qwen3) is kept; the derived
    # one stays null, so the config reads as the model's.
    head_dim = getattr(text, "head_dim", None)
    derived = text.hidden_size // text.num_attention_heads
    return dict(
        fields,
        head_dim=head_dim if head_dim and head_dim != derived else None,
        rope_theta=float(rope.get("rope_theta", defaults.rope_theta)),
        rope_scaling_factor=float(rope["factor"]) if rope.get("rope_type") == "llama3" else None,
        tie_embeddings=tie_embeddings,
        image_attention="causal",
        image_token_id=image_token_id,
        vision_lora=dataclasses.replace(defaults.vision_lora, mlp_rank=0, attn_rank=0),
    )


# ---------------------------------------------------------------------------
# megavl -> config.json
# ---------------------------------------------------------------------------


def lm_fields_to_hf(lm: LMConfig, mrope: bool) -> dict:
    """The text config's fields for megavl's LM that every Qwen text config has;
    mrope: its RoPE is multimodal (Qwen2-VL's and Qwen2.5-VL's)."""
    rope = {"rope_type": "default", "rope_theta": lm.rope_theta}
    if lm.rope_scaling_factor is not None:
        rope.update(LLAMA3_FIXED, rope_type="llama3", factor=lm.rope_scaling_factor,
                    original_max_position_embeddings=int(LLAMA3_FIXED["original_max_position_embeddings"]))
    if mrope:
        rope["mrope_section"] = list(lm.mrope_section)
    return dict(LM_FIELDS.to_hf(lm), head_dim=lm_head_dim(lm), hidden_act="silu", use_sliding_window=False,
                rope_parameters=rope)
