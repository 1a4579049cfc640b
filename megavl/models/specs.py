"""ModuleSpecs for megavl's transformer layers: local (CPU) or Transformer Engine (GPU).

Both the vision encoder and the language model are megatron-core
``TransformerLayer``s; only the spec decides which linear, norm and attention
implementations they are built from. Checkpoint keys are the same for both
(the local spec maps its separate norms onto TE's fused names), so a checkpoint
trained on GPUs loads on a laptop and back.
"""

from __future__ import annotations

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
    VisionLoRAColumnParallelLinear,
    VisionLoRAGatedColumnParallelLinear,
    VisionLoRAMLPRowParallelLinear,
    VisionLoRARowParallelLinear,
    lora_settings,
)
from megavl.models.norm import RMSNorm

# The local spec's norms are stored under Transformer Engine's fused-norm names.
_LOCAL_TO_TE_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def _local_linears(vision_lora: bool = False) -> MLPSubmodules:
    if vision_lora:
        return MLPSubmodules(
            linear_fc1=VisionLoRAGatedColumnParallelLinear, linear_fc2=VisionLoRAMLPRowParallelLinear
        )
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def _moe_spec(linears: MLPSubmodules, shared_expert: bool, vision_lora: bool = False) -> ModuleSpec:
    """megatron's MoE layer: a router shared by all tokens, experts as a sequence of MLPs.

    With vision LoRA the experts get adapters and the tokens carry their vision
    flag to them; the shared expert (which sees tokens in sequence order) does not.
    """
    return ModuleSpec(
        module=VisionAwareMoELayer if vision_lora else MoELayer,
        submodules=MoESubmodules(
            router=MegavlRouter,
            experts=ModuleSpec(
                module=VisionAwareSequentialMLP if vision_lora else MegavlSequentialMLP,
                submodules=_local_linears(vision_lora) if vision_lora else linears,
            ),
            shared_experts=(
                ModuleSpec(module=SharedExpertMLP, submodules=linears)
                if shared_expert
                else None
            ),
        ),
    )


def local_layer_spec(
    attention_backend: str,
    qk_layernorm: bool = False,
    moe: bool = False,
    shared_expert: bool = False,
    vision_lora: bool = False,
) -> ModuleSpec:
    """A transformer layer from megatron-core's own modules (runs anywhere)."""
    mlp = (
        _moe_spec(_local_linears(), shared_expert, vision_lora)
        if moe
        else ModuleSpec(module=MLP, submodules=_local_linears(vision_lora))
    )
    keys = dict(_LOCAL_TO_TE_KEYS)
    if moe:
        # TE's MoE layers keep a separate pre-MLP norm, so that key stays as it is.
        keys.pop("pre_mlp_layernorm.")
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.arbitrary},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=VisionLoRAColumnParallelLinear if vision_lora else ColumnParallelLinear,
                    core_attention=core_attention_class(attention_backend),
                    linear_proj=VisionLoRARowParallelLinear if vision_lora else RowParallelLinear,
                    q_layernorm=RMSNorm if qk_layernorm else IdentityOp,
                    k_layernorm=RMSNorm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys,
        ),
    )


def te_layer_spec(
    attention_backend: str,
    qk_layernorm: bool = False,
    moe: bool = False,
    shared_expert: bool = False,
    vision_lora: bool = False,
) -> ModuleSpec:
    """A transformer layer with Transformer Engine's fused norm+linear kernels (FP8-capable).

    Attention stays megavl's (FlexAttention with a block mask): TE's fused
    attention cannot express bidirectional image spans inside causal packed text.
    """
    if vision_lora:
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

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.arbitrary},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear,
                    core_attention=core_attention_class(attention_backend),
                    linear_proj=TERowParallelLinear,
                    q_layernorm=TENorm if qk_layernorm else IdentityOp,
                    k_layernorm=TENorm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def layer_spec(
    layer_backend: str,
    attention_backend: str,
    qk_layernorm: bool = False,
    moe: bool = False,
    shared_expert: bool = False,
    vision_lora: bool = False,
) -> ModuleSpec:
    builders = {"local": local_layer_spec, "te": te_layer_spec}
    if layer_backend not in builders:
        raise ValueError(f"layer backend {layer_backend!r} is not one of {sorted(builders)}")
    return builders[layer_backend](attention_backend, qk_layernorm, moe, shared_expert, vision_lora)


def lm_block_spec(transformer_config, layer_backend: str, attention_backend: str, qk_layernorm: bool = False):
    """This pipeline stage's LM layers (dense or MoE, by global index) plus the final norm.

    Given explicitly because megatron's default final norm on the local path
    (torch's own norm) refuses sequence parallelism.
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
    mlp_rank, attn_rank, _, _ = lora_settings(c)
    layers = [
        layer_spec(
            layer_backend, attention_backend, qk_layernorm, moe=bool(moe_pattern[offset + i]),
            shared_expert=shared, vision_lora=bool(mlp_rank or attn_rank),
        )
        for i in range(get_num_layers_to_build(c))
    ]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=final_norm)
