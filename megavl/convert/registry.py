"""The supported Hugging Face architectures, by config.json "architectures" name."""

from __future__ import annotations

from megavl.config import Config
from megavl.convert.architecture import Architecture
from megavl.convert import qwen3_moe
from megavl.convert.errors import ConversionError, UnsupportedArchitectureError, UnsupportedModelError
from megavl.convert.megavl_qwen2_5_vl import MegavlQwen2_5_VL
from megavl.convert.qwen2_5_vl import Qwen2_5_VL
from megavl.convert.qwen2_vl import Qwen2_VL

# Export tries them in this order: the standard classes first, megavl's
# remote-code class only for models with features the standard ones lack.
ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch for arch in (Qwen2_5_VL(), Qwen2_VL(), MegavlQwen2_5_VL())
}

# Language models without a vision tower: they import only paired with the vision
# tower of another checkpoint (megavl.convert.pairing), named by --vision-from.
LANGUAGE_MODELS: dict[str, str] = {qwen3_moe.NAME: "Qwen2_5_VLForConditionalGeneration"}


def architecture_for_hf(hf_config: dict, where: str) -> Architecture:
    """The architecture a config.json declares; where names the file in errors."""
    found = hf_config.get("architectures") or []
    if isinstance(found, str):
        found = [found]
    for name in found:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    for name in found:
        if name in LANGUAGE_MODELS:
            raise ConversionError(
                f"{where}: {name} is a language model without a vision tower; import it together with a "
                f"{LANGUAGE_MODELS[name]} folder for the vision tower and adapter "
                f"(tools/convert_from_hf.py --hf LM_DIR --vision-from VISION_DIR)"
            )
    raise UnsupportedArchitectureError(found, list(ARCHITECTURES), where)


def architecture_for_megavl(config: Config, name: str | None = None) -> Architecture:
    """The architecture that reproduces config's model (or the one asked for by name).

    Raises UnsupportedModelError with every architecture's reasons when none can.
    """
    if name is not None:
        if name not in ARCHITECTURES:
            raise UnsupportedArchitectureError([name], list(ARCHITECTURES), "--architecture")
        candidates = [ARCHITECTURES[name]]
    else:
        candidates = list(ARCHITECTURES.values())
    reasons = {}
    for arch in candidates:
        problems = arch.export_problems(config)
        if not problems:
            return arch
        reasons[arch.name] = problems
    lines = [f"{arch}:\n" + "\n".join(f"    - {p}" for p in problems) for arch, problems in reasons.items()]
    raise UnsupportedModelError(
        "no supported Hugging Face architecture reproduces this megavl model:\n  " + "\n  ".join(lines)
    )
