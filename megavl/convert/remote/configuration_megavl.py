"""Configuration of a megavl model exported for transformers (trust_remote_code=True).

A Qwen2.5-VL configuration plus the two megavl features Qwen2.5-VL lacks:

* ``image_attention``: "bidirectional" (image tokens attend to every image token
  of the sequence, before and after them; text stays causal) or "causal";
* ``vision_lora``: {"mlp_rank", "attn_rank", "alpha"}, low-rank adapters of the
  language model's linears that apply to image tokens only (rank 0: none).
"""

from huggingface_hub.dataclasses import strict
from transformers import Qwen2_5_VLConfig


@strict
class MegavlQwen2_5_VLConfig(Qwen2_5_VLConfig):
    model_type = "megavl_qwen2_5_vl"

    image_attention: str = "bidirectional"
    vision_lora: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.image_attention not in ("bidirectional", "causal"):
            raise ValueError(f"image_attention = {self.image_attention!r}: expected 'bidirectional' or 'causal'")
        lora = {"mlp_rank": 0, "attn_rank": 0, "alpha": 1.0, **(self.vision_lora or {})}
        for key in ("mlp_rank", "attn_rank"):
            if not isinstance(lora[key], int) or lora[key] < 0:
                raise ValueError(f"vision_lora.{key} = {lora[key]!r}: expected an integer >= 0")
        self.vision_lora = lora
