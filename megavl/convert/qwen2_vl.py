"""Qwen2-VL (Qwen2VLForConditionalGeneration) <-> megavl.

Vision tower: LayerNorm with bias, a non-gated MLP fc1 -> QuickGELU -> fc2
(width embed_dim * mlp_ratio), full attention in every layer, fused qkv with
bias. Adapter: the patch merger with a LayerNorm. LM: Qwen2 (see qwen_lm).
"""

from __future__ import annotations

from typing import Optional

from megavl.config import Config
from megavl.convert import qwen_vl
from megavl.convert.mapping import Direct, Replicated

_V, _HF = qwen_vl.VISION_LAYER, qwen_vl.HF_VISION_BLOCK


class Qwen2_VL(qwen_vl.QwenVLArchitecture):
    name = "Qwen2VLForConditionalGeneration"
    model_type = "qwen2_vl"
    transformers_config = "Qwen2VLConfig"
    transformers_model = "Qwen2VLForConditionalGeneration"
    norm_bias = True
    vision_act = ("quick_gelu", "non-gated vision MLP is gelu_quick")
    # In Qwen2-VL's vision config, hidden_size is the merger's output (the LM width).
    merger_width_field = "hidden_size"

    def vision_mlp_mappings(self) -> list:
        return [
            Direct(_V + "mlp.linear_fc1.weight", _HF + "mlp.fc1.weight"),
            Direct(_V + "mlp.linear_fc1.bias", _HF + "mlp.fc1.bias"),
            Direct(_V + "mlp.linear_fc2.weight", _HF + "mlp.fc2.weight"),
            Replicated(_V + "mlp.linear_fc2.bias", _HF + "mlp.fc2.bias"),
        ]

    def megavl_vision_fields(self, v) -> dict:
        return dict(
            kind="qwen2_vl",
            hidden_size=v.embed_dim,
            ffn_hidden_size=int(v.embed_dim * v.mlp_ratio),
            # No window attention: every layer attends over the whole image.
            full_attention_layers=list(range(v.depth)),
            norm="layernorm",
            mlp="gelu_quick",
        )

    def export_problems(self, config: Config) -> list[str]:
        v = config.model.vision
        problems = qwen_vl.lm_export_problems(config) + qwen_vl.tower_export_problems(config, "qwen2_vl", self.name)
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
            qwen_vl.vision_fields_to_hf(v),
            embed_dim=v.hidden_size,
            hidden_size=lm.hidden_size,
            hidden_act="quick_gelu",
            mlp_ratio=v.ffn_hidden_size // v.hidden_size,
        )
