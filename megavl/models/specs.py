"""ModuleSpecs for megavl's transformer layers: local (CPU) or Transformer Engine (GPU).

Both the vision encoder and the language model are megatron-core
``TransformerLayer``s; only the spec decides which linear, norm and attention
implementations they are built from. Checkpoint keys are the same for both
(the local spec maps its separate norms onto TE's fused names), so a checkpoint
trained on GPUs loads on a laptop and back. TE's modules also save an
``_extra_state`` (FP8 scaling metadata) that megavl's norms lack; loading leaves
it at its initial value when a checkpoint has none (training/checkpoint.py).

Vision-only LoRA reaches its linears and MoE layers through the specs' params
(a ``VisionLoRA`` per linear, ``carry_vision_flags`` for the MoE layer and its
experts), never through megatron's TransformerConfig.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megavl.attention.core_attention import core_attention_class
from megavl.models.moe import (
    MegavlRouter,
    MegavlSequentialMLP,
    VisionAwareMoELayer,
    VisionAwareSequentialMLP,
)
from megavl.models.vision_lora import (
    VisionLoRA,
    VisionLoRAColumnParallelLinear,
    VisionLoRAGatedColumnParallelLinear,
    VisionLoRARowParallelLinear,
    VisionLoRASettings,
)
from megavl.models.norm import RMSNorm

# The local spec's norms are stored under Transformer Engine's fused-norm names.
_LOCAL_TO_TE_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def _lora_linear(module: type, lora: VisionLoRA) -> ModuleSpec:
    # A ModuleSpec is callable too, so this also serves where megatron calls the
    # submodule directly (SelfAttention's linear_qkv) instead of build_module.
    return ModuleSpec(module=module, params={"lora": lora})


def _local_linears(lora: Optional[VisionLoRA] = None) -> MLPSubmodules:
    """fc1 and fc2 of a (gated) MLP; with an adapter of the given shape when lora is given."""
    if lora is not None:
        return MLPSubmodules(
            linear_fc1=_lora_linear(VisionLoRAGatedColumnParallelLinear, lora),
            linear_fc2=_lora_linear(VisionLoRARowParallelLinear, lora),
        )
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def _moe_spec(
    linears: MLPSubmodules, shared_expert: bool, vision_lora: Optional[VisionLoRASettings] = None
) -> ModuleSpec:
    """megatron's MoE layer: a router shared by all tokens, experts as a sequence of MLPs.

    With vision LoRA the experts get adapters and the tokens carry their vision
    flag to them; the shared expert (which sees tokens in sequence order) does not.
    """
    if vision_lora is None:
        layer, experts, expert_linears, params = MoELayer, MegavlSequentialMLP, linears, {}
    else:
        layer, experts, expert_linears = VisionAwareMoELayer, VisionAwareSequentialMLP, _local_linears(vision_lora.mlp)
        params = {"carry_vision_flags": vision_lora.experts_need_vision_flags}
    return ModuleSpec(
        module=layer,
        params=params,
        submodules=MoESubmodules(
            router=MegavlRouter,
            experts=ModuleSpec(module=experts, params=dict(params), submodules=expert_linears),
            shared_experts=(
                ModuleSpec(module=SharedExpertMLP, submodules=linears)
                if shared_expert
                else None
            ),
        ),
    )


def _transformer_layer(attention_backend: str, qk_norm, linear_qkv, linear_proj, input_norm, pre_mlp_norm,
                       mlp: ModuleSpec, keys_map: Optional[dict] = None) -> ModuleSpec:
    """The TransformerLayer both specs build; they differ only in the modules passed in."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.arbitrary},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=linear_qkv,
                    core_attention=core_attention_class(attention_backend),
                    linear_proj=linear_proj,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map or {},
        ),
    )


def local_layer_spec(
    attention_backend: str,
    qk_layernorm: bool = False,
    moe: bool = False,
    shared_expert: bool = False,
    vision_lora: Optional[VisionLoRASettings] = None,
) -> ModuleSpec:
    """A transformer layer from megatron-core's own modules (runs anywhere).

    vision_lora: build the LoRA linears with these adapters (None: plain linears).
    """
    mlp = (
        _moe_spec(_local_linears(), shared_expert, vision_lora)
        if moe
        else ModuleSpec(module=MLP, submodules=_local_linears(None if vision_lora is None else vision_lora.mlp))
    )
    if vision_lora is None:
        linear_qkv, linear_proj = ColumnParallelLinear, RowParallelLinear
    else:
        linear_qkv = _lora_linear(VisionLoRAColumnParallelLinear, vision_lora.attention)
        linear_proj = _lora_linear(VisionLoRARowParallelLinear, vision_lora.attention)
    keys = dict(_LOCAL_TO_TE_KEYS)
    if moe:
        # TE's MoE layers keep a separate pre-MLP norm, so that key stays as it is.
        keys.pop("pre_mlp_layernorm.")
    return _transformer_layer(attention_backend, RMSNorm if qk_layernorm else IdentityOp, linear_qkv, linear_proj,
                              input_norm=RMSNorm, pre_mlp_norm=RMSNorm, mlp=mlp, keys_map=keys)


def te_layer_spec(
    attention_backend: str,
    qk_layernorm: bool = False,
    moe: bool = False,
    shared_expert: bool = False,
    vision_lora: Optional[VisionLoRASettings] = None,
) -> ModuleSpec:
    """A transformer layer with Transformer Engine's fused norm+linear kernels (FP8-capable).

    Attention stays megavl's (FlexAttention with a block mask): TE's fused
    attention cannot express bidirectional image spans inside causal packed text.
    """
    if vision_lora is not None:
        # validate() refuses model.layer_backend = te with adapters, and auto builds them locally.
        raise ValueError(
            "vision LoRA is implemented on megatron-core's local linears only; on Transformer Engine "
            "set model.lm.vision_lora.mlp_rank = attn_rank = 0"
        )
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )

    if moe:
        # The MoE input norm cannot be fused into the router or the experts.
        pre_mlp_norm = TENorm
        mlp = _moe_spec(
            MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear), shared_expert
        )
    else:
        pre_mlp_norm = IdentityOp
        mlp = ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(
                linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear
            ),
        )

    # The input norm is fused into linear_qkv (TELayerNormColumnParallelLinear).
    return _transformer_layer(attention_backend, TENorm if qk_layernorm else IdentityOp,
                              TELayerNormColumnParallelLinear, TERowParallelLinear,
                              input_norm=IdentityOp, pre_mlp_norm=pre_mlp_norm, mlp=mlp)


def layer_spec(
    layer_backend: str,
    attention_backend: str,
    qk_layernorm: bool = False,
    moe: bool = False,
    shared_expert: bool = False,
    vision_lora: Optional[VisionLoRASettings] = None,
) -> ModuleSpec:
    builders = {"local": local_layer_spec, "te": te_layer_spec}
    if layer_backend not in builders:
        raise ValueError(f"layer backend {layer_backend!r} is not one of {sorted(builders)}")
    return builders[layer_backend](attention_backend, qk_layernorm, moe, shared_expert, vision_lora)


def lm_block_spec(
    transformer_config,
    layer_backend: str,
    attention_backend: str,
    qk_layernorm: bool = False,
    vision_lora: VisionLoRASettings = VisionLoRASettings(),
):
    """This pipeline stage's LM layers (dense or MoE, by global index) plus the final norm.

    Given explicitly because megatron's default final norm on the local path
    (torch's own norm) refuses sequence parallelism. Layers are built from the
    LoRA linears only where vision_lora has adapters (a rank above 0).
    """
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if layer_backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = RMSNorm
    c = transformer_config
    offset = get_transformer_layer_offset(c)
    moe_pattern = c.moe_layer_freq if c.num_moe_experts else [0] * c.num_layers
    shared = c.moe_shared_expert_intermediate_size is not None
    layers = [
        layer_spec(
            layer_backend, attention_backend, qk_layernorm, moe=bool(moe_pattern[offset + i]),
            shared_expert=shared, vision_lora=vision_lora if vision_lora.present else None,
        )
        for i in range(get_num_layers_to_build(c))
    ]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=final_norm)
