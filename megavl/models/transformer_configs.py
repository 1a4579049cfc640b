"""megavl's typed config -> megatron-core TransformerConfigs for the LM and the vision encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.activations import quick_gelu
from megatron.core.transformer.transformer_config import TransformerConfig

from megavl.config import Config, lm_head_dim
from megavl.platform import perf

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def params_dtype(config: Config) -> torch.dtype:
    return _DTYPES[config.train.dtype]


def _common(config: Config, fused_kernels: bool) -> dict:
    """fused_kernels: running on GPUs, where the fused kernels and on-device init exist."""
    dtype = params_dtype(config)
    return dict(
        tensor_model_parallel_size=config.parallel.tensor,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # megatron's own init runs (it also tags tensor-parallel weights, which the
        # gradient norm relies on); megavl.models.init then overwrites every weight
        # with a layout-independent value.
        use_cpu_initialization=not fused_kernels,
        perform_initialization=True,
        init_method_std=config.train.init_std,
        attention_dropout=0.0,
        # Fused kernels are CUDA-only (apex/TE/jit); on CPU the plain ops run. The ones with a
        # perf switch are set by megavl/platform/perf.py. The masked softmax is not megavl's
        # (its core attention is SDPA or FlexAttention).
        bias_activation_fusion=False,
        bias_dropout_fusion=fused_kernels,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        rotary_interleaved=False,
    )


def lm_transformer_config(config: Config, fused_kernels: bool = False) -> TransformerConfig:
    lm, p = config.model.lm, config.parallel
    first_stage = p.first_stage_lm_layers if p.pipeline > 1 else None
    fields = _common(config, fused_kernels)
    fields.update(perf.transformer_fields(config, "lm"))  # the fused kernels perf turns on
    return TransformerConfig(
        **fields,
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        num_attention_heads=lm.num_attention_heads,
        num_query_groups=lm.num_query_groups,
        ffn_hidden_size=lm.ffn_hidden_size,
        kv_channels=lm_head_dim(lm),
        layernorm_epsilon=lm.norm_eps,
        add_bias_linear=False,
        add_qkv_bias=lm.qkv_bias,
        qk_layernorm=lm.qk_layernorm,
        hidden_dropout=config.train.dropout,
        pipeline_model_parallel_size=p.pipeline,
        num_layers_in_first_pipeline_stage=first_stage,
        sequence_parallel=p.sequence_parallel,
        expert_model_parallel_size=p.expert,
        context_parallel_size=p.context,
        mrope_section=list(lm.mrope_section) if lm.rope == "mrope" else None,
        **_moe_fields(config),
        **fp8_fields(config, "lm"),
        # The loss is a sum over answer tokens; megatron divides the gradients by
        # the answer-token count of the whole step (all microbatches, all DP ranks).
        calculate_per_token_loss=True,
    )


def _moe_fields(config: Config) -> dict:
    lm, moe = config.model.lm, config.model.lm.moe
    if moe.num_experts == 0:
        return {}
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.top_k,
        moe_router_pre_softmax=not moe.normalize_top_k,
        moe_ffn_hidden_size=moe.ffn_hidden_size or lm.ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_layer_freq=[0 if i in moe.dense_layers else 1 for i in range(lm.num_layers)],
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_token_dispatcher_type=moe.dispatcher,
        # Dropless: every token reaches its top-k experts, however unbalanced.
        moe_expert_capacity_factor=None,
        moe_grouped_gemm=False,
        moe_router_dtype="fp32",
        expert_tensor_parallel_size=config.parallel.expert_tensor,
    )


def fp8_fields(config: Config, tower: str) -> dict:
    """megatron's FP8 fields for the "lm" or the "vision" TransformerConfig: none without train.fp8,
    and none for the vision tower without train.fp8_vision (its linears then run in bf16).

    megatron's Transformer Engine linears run FP8 GEMMs inside the FP8 region that
    TransformerBlock (the LM) or VisionEncoder.forward (the tower) enters from these fields.
    """
    t = config.train
    if t.fp8 is None or (tower == "vision" and not t.fp8_vision):
        return {}
    fields = dict(
        fp8=t.fp8,
        fp8_recipe=t.fp8_recipe,
        fp8_margin=t.fp8_margin,
        fp8_amax_history_len=t.fp8_amax_history_len,
        fp8_amax_compute_algo=t.fp8_amax_compute_algo,
    )
    if tower == "vision":
        # Delayed scaling all-reduces the amaxes when an FP8 region ends, over megatron's amax
        # group (every TP and DP rank of the stage). Only a microbatch with images runs the tower,
        # so ranks of different DP ranks would join different reductions; the TP ranks of one DP
        # rank always share their microbatch, so the tower's amaxes are reduced over TP only.
        fields["tp_only_amax_red"] = True
    return fields


# VisionConfig.norm / .mlp -> the TransformerConfig fields that select them. The
# normalization name is what Transformer Engine's fused norm+linear reads; the
# local spec swaps its norm module instead (megavl.models.vision.vision_layer_spec).
_VISION_NORMALIZATION = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation, as SigLIP's gelu_pytorch_tanh computes it."""
    return F.gelu(x, approximate="tanh")


_VISION_MLP = {
    "swiglu": dict(gated_linear_unit=True, activation_func=F.silu),
    "gelu_quick": dict(gated_linear_unit=False, activation_func=quick_gelu),
    "gelu_tanh": dict(gated_linear_unit=False, activation_func=gelu_tanh),
}


def vision_transformer_config(config: Config, fused_kernels: bool = False) -> TransformerConfig:
    v = config.model.vision
    return _vision_stage_config(config, fused_kernels, v.num_layers, v.hidden_size, v.num_attention_heads,
                                v.ffn_hidden_size)


def window_stage_transformer_config(config: Config, fused_kernels: bool = False) -> TransformerConfig:
    """The layers of a compression_first tower's window stage (model.vision.window_stage)."""
    s = config.model.vision.window_stage
    return _vision_stage_config(config, fused_kernels, s.num_layers, s.hidden_size, s.num_attention_heads,
                                s.ffn_hidden_size)


def _vision_stage_config(config: Config, fused_kernels: bool, layers: int, hidden: int, heads: int,
                         ffn: int) -> TransformerConfig:
    v = config.model.vision
    fields = _common(config, fused_kernels)
    fields.update(normalization=_VISION_NORMALIZATION[v.norm], **_VISION_MLP[v.mlp], **fp8_fields(config, "vision"),
                  **perf.transformer_fields(config, "vision"))
    return TransformerConfig(
        **fields,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=heads,
        ffn_hidden_size=ffn,
        kv_channels=hidden // heads,
        layernorm_epsilon=v.norm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        # The encoder lives whole on the first pipeline stage and its packed patch
        # sequence is not split across TP ranks.
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
    )
