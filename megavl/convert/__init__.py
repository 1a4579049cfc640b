"""Hugging Face <-> megavl checkpoint conversion.

    import_from_hf(hf_dir, out_dir, tensor=1, pipeline=1, vision_from=None, verify=None)
        HF folder (plus, for a language model alone, the folder giving its vision tower) -> megavl
    export_to_hf(load_dir, out_dir, tokenizer=None, language_model_only=False, ...)
        megavl checkpoint -> HF folder
    verify_conversion(hf_dir, config, architecture, megavl_dir)   compare logits of the two
    import_pairing(lm_dir, vision_dir, out_dir)      import_from_hf(lm_dir, out_dir, vision_from=vision_dir)
    export_language_model(load_dir, out_dir)         export_to_hf(load_dir, out_dir, language_model_only=True)

Every architecture is one description (megavl.convert.architecture.Architecture:
a mapping table plus the config translation) in a module of its own
(qwen2_vl, qwen2_5_vl, megavl_qwen2_5_vl, pairing), registered in
registry.ARCHITECTURES; the two flows above run them all.
"""

from megavl.convert.errors import (
    ConversionError,
    TensorMismatchError,
    UnsupportedArchitectureError,
    UnsupportedModelError,
)
from megavl.convert.exporter import ExportResult, export_language_model, export_to_hf
from megavl.convert.importer import ImportResult, import_from_hf, import_pairing
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
