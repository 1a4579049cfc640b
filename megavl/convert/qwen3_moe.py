"""The Qwen3-MoE language model (Qwen3MoeForCausalLM) <-> megavl's MoE LM.

Qwen3-MoE: no q/k/v biases, RMSNorm on each query and key head (q_norm /
k_norm -> megatron's q_layernorm / k_layernorm), 1-D RoPE, and per layer either
a dense SwiGLU MLP (`mlp_only_layers`, `decoder_sparse_step`) or a sparse block
of a softmax router (`mlp.gate`) and SwiGLU experts. Checkpoints store every
expert's gate/up/down projection as its own tensor
(`mlp.experts.{e}.gate_proj.weight`), although transformers stacks them into
one parameter once loaded.

Routing: Hugging Face takes softmax over all experts, keeps the top k and,
with `norm_topk_prob`, divides them by their sum. megavl's router is
megatron's TopKRouter: with `model.lm.moe.normalize_top_k` (megatron's
`moe_router_pre_softmax = False`) it takes the top k of the logits and a
softmax over those k, the same renormalised distribution; without it
(`moe_router_pre_softmax = True`) a softmax over all experts and then the
top k, as Hugging Face does without `norm_topk_prob`.

The vision tower and adapter come from a Qwen2.5-VL checkpoint (see
megavl.convert.pairing); this module only knows the language model.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megavl.config import Config, LMConfig, MoEConfig
from megavl.convert import qwen_common as common
from megavl.convert.mapping import QKV, Direct, GatedMLP, Mapping, MegavlOnly, Replicated

NAME = "Qwen3MoeForCausalLM"
MODEL_TYPE = "qwen3_moe"

_LM = "language_model.decoder.layers.*."
_HF = "model.layers.*."
_EXPERT = _LM + "mlp.experts.local_experts.*."
_HF_EXPERT = _HF + "mlp.experts.*."
_LORA_LINEARS = (
    _LM + "self_attention.linear_qkv",
    _LM + "self_attention.linear_proj",
    _LM + "mlp.linear_fc1",
    _LM + "mlp.linear_fc2",
    _EXPERT + "linear_fc1",
    _EXPERT + "linear_fc2",
)


def config_class():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig


def model_class():
    from transformers import Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM


def lm_mappings(config: Config) -> list[Mapping]:
    lm = config.model.lm
    mappings: list[Mapping] = [
        Direct("language_model.embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        Replicated(_LM + "input_layernorm.weight", _HF + "input_layernorm.weight"),
        QKV(_LM + "self_attention.linear_qkv.weight", _HF + "self_attn.q_proj.weight",
            _HF + "self_attn.k_proj.weight", _HF + "self_attn.v_proj.weight",
            lm.num_attention_heads, lm.num_query_groups),
        Replicated(_LM + "self_attention.q_layernorm.weight", _HF + "self_attn.q_norm.weight"),
        Replicated(_LM + "self_attention.k_layernorm.weight", _HF + "self_attn.k_norm.weight"),
        Direct(_LM + "self_attention.linear_proj.weight", _HF + "self_attn.o_proj.weight"),
        Replicated(_LM + "pre_mlp_layernorm.weight", _HF + "post_attention_layernorm.weight"),
        # Dense layers (mlp_only_layers).
        GatedMLP(_LM + "mlp.linear_fc1.weight", _HF + "mlp.gate_proj.weight", _HF + "mlp.up_proj.weight"),
        Direct(_LM + "mlp.linear_fc2.weight", _HF + "mlp.down_proj.weight"),
        # Sparse layers: the router is whole on every tensor-parallel rank.
        Replicated(_LM + "mlp.router.weight", _HF + "mlp.gate.weight"),
        GatedMLP(_EXPERT + "linear_fc1.weight", _HF_EXPERT + "gate_proj.weight", _HF_EXPERT + "up_proj.weight"),
        Direct(_EXPERT + "linear_fc2.weight", _HF_EXPERT + "down_proj.weight"),
        Replicated("language_model.decoder.final_layernorm.weight", "model.norm.weight"),
    ]
    if not config.model.lm.tie_embeddings:
        mappings.append(Direct("language_model.output_layer.weight", "lm_head.weight"))
    # Vision-only LoRA adapters act on image tokens, which a text-only LM never sees.
    mappings += [MegavlOnly(f"{linear}.{part}") for linear in _LORA_LINEARS for part in ("lora_a", "lora_b")]
    return mappings


def ignorable_hf_tensors(config: Config) -> tuple[str, ...]:
    return ("lm_head.weight",) if config.model.lm.tie_embeddings else ()


def dense_layers(hf_config) -> list[int]:
    """The layers Hugging Face builds with a dense MLP (Qwen3MoeDecoderLayer's rule)."""
    step = hf_config.decoder_sparse_step or 1
    only = set(hf_config.mlp_only_layers or [])
    if not hf_config.num_experts:
        return []
    return [i for i in range(hf_config.num_hidden_layers) if i in only or (i + 1) % step != 0]


def lm_config(hf_config, image_token_id: int, problems: list[str]) -> LMConfig:
    """megavl's LMConfig reproducing a Qwen3MoeConfig; what it cannot reproduce goes to problems."""
    c = hf_config
    if c.hidden_act != "silu":
        problems.append(f"hidden_act = {c.hidden_act!r}: megavl's LM MLP is SwiGLU (silu)")
    if getattr(c, "use_sliding_window", False):
        problems.append("use_sliding_window = true: megavl's LM has no sliding-window attention")
    if getattr(c, "attention_bias", False):
        problems.append("attention_bias = true: megavl's Qwen3-MoE LM has no q/k/v/o biases (valid: false)")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        problems.append(
            f"head_dim = {head_dim}: megavl's attention needs head_dim * num_attention_heads = hidden_size "
            f"(valid: {c.hidden_size // c.num_attention_heads})"
        )
    rope = dict(getattr(c, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope_parameters.rope_type = {rope_type!r}: only default RoPE is supported (valid: 'default')")
    if c.num_experts and c.num_experts_per_tok > c.num_experts:
        problems.append(f"num_experts_per_tok = {c.num_experts_per_tok}: more than num_experts = {c.num_experts}")
    if image_token_id >= c.vocab_size:
        problems.append(
            f"image_token_id = {image_token_id} (from the vision checkpoint) is outside the LM's "
            f"vocab_size = {c.vocab_size}"
        )
    defaults = LMConfig()
    moe = MoEConfig()
    if c.num_experts:
        moe = dataclasses.replace(
            moe,
            num_experts=c.num_experts,
            top_k=c.num_experts_per_tok,
            ffn_hidden_size=c.moe_intermediate_size,
            dense_layers=dense_layers(c),
            aux_loss_coeff=float(c.router_aux_loss_coef),
            normalize_top_k=bool(c.norm_topk_prob),
        )
    return dataclasses.replace(
        defaults,
        **common.hf_lm_shape(c, rope, bool(c.tie_word_embeddings), image_token_id),
        qkv_bias=False,
        qk_layernorm=True,
        # Qwen3 rotates by one position per token; "1d" reproduces it for every input.
        rope="1d",
        moe=moe,
    )


def export_problems(config: Config) -> list[str]:
    """Why megavl's LM cannot be written as a Qwen3MoeForCausalLM; empty when it can."""
    lm, problems = config.model.lm, []
    if lm.qkv_bias:
        problems.append("model.lm.qkv_bias = true: Qwen3-MoE has no q/k/v biases")
    if not lm.qk_layernorm:
        problems.append("model.lm.qk_layernorm = false: Qwen3-MoE normalises every query and key head")
    if lm.moe.shared_expert_ffn_hidden_size is not None:
        problems.append(
            f"model.lm.moe.shared_expert_ffn_hidden_size = {lm.moe.shared_expert_ffn_hidden_size}: "
            "Qwen3-MoE has no shared expert (valid: null)"
        )
    if lm.hidden_size % lm.num_attention_heads:
        problems.append("model.lm.hidden_size must be a multiple of num_attention_heads")
    return problems


def hf_config(config: Config, base: Optional[dict] = None):
    """A Qwen3MoeConfig for config's LM. Token ids come from base (the imported
    config.json) when given; megavl does not model them."""
    lm = config.model.lm
    moe = lm.moe
    tokens = {k: base[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if base and k in base}
    fields = dict(
        vocab_size=lm.vocab_size,
        hidden_size=lm.hidden_size,
        intermediate_size=lm.ffn_hidden_size,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_attention_heads,
        num_key_value_heads=lm.num_query_groups,
        head_dim=lm.hidden_size // lm.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=lm.max_position_embeddings,
        rms_norm_eps=lm.norm_eps,
        tie_word_embeddings=lm.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": lm.rope_theta},
        attention_bias=False,
        use_sliding_window=False,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k if moe.num_experts else 1,
        moe_intermediate_size=moe.ffn_hidden_size or lm.ffn_hidden_size,
        norm_topk_prob=moe.normalize_top_k,
        decoder_sparse_step=1,
        mlp_only_layers=list(moe.dense_layers),
        router_aux_loss_coef=moe.aux_loss_coeff,
        **tokens,
    )
    hf = config_class()(**fields)
    hf.architectures = [NAME]
    return hf
