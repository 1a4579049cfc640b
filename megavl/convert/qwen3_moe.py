"""The Qwen3-MoE language model's config.json (Qwen3MoeConfig) <-> megavl's MoE LM.

Qwen3-MoE: no q/k/v biases, RMSNorm on each query and key head (q_norm /
k_norm -> megatron's q_layernorm / k_layernorm), 1-D RoPE, and per layer either
a dense SwiGLU MLP (`mlp_only_layers`, `decoder_sparse_step`) or a sparse block
of a softmax router (`mlp.gate`) and SwiGLU experts. Checkpoints store every
expert's gate/up/down projection as its own tensor
(`mlp.experts.{e}.gate_proj.weight`), although transformers stacks them into
one parameter once loaded; the mappings are qwen_lm's.

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
from megavl.convert import qwen_lm
from megavl.convert.fields import Field, FieldTable
from megavl.convert.tokens import TEXT_TOKEN_KEYS, pick_token_ids

NAME = "Qwen3MoeForCausalLM"
MODEL_TYPE = "qwen3_moe"

# megavl's MoEConfig fields and Qwen3MoeConfig's of the same meaning.
MOE_FIELDS = FieldTable(
    Field("num_experts", "num_experts"),
    Field("top_k", "num_experts_per_tok"),
    Field("ffn_hidden_size", "moe_intermediate_size"),
    Field("aux_loss_coeff", "router_aux_loss_coef", float),
    Field("normalize_top_k", "norm_topk_prob", bool),
)


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
    rope = qwen_lm.check_text_config(c, "", ("default",), problems)
    if getattr(c, "attention_bias", False):
        problems.append("attention_bias = true: megavl's Qwen3-MoE LM has no q/k/v/o biases (valid: false)")
    if c.num_experts and c.num_experts_per_tok > c.num_experts:
        problems.append(f"num_experts_per_tok = {c.num_experts_per_tok}: more than num_experts = {c.num_experts}")
    if image_token_id >= c.vocab_size:
        problems.append(
            f"image_token_id = {image_token_id} (from the vision checkpoint) is outside the LM's "
            f"vocab_size = {c.vocab_size}"
        )
    moe = MoEConfig()
    if c.num_experts:
        moe = dataclasses.replace(moe, **MOE_FIELDS.from_hf(c), dense_layers=dense_layers(c))
    return dataclasses.replace(
        LMConfig(),
        **qwen_lm.lm_fields_from_hf(c, rope, bool(c.tie_word_embeddings), image_token_id),
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
    return problems


def hf_config_fields(config: Config, token_ids: dict, base: Optional[dict]) -> dict:
    """Qwen3MoeConfig's fields for config's LM. Token ids come from a tokenizer (token_ids)
    or the imported config.json (base); megavl does not model them, and has no defaults
    for a text-only model's."""
    lm = config.model.lm
    moe = lm.moe
    fields = {**qwen_lm.lm_fields_to_hf(lm, mrope=False), **MOE_FIELDS.to_hf(moe)}
    fields.update(
        tie_word_embeddings=lm.tie_embeddings,
        attention_bias=False,
        # A dense model still needs a valid top k.
        num_experts_per_tok=moe.top_k if moe.num_experts else 1,
        moe_intermediate_size=moe.ffn_hidden_size or lm.ffn_hidden_size,
        # Which layers are dense is said by mlp_only_layers alone.
        decoder_sparse_step=1,
        mlp_only_layers=list(moe.dense_layers),
    )
    fields.update(pick_token_ids(TEXT_TOKEN_KEYS, token_ids, base or {}, {}))
    return fields
