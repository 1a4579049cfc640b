"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration) <-> megavl.

Vision tower: RMSNorm, SwiGLU MLP with biases, window attention except in
`fullatt_block_indexes`, fused qkv [q; k; v] with bias. Adapter: the patch
merger (RMSNorm, Linear, GELU, Linear). LM: Qwen2 (see qwen_lm).
"""

from __future__ import annotations

from typing import Optional

from megavl.config import Config
from megavl.convert import qwen_vl
from megavl.convert.mapping import Direct, GatedMLP, Replicated

_V, _HF = qwen_vl.VISION_LAYER, qwen_vl.HF_VISION_BLOCK


class Qwen2_5_VL(qwen_vl.QwenVLArchitecture):
    name = "Qwen2_5_VLForConditionalGeneration"
    model_type = "qwen2_5_vl"
    transformers_config = "Qwen2_5_VLConfig"
    transformers_model = "Qwen2_5_VLForConditionalGeneration"
    vision_act = ("silu", "gated vision MLP is SwiGLU (silu)")
    merger_width_field = "out_hidden_size"

    def vision_mlp_mappings(self) -> list:
        return [
            GatedMLP(_V + "mlp.linear_fc1.weight", _HF + "mlp.gate_proj.weight", _HF + "mlp.up_proj.weight"),
            GatedMLP(_V + "mlp.linear_fc1.bias", _HF + "mlp.gate_proj.bias", _HF + "mlp.up_proj.bias"),
            Direct(_V + "mlp.linear_fc2.weight", _HF + "mlp.down_proj.weight"),
            Replicated(_V + "mlp.linear_fc2.bias", _HF + "mlp.down_proj.bias"),
        ]

    def megavl_vision_fields(self, v) -> dict:
        return dict(
            kind="qwen2_5_vl",
            hidden_size=v.hidden_size,
            ffn_hidden_size=v.intermediate_size,
            window_size=v.window_size,
            full_attention_layers=[int(i) for i in v.fullatt_block_indexes],
            norm="rmsnorm",
            mlp="swiglu",
        )

    def export_problems(self, config: Config) -> list[str]:
        v = config.model.vision
        problems = qwen_vl.lm_export_problems(config, megavl_features=self.megavl_features)
        problems += qwen_vl.tower_export_problems(config, "qwen2_5_vl", self.name)
        if v.norm != "rmsnorm":
            problems.append(f"model.vision.norm = {v.norm}: Qwen2.5-VL's vision tower uses rmsnorm")
        if v.mlp != "swiglu":
            problems.append(f"model.vision.mlp = {v.mlp}: Qwen2.5-VL's vision tower uses swiglu")
        return problems

    def hf_vision_fields(self, config: Config, base: Optional[dict]) -> dict:
        v, lm = config.model.vision, config.model.lm
        vision = dict(
            qwen_vl.vision_fields_to_hf(v),
            hidden_size=v.hidden_size,
            hidden_act="silu",
            intermediate_size=v.ffn_hidden_size,
            window_size=v.window_size,
            out_hidden_size=lm.hidden_size,
            fullatt_block_indexes=list(v.full_attention_layers),
        )
        if base and "tokens_per_second" in (base.get("vision_config") or {}):
            vision["tokens_per_second"] = base["vision_config"]["tokens_per_second"]
        return vision
