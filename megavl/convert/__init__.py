"""Hugging Face <-> megavl checkpoint conversion.

    import_from_hf(hf_dir, out_dir, tensor=1, pipeline=1, verify=None)   HF folder -> megavl checkpoint
    export_to_hf(load_dir, out_dir, tokenizer=None, max_shard_size=...)  megavl checkpoint -> HF folder
    verify_conversion(hf_dir, config, architecture, megavl_dir)          compare logits of the two
    import_pairing(lm_dir, vision_dir, out_dir)     Qwen3-MoE LM + Qwen2.5-VL vision tower -> megavl
    export_language_model(load_dir, out_dir)        megavl's Qwen3-MoE LM -> Qwen3MoeForCausalLM folder

Per-architecture mapping tables live in one module each (qwen2_5_vl, qwen2_vl)
and are registered in registry.ARCHITECTURES.
"""

from megavl.convert.errors import (
    ConversionError,
    TensorMismatchError,
    UnsupportedArchitectureError,
    UnsupportedModelError,
)
from megavl.convert.exporter import ExportResult, export_to_hf
from megavl.convert.importer import ImportResult, import_from_hf
from megavl.convert.pairing import export_language_model, import_pairing
from megavl.convert.registry import ARCHITECTURES, architecture_for_hf, architecture_for_megavl
from megavl.convert.verify import VerifyResult, verify_conversion

__all__ = [
    "ARCHITECTURES",
    "ConversionError",
    "ExportResult",
    "ImportResult",
    "TensorMismatchError",
    "UnsupportedArchitectureError",
    "UnsupportedModelError",
    "VerifyResult",
    "architecture_for_hf",
    "architecture_for_megavl",
    "export_language_model",
    "export_to_hf",
    "import_from_hf",
    "import_pairing",
    "verify_conversion",
]
