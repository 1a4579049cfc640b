"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration) <-> megavl.

Vision tower: RMSNorm, SwiGLU MLP with biases, window attention except in
`fullatt_block_indexes`, fused qkv [q; k; v] with bias. Adapter: the patch
merger (RMSNorm, Linear, GELU, Linear). LM: Qwen2 (see qwen_common).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megavl.config import Config, VisionConfig
from megavl.convert import qwen_common as common
from megavl.convert.mapping import Direct, FusedQKV, GatedMLP, MappingTable, PatchEmbedConv3d, Replicated

_V = "vision.layers.*."
_HF = "visual.blocks.*."


def vision_mappings(config: Config) -> list:
    heads = config.model.vision.num_attention_heads
    return [
        PatchEmbedConv3d("vision.patch_embed.proj.weight", "visual.patch_embed.proj.weight"),
        Replicated(_V + "input_layernorm.weight", _HF + "norm1.weight"),
        FusedQKV(_V + "self_attention.linear_qkv.weight", _HF + "attn.qkv.weight", heads, heads),
        FusedQKV(_V + "self_attention.linear_qkv.bias", _HF + "attn.qkv.bias", heads, heads),
        Direct(_V + "self_attention.linear_proj.weight", _HF + "attn.proj.weight"),
        Replicated(_V + "self_attention.linear_proj.bias", _HF + "attn.proj.bias"),
        Replicated(_V + "pre_mlp_layernorm.weight", _HF + "norm2.weight"),
        GatedMLP(_V + "mlp.linear_fc1.weight", _HF + "mlp.gate_proj.weight", _HF + "mlp.up_proj.weight"),
        GatedMLP(_V + "mlp.linear_fc1.bias", _HF + "mlp.gate_proj.bias", _HF + "mlp.up_proj.bias"),
        Direct(_V + "mlp.linear_fc2.weight", _HF + "mlp.down_proj.weight"),
        Replicated(_V + "mlp.linear_fc2.bias", _HF + "mlp.down_proj.bias"),
    ]


class Qwen2_5_VL(common.QwenVLArchitecture):
    name = "Qwen2_5_VLForConditionalGeneration"
    model_type = "qwen2_5_vl"
    hf_aliases = common.HF_ALIASES
    # Whether the model class has megavl's bidirectional image attention and vision LoRA.
    megavl_features = False

    def config_class(self):
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig

    def model_class(self):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def table(self, config: Config) -> MappingTable:
        return MappingTable(
            vision_mappings(config) + common.adapter_mappings(norm_bias=False)
            + common.lm_mappings(config, with_lora=self.megavl_features and config.model.lm.vision_lora.enabled),
            ignorable_hf=common.ignorable_hf_tensors(config),
        )

    def megavl_vision(self, hf_config, problems: list[str]) -> VisionConfig:
        v = hf_config.vision_config
        if v.hidden_act != "silu":
            problems.append(f"vision_config.hidden_act = {v.hidden_act!r}: megavl's gated vision MLP is SwiGLU (silu)")
        if v.out_hidden_size != hf_config.text_config.hidden_size:
            problems.append(
                f"vision_config.out_hidden_size = {v.out_hidden_size}: must equal text_config.hidden_size "
                f"({hf_config.text_config.hidden_size})"
            )
        return dataclasses.replace(
            VisionConfig(),
            num_layers=v.depth,
            hidden_size=v.hidden_size,
            num_attention_heads=v.num_heads,
            ffn_hidden_size=v.intermediate_size,
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            in_channels=v.in_channels,
            spatial_merge_size=v.spatial_merge_size,
            window_size=v.window_size,
            full_attention_layers=[int(i) for i in v.fullatt_block_indexes],
            norm_eps=common.VISION_NORM_EPS,
            rope_theta=float((v.rope_parameters or {}).get("rope_theta", VisionConfig().rope_theta)),
            norm="rmsnorm",
            mlp="swiglu",
        )

    def export_problems(self, config: Config) -> list[str]:
        v = config.model.vision
        problems = common.lm_export_problems(config, megavl_features=self.megavl_features)
        if v.norm != "rmsnorm":
            problems.append(f"model.vision.norm = {v.norm}: Qwen2.5-VL's vision tower uses rmsnorm")
        if v.mlp != "swiglu":
            problems.append(f"model.vision.mlp = {v.mlp}: Qwen2.5-VL's vision tower uses swiglu")
        return problems

    def hf_vision_fields(self, config: Config, base: Optional[dict]) -> dict:
        v, lm = config.model.vision, config.model.lm
        vision = dict(
            depth=v.num_layers,
            hidden_size=v.hidden_size,
            hidden_act="silu",
            intermediate_size=v.ffn_hidden_size,
            num_heads=v.num_attention_heads,
            in_channels=v.in_channels,
            patch_size=v.patch_size,
            spatial_merge_size=v.spatial_merge_size,
            temporal_patch_size=v.temporal_patch_size,
            window_size=v.window_size,
            out_hidden_size=lm.hidden_size,
            fullatt_block_indexes=list(v.full_attention_layers),
            rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
        )
        if base and "tokens_per_second" in (base.get("vision_config") or {}):
            vision["tokens_per_second"] = base["vision_config"]["tokens_per_second"]
        return vision
