"""The supported Hugging Face architectures, by config.json "architectures" name."""

from __future__ import annotations

from typing import Optional

from megavl.config import Config
from megavl.convert.architecture import Architecture
from megavl.convert.errors import ConversionError, UnsupportedArchitectureError, UnsupportedModelError
from megavl.convert.idefics3 import Idefics3
from megavl.convert.llava import Llava
from megavl.convert.megavl_qwen2_5_vl import MegavlQwen2_5_VL
from megavl.convert.pairing import Qwen3MoeWithQwen2_5_VLVision
from megavl.convert.qwen2_5_vl import Qwen2_5_VL
from megavl.convert.qwen2_vl import Qwen2_VL

# Export tries them in this order: the standard classes first, megavl's
# remote-code class only for models with features the standard ones lack.
# Language-model-only architectures are tried only for a language-model-only export.
ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (Qwen2_5_VL(), Qwen2_VL(), MegavlQwen2_5_VL(), Llava(), Idefics3(), Qwen3MoeWithQwen2_5_VLVision())
}


def architecture_for_hf(hf_config: dict, where: str) -> Architecture:
    """The architecture a config.json declares; where names the file in errors."""
    found = hf_config.get("architectures") or []
    if isinstance(found, str):
        found = [found]
    for name in found:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise UnsupportedArchitectureError(found, list(ARCHITECTURES), where)


def architecture_for_megavl(config: Config, name: Optional[str] = None,
                            language_model_only: bool = False) -> Architecture:
    """The architecture that reproduces config's model (or the one asked for by name);
    language_model_only: one that writes the language model alone.

    Raises UnsupportedModelError with every architecture's reasons when none can.
    """
    if name is not None:
        if name not in ARCHITECTURES:
            raise UnsupportedArchitectureError([name], list(ARCHITECTURES), "--architecture")
        if language_model_only and not ARCHITECTURES[name].language_model_only:
            raise ConversionError(f"--architecture {name} holds the whole model, not the language model alone")
        candidates = [ARCHITECTURES[name]]
    else:
        candidates = [a for a in ARCHITECTURES.values() if a.language_model_only == language_model_only]
    reasons = {}
    for arch in candidates:
        problems = arch.export_problems(config)
        if not problems:
            return arch
        reasons[arch.name] = problems
    what = "language model" if language_model_only else "model"
    lines = [f"{arch}:\n" + "\n".join(f"    - {p}" for p in problems) for arch, problems in reasons.items()]
    raise UnsupportedModelError(
        f"no supported Hugging Face architecture reproduces this megavl {what}:\n  " + "\n  ".join(lines)
    )
