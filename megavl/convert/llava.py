"""LLaVA (LlavaForConditionalGeneration) as an export target: a CLIP or SigLIP tower read at its
last kept layer without a final norm, LLaVA's 2-layer GELU projector on every patch, and a dense
Qwen2 / Qwen3 / Llama text LM (megavl.convert.composed_vlm has what the targets share).

megavl keeps only the tower layers up to the feature layer, so the exported vision_config has that
many layers and vision_feature_layer = -1 (the same features as LLaVA-1.5's -2 of the full tower).
CLIP's class token is dropped as LLaVA's "default" strategy drops it; SigLIP has none ("full").
"""

from __future__ import annotations

from typing import Optional

import torch

from megavl.config import Config
from megavl.config.towers import adapter_ffn_hidden_size, adapter_norm, image_normalisation
from megavl.convert.composed_vlm import ComposedVLMArchitecture, fixed_image_side, text_config
from megavl.convert.mapping import Direct, Mapping, Replicated
from megavl.convert.vision_towers import vision_config_to_hf

# The vision model class inside LLaVA for each tower kind.
_VISION_MODEL_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


class Llava(ComposedVLMArchitecture):
    name = "LlavaForConditionalGeneration"
    model_type = "llava"
    transformers_config = "LlavaConfig"
    transformers_model = "LlavaForConditionalGeneration"
    # The names transformers 5 saves a LlavaForConditionalGeneration under.
    tower_prefix = "vision_tower."
    lm_body_prefix = "language_model.model."
    lm_head_prefix = "language_model.lm_head."
    tower_kinds = ("clip", "siglip")

    def tower_problems(self, config: Config) -> list[str]:
        v, a, lm = config.model.vision, config.model.adapter, config.model.lm
        problems = []
        if a.kind != "mlp":
            problems.append(f"model.adapter.kind = {a.kind}: LLaVA's projector is mlp (2 linears with GELU)")
            return problems
        if adapter_norm(a) != "none":
            problems.append(f"model.adapter.norm = {a.norm}: LLaVA's projector has no norm (valid: none)")
        width = adapter_ffn_hidden_size(config)
        if width != lm.hidden_size:
            problems.append(f"model.adapter.ffn_hidden_size = {width}: LLaVA's projector is as wide as the LM "
                            f"({lm.hidden_size}; use null)")
        if v.post_norm:
            problems.append("model.vision.post_norm = true: LLaVA reads the tower's hidden states, before its "
                            "final norm (valid: false)")
        return problems

    def adapter_mappings(self, config: Config) -> list[Mapping]:
        p = "multi_modal_projector."
        mappings: list[Mapping] = [
            Direct("adapter.linear_fc1.weight", p + "linear_1.weight"),
            Direct("adapter.linear_fc2.weight", p + "linear_2.weight"),
        ]
        if config.model.adapter.bias:
            mappings += [Direct("adapter.linear_fc1.bias", p + "linear_1.bias"),
                         Replicated("adapter.linear_fc2.bias", p + "linear_2.bias")]
        return mappings

    def hf_config(self, config: Config, token_ids: dict, base: Optional[dict]):
        v, lm = config.model.vision, config.model.lm
        vision = dict(vision_config_to_hf(v), model_type=_VISION_MODEL_TYPES[v.kind])
        if v.kind == "siglip":
            vision["vision_use_head"] = False  # SigLIP's pooling head plays no part in LLaVA
        hf = self.config_class()(
            vision_config=vision,
            text_config=text_config(config),
            image_token_index=lm.image_token_id,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default" if v.kind == "clip" else "full",
            projector_hidden_act="gelu",
            multimodal_projector_bias=config.model.adapter.bias,
            image_seq_length=(v.image_size // v.patch_size) ** 2,
            tie_word_embeddings=lm.tie_embeddings,
        )
        hf.architectures = [self.name]
        return hf

    def extra_hf_tensors(self, config: Config) -> dict[str, torch.Tensor]:
        # The tower's final LayerNorm, which LLaVA's features skip: the identity.
        width = config.model.vision.hidden_size
        return {self.tower_prefix + "post_layernorm.weight": torch.ones(width),
                self.tower_prefix + "post_layernorm.bias": torch.zeros(width)}

    def hf_forward(self, hf_model, input_ids, pictures):
        pixel_values = torch.stack(pictures) if pictures else None
        return hf_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                        pixel_values=pixel_values).logits

    def preprocessor_config(self, config: Config) -> dict:
        """LLaVA's image processor with megavl's fixed-size regime: padded to a square (aspect kept)
        and resized, or resized to the square, then normalised with the tower's statistics."""
        from transformers import LlavaImageProcessorPil

        side = fixed_image_side(config)
        mean, std = image_normalisation(config.model.vision)
        pad = config.data.resolution.fixed_fit == "pad"
        processor = LlavaImageProcessorPil(
            size={"shortest_edge": side} if pad else {"height": side, "width": side},
            crop_size={"height": side, "width": side},
            do_pad=pad,
            do_center_crop=pad,
            image_mean=list(mean),
            image_std=list(std),
        )
        return processor.to_dict()

    def processor_config(self, config: Config) -> Optional[dict]:
        from megavl.data.tokenizer import IMAGE_PAD

        v = config.model.vision
        return {
            "processor_class": "LlavaProcessor",
            "image_token": IMAGE_PAD,
            "patch_size": v.patch_size,
            "vision_feature_select_strategy": "default" if v.kind == "clip" else "full",
            # CLIP's class token, which the processor counts and the "default" strategy drops.
            "num_additional_image_tokens": 1 if v.kind == "clip" else 0,
        }
