"""A megavl vision-language model for transformers (trust_remote_code=True).

Qwen2.5-VL's model with megavl's two additions, reproducing megavl's logits:

* vision-only LoRA: every adapted linear computes W x + (alpha / r) B A x for
  image tokens (the <|image_pad|> positions) and W x for all other tokens;
  adapters sit on q/k/v, o, gate/up and down of every language-model layer.
* bidirectional image attention: during the prompt (prefill) pass, image
  tokens attend to all image tokens of their sequence; everything else is
  causal. Generation after the prompt is ordinary causal decoding.

The image-token positions come from input_ids, so calls must pass input_ids
(not only inputs_embeds) for the adapters and the mask to apply.
"""

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration

from .configuration_megavl import MegavlQwen2_5_VLConfig


class _ImageRows:
    """Which rows of the current batch are image tokens; shared by all adapters of one model."""

    def __init__(self):
        self.mask = None


class VisionLoRALinear(nn.Linear):
    def __init__(self, linear: nn.Linear, rank: int, alpha: float, rows: _ImageRows):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.zeros(rank, linear.in_features, device=linear.weight.device,
                                               dtype=linear.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank, device=linear.weight.device,
                                               dtype=linear.weight.dtype))
        self._rows = rows

    def forward(self, x):
        out = super().forward(x)
        mask = self._rows.mask
        if mask is None or mask.shape != x.shape[:-1] or not bool(mask.any()):
            return out
        image_x = x * mask.unsqueeze(-1).to(x.dtype)
        return out + nn.functional.linear(nn.functional.linear(image_x, self.lora_a), self.lora_b) * self.scale


def _adapt(parent: nn.Module, names, rank: int, alpha: float, rows: _ImageRows) -> None:
    for name in names:
        setattr(parent, name, VisionLoRALinear(getattr(parent, name), rank, alpha, rows))


def image_attention_mask(image: torch.Tensor, padding: torch.Tensor, dtype: torch.dtype, additive: bool):
    """[batch, 1, seq, seq] mask: causal, plus image <-> image both ways, minus padded keys."""
    seq = image.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=image.device).tril()
    allowed = causal[None] | (image[:, :, None] & image[:, None, :])
    allowed &= padding[:, None, :].bool()
    # A padded query would otherwise see nothing, and softmax over nothing is NaN.
    allowed |= torch.eye(seq, dtype=torch.bool, device=image.device)[None]
    allowed = allowed[:, None]
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=image.device).masked_fill(~allowed, torch.finfo(dtype).min)


class MegavlQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    config_class = MegavlQwen2_5_VLConfig

    def __init__(self, config: MegavlQwen2_5_VLConfig):
        super().__init__(config)
        self._image_rows = _ImageRows()
        lora = config.vision_lora
        for layer in self.model.language_model.layers:
            if lora["attn_rank"]:
                _adapt(layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj"), lora["attn_rank"], lora["alpha"],
                       self._image_rows)
            if lora["mlp_rank"]:
                _adapt(layer.mlp, ("gate_proj", "up_proj", "down_proj"), lora["mlp_rank"], lora["alpha"],
                       self._image_rows)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, pixel_values=None,
                pixel_values_videos=None, image_grid_thw=None, video_grid_thw=None, mm_token_type_ids=None,
                second_per_grid_ts=None, **kwargs):
        # Named so that generate() sees which inputs the model takes; passed on when given.
        multimodal = {name: value for name, value in (
            ("pixel_values", pixel_values), ("pixel_values_videos", pixel_values_videos),
            ("image_grid_thw", image_grid_thw), ("video_grid_thw", video_grid_thw),
            ("mm_token_type_ids", mm_token_type_ids), ("second_per_grid_ts", second_per_grid_ts),
        ) if value is not None}
        image = None if input_ids is None else input_ids == self.config.image_token_id
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prefill = cache is None or cache.get_seq_length() == 0
        if (self.config.image_attention == "bidirectional" and image is not None and prefill
                and bool(image.any()) and not isinstance(attention_mask, dict)):
            padding = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            if position_ids is None:
                # Multimodal RoPE positions need the 2D mask, which the 4D mask below replaces.
                position_ids = self.model.compute_3d_position_ids(
                    input_ids=input_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                    inputs_embeds=None, attention_mask=padding, cache=cache,
                    second_per_grid_ts=second_per_grid_ts, mm_token_type_ids=mm_token_type_ids,
                )
            additive = self.config._attn_implementation == "eager"
            mask = image_attention_mask(image, padding, self.dtype, additive)
            attention_mask = {kind: mask for kind in set(self.config.text_config.layer_types)}
        self._image_rows.mask = image
        try:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   **multimodal, **kwargs)
        finally:
            self._image_rows.mask = None
