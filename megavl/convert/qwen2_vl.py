"""Qwen2-VL (Qwen2VLForConditionalGeneration) <-> megavl.

Vision tower: LayerNorm with bias, a non-gated MLP fc1 -> QuickGELU -> fc2
(width embed_dim * mlp_ratio), full attention in every layer, fused qkv with
bias. Adapter: the patch merger with a LayerNorm. LM: Qwen2 (see qwen_common).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megavl.config import Config, VisionConfig
from megavl.convert import qwen_common as common
from megavl.convert.mapping import Direct, FusedQKV, MappingTable, PatchEmbedConv3d, Replicated

_V = "vision.layers.*."
_HF = "visual.blocks.*."


def vision_mappings(config: Config) -> list:
    heads = config.model.vision.num_attention_heads
    return [
        PatchEmbedConv3d("vision.patch_embed.proj.weight", "visual.patch_embed.proj.weight"),
        Replicated(_V + "input_layernorm.weight", _HF + "norm1.weight"),
        Replicated(_V + "input_layernorm.bias", _HF + "norm1.bias"),
        FusedQKV(_V + "self_attention.linear_qkv.weight", _HF + "attn.qkv.weight", heads, heads),
        FusedQKV(_V + "self_attention.linear_qkv.bias", _HF + "attn.qkv.bias", heads, heads),
        Direct(_V + "self_attention.linear_proj.weight", _HF + "attn.proj.weight"),
        Replicated(_V + "self_attention.linear_proj.bias", _HF + "attn.proj.bias"),
        Replicated(_V + "pre_mlp_layernorm.weight", _HF + "norm2.weight"),
        Replicated(_V + "pre_mlp_layernorm.bias", _HF + "norm2.bias"),
        Direct(_V + "mlp.linear_fc1.weight", _HF + "mlp.fc1.weight"),
        Direct(_V + "mlp.linear_fc1.bias", _HF + "mlp.fc1.bias"),
        Direct(_V + "mlp.linear_fc2.weight", _HF + "mlp.fc2.weight"),
        Replicated(_V + "mlp.linear_fc2.bias", _HF + "mlp.fc2.bias"),
    ]


class Qwen2_VL(common.QwenVLArchitecture):
    name = "Qwen2VLForConditionalGeneration"
    model_type = "qwen2_vl"
    hf_aliases = common.HF_ALIASES

    def config_class(self):
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig

    def model_class(self):
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def table(self, config: Config) -> MappingTable:
        return MappingTable(
            vision_mappings(config) + common.adapter_mappings(norm_bias=True) + common.lm_mappings(config),
            ignorable_hf=common.ignorable_hf_tensors(config),
        )

    def megavl_vision(self, hf_config, problems: list[str]) -> VisionConfig:
        v = hf_config.vision_config
        if v.hidden_act != "quick_gelu":
            problems.append(f"vision_config.hidden_act = {v.hidden_act!r}: megavl's non-gated vision MLP is gelu_quick")
        # In Qwen2-VL's vision config, hidden_size is the merger's output (the LM width).
        if v.hidden_size != hf_config.text_config.hidden_size:
            problems.append(
                f"vision_config.hidden_size = {v.hidden_size}: must equal text_config.hidden_size "
                f"({hf_config.text_config.hidden_size})"
            )
        return dataclasses.replace(
            VisionConfig(),
            num_layers=v.depth,
            hidden_size=v.embed_dim,
            num_attention_heads=v.num_heads,
            ffn_hidden_size=int(v.embed_dim * v.mlp_ratio),
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            in_channels=v.in_channels,
            spatial_merge_size=v.spatial_merge_size,
            # No window attention: every layer attends over the whole image.
            full_attention_layers=list(range(v.depth)),
            norm_eps=common.VISION_NORM_EPS,
            rope_theta=float((v.rope_parameters or {}).get("rope_theta", VisionConfig().rope_theta)),
            norm="layernorm",
            mlp="gelu_quick",
        )

    def export_problems(self, config: Config) -> list[str]:
        v = config.model.vision
        problems = common.lm_export_problems(config)
        if v.norm != "layernorm":
            problems.append(f"model.vision.norm = {v.norm}: Qwen2-VL's vision tower uses layernorm")
        if v.mlp != "gelu_quick":
            problems.append(f"model.vision.mlp = {v.mlp}: Qwen2-VL's vision tower uses gelu_quick")
        windowed = sorted(set(range(v.num_layers)) - set(v.full_attention_layers))
        if windowed:
            problems.append(
                f"model.vision.full_attention_layers = {v.full_attention_layers}: Qwen2-VL has no window "
                f"attention, but layers {windowed} would use windows"
            )
        if v.ffn_hidden_size % v.hidden_size:
            problems.append(
                f"model.vision.ffn_hidden_size = {v.ffn_hidden_size}: Qwen2-VL sets it as hidden_size "
                f"({v.hidden_size}) * an integer mlp_ratio"
            )
        return problems

    def hf_vision_fields(self, config: Config, base: Optional[dict]) -> dict:
        v, lm = config.model.vision, config.model.lm
        return dict(
            depth=v.num_layers,
            embed_dim=v.hidden_size,
            hidden_size=lm.hidden_size,
            hidden_act="quick_gelu",
            mlp_ratio=v.ffn_hidden_size // v.hidden_size,
            num_heads=v.num_attention_heads,
            in_channels=v.in_channels,
            patch_size=v.patch_size,
            spatial_merge_size=v.spatial_merge_size,
            temporal_patch_size=v.temporal_patch_size,
            rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
        )
