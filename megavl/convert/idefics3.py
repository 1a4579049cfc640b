"""Idefics3 (Idefics3ForConditionalGeneration; SmolVLM's layout) as an export target: a SigLIP tower
read after its final LayerNorm on fixed-size images or tiles, pixel shuffle x s into one linear
without bias or norm, and a dense Llama / Qwen2 / Qwen3 text LM (megavl.convert.composed_vlm has
what the targets share).

Idefics3's pixel shuffle concatenates each s x s block's patches row by row, as megavl's does, and
its position ids for a whole image of the tower's size are the table's rows in order, so the tower
needs no interpolation. The image processor is written; Idefics3's text processor is not usable
with megavl's tokenizer (it adds its own <image> token), so prompts are tokenised with megavl's
conversation format, where the image token is model.lm.image_token_id.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megavl.config import Config
from megavl.config.towers import adapter_norm, image_normalisation
from megavl.convert.composed_vlm import ComposedVLMArchitecture, fixed_image_side, text_config
from megavl.convert.mapping import Direct, Mapping
from megavl.convert.vision_towers import vision_config_to_hf


class Idefics3(ComposedVLMArchitecture):
    name = "Idefics3ForConditionalGeneration"
    model_type = "idefics3"
    transformers_config = "Idefics3Config"
    transformers_model = "Idefics3ForConditionalGeneration"
    tower_prefix = "model.vision_model."
    lm_body_prefix = "model.text_model."
    lm_head_prefix = "lm_head."
    tower_kinds = ("siglip",)
    resolution_modes = ("fixed", "tiling")

    def tower_problems(self, config: Config) -> list[str]:
        v, a = config.model.vision, config.model.adapter
        problems = []
        if a.kind != "pixel_shuffle":
            problems.append(f"model.adapter.kind = {a.kind}: Idefics3's connector is pixel_shuffle")
            return problems
        if adapter_norm(a) != "none":
            problems.append(f"model.adapter.norm = {a.norm}: Idefics3's connector has no norm (valid: none)")
        if a.bias:
            problems.append("model.adapter.bias = true: Idefics3's connector linear has no bias (valid: false)")
        if not v.post_norm:
            problems.append("model.vision.post_norm = false: Idefics3 reads the tower after its final LayerNorm "
                            "(valid: true)")
        side = v.image_size // v.patch_size
        if side % v.spatial_merge_size:
            problems.append(f"model.vision.spatial_merge_size = {v.spatial_merge_size}: Idefics3 shuffles the "
                            f"whole {side} x {side} patch grid, which it does not divide")
        return problems

    def adapter_mappings(self, config: Config) -> list[Mapping]:
        return [Direct("adapter.linear.weight", "model.connector.modality_projection.proj.weight")]

    def hf_config(self, config: Config, token_ids: dict, base: Optional[dict]):
        v, lm = config.model.vision, config.model.lm
        hf = self.config_class()(
            vision_config=dict(vision_config_to_hf(v), model_type="idefics3_vision"),
            text_config=text_config(config),
            image_token_id=lm.image_token_id,
            scale_factor=v.spatial_merge_size,
            tie_word_embeddings=lm.tie_embeddings,
        )
        hf.architectures = [self.name]
        return hf

    def hf_forward(self, hf_model, input_ids, pictures):
        # Idefics3 takes [batch, images, 3, H, W].
        pixel_values = torch.stack(pictures)[None] if pictures else None
        return hf_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                        pixel_values=pixel_values).logits

    def preprocessor_config(self, config: Config) -> dict:
        """Idefics3's image processor sized like megavl's regime: one tower-sized image (fixed), or
        tiles of the tower's size up to about max_tiles plus the global view (tiling)."""
        from transformers import Idefics3ImageProcessorPil

        r, side = config.data.resolution, fixed_image_side(config)
        mean, std = image_normalisation(config.model.vision)
        tiling = r.mode == "tiling"
        per_side = max(1, math.isqrt(r.max_tiles)) if tiling else 1
        processor = Idefics3ImageProcessorPil(
            do_image_splitting=tiling,
            size={"longest_edge": side * per_side},
            max_image_size={"longest_edge": side},
            image_mean=list(mean),
            image_std=list(std),
        )
        return processor.to_dict()
