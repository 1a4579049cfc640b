"""A Qwen3-MoE language model paired with a Qwen2.5-VL vision tower <-> megavl.

No single Hugging Face architecture holds this model, so its import reads two
folders: the language model from a Qwen3MoeForCausalLM checkpoint (--hf) and
the vision tower plus patch-merger adapter from a
Qwen2_5_VLForConditionalGeneration checkpoint (--vision-from), whose own
language model is ignored. The merger's output width must equal the LM's
hidden size (e.g. Qwen2.5-VL-3B's 2048 for Qwen3-30B-A3B).

The export writes the language model as a Qwen3MoeForCausalLM folder; the
vision tower and adapter have no Hugging Face home without a language model
and are not exported. Vision-only LoRA adapters are left out too: they act on
image tokens only, which a text model never sees.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from megavl.config import Config
from megavl.convert import qwen3_moe, qwen_lm
from megavl.convert.architecture import Architecture
from megavl.convert.errors import ConversionError
from megavl.convert.fields import dtype_name
from megavl.convert.mapping import MappingTable
from megavl.convert.qwen2_5_vl import Qwen2_5_VL
from megavl.convert.verify_pairing import verify_pairing


class Qwen3MoeWithQwen2_5_VLVision(Architecture):
    name = qwen3_moe.NAME
    model_type = qwen3_moe.MODEL_TYPE
    transformers_config = "Qwen3MoeConfig"
    transformers_model = "Qwen3MoeForCausalLM"
    vision_from = Qwen2_5_VL()
    language_model_only = True

    def megavl_config(self, hf_configs: Sequence, preprocessor: Optional[dict]) -> tuple[Config, list[str]]:
        lm_hf, vision_hf = hf_configs
        # The Qwen2.5-VL translation gives the vision tower and image settings; its LM is replaced.
        config, vision_notes = self.vision_from.megavl_config([vision_hf], preprocessor)
        notes = [n for n in vision_notes if n not in (qwen_lm.CAUSAL_NOTE, qwen_lm.LORA_NOTE)]
        problems: list[str] = []
        config.model.lm = qwen3_moe.lm_config(lm_hf, vision_hf.image_token_id, problems)
        out = vision_hf.vision_config.out_hidden_size
        if out != lm_hf.hidden_size:
            problems.append(
                f"vision_config.out_hidden_size = {out} (Qwen2.5-VL merger output) must equal the Qwen3-MoE "
                f"hidden_size = {lm_hf.hidden_size}; pick a Qwen2.5-VL whose LM width matches"
            )
        if problems:
            raise ConversionError(
                f"{self.name} + Qwen2.5-VL vision: megavl cannot reproduce this model:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        config.train.dtype, dtype_note = dtype_name(lm_hf)
        if dtype_note:
            notes.append(dtype_note)
        notes += [
            qwen_lm.CAUSAL_NOTE,
            qwen_lm.LORA_NOTE,
            "model.lm.rope = 1d: Qwen3-MoE's RoPE; image tokens get the positions of megavl's temporal axis",
        ]
        return config, notes

    def export_problems(self, config: Config) -> list[str]:
        return qwen3_moe.export_problems(config)

    def hf_config(self, config: Config, token_ids: dict, base: Optional[dict]):
        hf = self.config_class()(**qwen3_moe.hf_config_fields(config, token_ids, base))
        hf.architectures = [self.name]
        return hf

    def table(self, config: Config) -> MappingTable:
        # Qwen2.5-VL's table: its vision tower and adapter, and an LM part that
        # follows config (Qwen3-MoE's q/k norms and experts, no q/k/v biases).
        return self.vision_from.table(config)

    def verify(self, hf_dirs: Sequence[str], config: Config, megavl_dir: str, reserved: Iterable[int],
               tolerance: float):
        # Part by part: the LM against the Qwen3-MoE folder and, on import, the vision
        # tower + adapter against the Qwen2.5-VL folder.
        lm_dir, *vision_dir = hf_dirs
        return verify_pairing(lm_dir, vision_dir[0] if vision_dir else None, config, megavl_dir,
                              reserved=reserved, tolerance=tolerance)
