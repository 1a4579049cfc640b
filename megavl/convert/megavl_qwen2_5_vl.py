"""megavl models with bidirectional image attention or vision-only LoRA <-> a
Hugging Face folder loaded with ``trust_remote_code=True``.

The folder holds a Qwen2.5-VL checkpoint plus the adapters' lora_a / lora_b
tensors, and the model code in megavl/convert/remote (copied next to
config.json): Qwen2.5-VL's classes extended with the two features, so the
exported model reproduces megavl's logits. Models without either feature are
exported to the standard Qwen2.5-VL class instead (the registry tries it first).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from megavl.config import Config
from megavl.convert import qwen_lm
from megavl.convert.files import REMOTE_DIR, REMOTE_FILES
from megavl.convert.qwen2_5_vl import Qwen2_5_VL

AUTO_MAP = {
    "AutoConfig": "configuration_megavl.MegavlQwen2_5_VLConfig",
    "AutoModelForImageTextToText": "modeling_megavl.MegavlQwen2_5_VLForConditionalGeneration",
}


def _module_name(saved: str) -> str:
    for prefix, module in MODULE_NAMES:
        if saved.startswith(prefix):
            return module + saved[len(prefix):]
    return saved


class _PackagedModel:
    """from_pretrained with megavl's own copy of the folder's model class.

    A folder's modeling_megavl.py is never imported: on import the folder may come
    from anywhere, and running its Python code would trust it. The class in
    megavl/convert/remote is the code the export copies into every folder.
    """

    @staticmethod
    def from_pretrained(path: str, **kwargs):
        from megavl.convert.remote.modeling_megavl import MegavlQwen2_5_VLForConditionalGeneration

        return MegavlQwen2_5_VLForConditionalGeneration.from_pretrained(path, **kwargs)


# The folder stores tensors under the loaded module names: transformers renames
# Qwen2.5-VL's saved names on load by model_type, which this class does not share.
MODULE_NAMES = (("model.", "model.language_model."), ("visual.", "model.visual."))


class MegavlQwen2_5_VL(Qwen2_5_VL):
    name = "MegavlQwen2_5_VLForConditionalGeneration"
    model_type = "megavl_qwen2_5_vl"
    megavl_features = True
    hf_aliases = ()
    vision_prefix = "model.visual."

    def table(self, config: Config):
        table = super().table(config)
        for mapping in table.mappings:
            mapping.hf = tuple(_module_name(name) for name in mapping.hf)
        table.ignorable_hf = tuple(_module_name(name) for name in table.ignorable_hf)
        return table

    def config_class(self):
        from megavl.convert.remote.configuration_megavl import MegavlQwen2_5_VLConfig

        return MegavlQwen2_5_VLConfig

    def model_class(self):
        return _PackagedModel

    def processor_config(self, config: Config) -> Optional[dict]:
        return {"processor_class": "MegavlProcessor", "auto_map": {"AutoProcessor": "processing_megavl.MegavlProcessor"}}

    def remote_code_files(self) -> list[str]:
        return [os.path.join(REMOTE_DIR, name) for name in REMOTE_FILES]

    def megavl_config(self, hf_configs: Sequence, preprocessor: Optional[dict]) -> tuple[Config, list[str]]:
        config, notes = super().megavl_config(hf_configs, preprocessor)
        (hf_config,) = hf_configs
        lm = config.model.lm
        lm.image_attention = hf_config.image_attention
        lora = hf_config.vision_lora
        lm.vision_lora.mlp_rank, lm.vision_lora.attn_rank = lora["mlp_rank"], lora["attn_rank"]
        lm.vision_lora.alpha = float(lora["alpha"])
        lm.vision_lora.enabled = True
        return config, [n for n in notes if n not in (qwen_lm.CAUSAL_NOTE, qwen_lm.LORA_NOTE)]

    def hf_config(self, config: Config, token_ids: dict, base: Optional[dict]):
        hf = super().hf_config(config, token_ids, base)
        lm = config.model.lm
        lora = lm.vision_lora
        active = lora.enabled and (lora.mlp_rank or lora.attn_rank)
        hf.image_attention = lm.image_attention
        hf.vision_lora = {
            "mlp_rank": lora.mlp_rank if active else 0,
            "attn_rank": lora.attn_rank if active else 0,
            "alpha": float(lora.alpha),
        }
        hf.auto_map = dict(AUTO_MAP)
        return hf
