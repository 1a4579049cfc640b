"""What runs in which precision, and whether this machine can run a config's FP8.

``validate`` holds the rules a config alone decides (bf16, Transformer Engine layers, GEMM widths);
what depends on the machine (Transformer Engine, a GPU, its compute capability) is checked here at
start-up, before the model is built, and reported by the dry run without failing it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

import torch

from megavl.config import Config
from megavl.config.errors import report_problems
from megavl.platform.features import Platform, detect, layer_backend_for

# The lowest compute capability each recipe's GEMMs run on (Transformer Engine's check_fp8_support,
# check_fp8_block_scaling_support and check_mxfp8_support), named for the messages.
_MIN_CAPABILITY = {
    "delayed": ((8, 9), "FP8 GEMMs", "Ada, Hopper or newer"),
    "tensorwise": ((8, 9), "FP8 GEMMs", "Ada, Hopper or newer"),
    "blockwise": ((9, 0), "FP8 block-scaled GEMMs", "Hopper or newer"),
    "mxfp8": ((10, 0), "MXFP8 GEMMs", "Blackwell"),
}
# Transformer Engine's block-scaled GEMMs need CUDA 12.9 (check_fp8_block_scaling_support).
_BLOCKWISE_MIN_CUDA = (12, 9)
# The first Transformer Engine release each recipe exists in, as megatron-core's get_fp8_recipe requires.
_MIN_TE_VERSION = {"tensorwise": "2.2.0.dev0", "blockwise": "2.3.0.dev0", "mxfp8": "2.1.0"}
# Transformer Engine's own support check per recipe; its module moved between releases.
_TE_CHECKS = {
    "delayed": "check_fp8_support",
    "tensorwise": "check_fp8_support",
    "blockwise": "check_fp8_block_scaling_support",
    "mxfp8": "check_mxfp8_support",
}
_TE_CHECK_MODULES = ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.quantize",
                     "transformer_engine.pytorch.fp8")


def _recipe_words(config: Config) -> str:
    t = config.train
    if t.fp8_recipe != "delayed":
        return t.fp8_recipe
    margin = f", margin {t.fp8_margin}" if t.fp8_margin else ""
    return f"delayed, amax history {t.fp8_amax_history_len}, {t.fp8_amax_compute_algo}{margin}"


def precision_plan(config: Config) -> str:
    """One line: the precision of each part of the model's compute, from the config alone.

    Only the GEMMs of Transformer Engine's linears can run in FP8: the patch embedding, the
    adapter and the output layer are megatron-core's local linears, attention is megavl's own,
    and the MoE router computes in fp32 (moe_router_dtype). Gradients are reduced and the
    optimizer steps in fp32 (grad_reduce_in_fp32, megatron's main parameters).
    """
    t = config.train
    moe = config.model.lm.moe.num_experts > 0
    if t.fp8 is None:
        if t.dtype == "fp32":
            return "precision: everything fp32"
        return f"precision: everything bf16{' (router fp32)' if moe else ''}, main grads fp32"
    scheme = f"fp8 {t.fp8} ({_recipe_words(config)})"
    parts = [
        f"vision tower {scheme}" if t.fp8_vision else "vision tower bf16 (train.fp8_vision = false)",
        "adapter bf16",
        f"LM linears {scheme}",
    ]
    if moe:
        parts.append(f"experts {scheme}")
    parts.append("attention, norms, embeddings, output layer bf16")
    if moe:
        parts.append("router fp32")
    parts.append("main grads fp32")
    return "precision: " + " | ".join(parts)


def _version(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if not text:
        return None
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _te_refusal(recipe: str) -> Optional[str]:
    """Transformer Engine's own reason this process's GPU cannot run recipe, or None."""
    for module in _TE_CHECK_MODULES:
        try:
            check = getattr(importlib.import_module(module), _TE_CHECKS[recipe], None)
        except ImportError:
            continue
        if check is not None:
            supported, reason = check()
            return None if supported else reason
    return None


@dataclass(frozen=True)
class FP8Hardware:
    """What FP8 needs beyond the Platform: the GPU's compute capability, the CUDA and Transformer
    Engine versions, and Transformer Engine's own verdict on the recipe (None: it has no objection)."""

    capability: Optional[tuple[int, int]] = None
    cuda_version: Optional[str] = None
    te_version: Optional[str] = None
    te_refusal: Optional[str] = None

    @classmethod
    def detect(cls, platform: Platform, recipe: str) -> "FP8Hardware":
        """This process's GPU (the current device) and libraries."""
        if not platform.cuda:
            return cls()
        te_version = None
        refusal = None
        if platform.transformer_engine:
            from megatron.core.utils import get_te_version

            te_version = str(get_te_version())
            refusal = _te_refusal(recipe)
        return cls(tuple(torch.cuda.get_device_capability()), torch.version.cuda, te_version, refusal)


def fp8_platform_problems(config: Config, platform: Optional[Platform] = None,
                          hardware: Optional[FP8Hardware] = None) -> list[str]:
    """Why train.fp8 cannot run on this machine (empty when it can, or when train.fp8 is unset)."""
    t = config.train
    if t.fp8 is None:
        return []
    platform = platform or detect()
    name = f"train.fp8 = {t.fp8}"
    problems = []
    if not platform.transformer_engine:
        problems.append(f"{name}: needs Transformer Engine, which is not installed (or not usable) here "
                        "(pip install transformer-engine[pytorch])")
    else:
        backend, why = layer_backend_for(config, platform)
        if backend != "te":
            problems.append(f"{name}: needs Transformer Engine layers, but the model is built on {backend} ({why})")
    if not platform.cuda:
        problems.append(f"{name}: needs a CUDA GPU, and this process has none")
        return problems
    hardware = hardware or FP8Hardware.detect(platform, t.fp8_recipe)
    known = len(problems)
    recipe = f"train.fp8_recipe = {t.fp8_recipe}"
    minimum, what, family = _MIN_CAPABILITY[t.fp8_recipe]
    capable = hardware.capability is None or tuple(hardware.capability) >= minimum
    if not capable:
        others = [r for r, (low, _, _) in _MIN_CAPABILITY.items() if tuple(hardware.capability) >= low]
        problems.append(
            f"{name} ({recipe}): {what} need compute capability {minimum[0]}.{minimum[1]} or higher "
            f"({family}); this GPU has {hardware.capability[0]}.{hardware.capability[1]}"
            + (f"; use train.fp8_recipe = {_either(others)}" if others else "; leave train.fp8 unset")
        )
    cuda = _version(hardware.cuda_version)
    if t.fp8_recipe == "blockwise" and cuda is not None and cuda < _BLOCKWISE_MIN_CUDA:
        problems.append(f"{name} ({recipe}): Transformer Engine's block-scaled GEMMs need CUDA "
                        f"{_BLOCKWISE_MIN_CUDA[0]}.{_BLOCKWISE_MIN_CUDA[1]} or newer; torch here is built for "
                        f"CUDA {hardware.cuda_version}")
    minimum_te = _MIN_TE_VERSION.get(t.fp8_recipe)
    if minimum_te and hardware.te_version:
        from packaging.version import Version

        if Version(hardware.te_version) < Version(minimum_te):
            problems.append(f"{name} ({recipe}): needs Transformer Engine {minimum_te.split('.dev')[0]} or newer "
                            f"(megatron-core builds the recipe from it); installed: {hardware.te_version}")
    # Transformer Engine knows its release's own rules (cuBLASLt, newer architectures); its reason
    # is added where the rules above found nothing, so one cause is not reported twice.
    if hardware.te_refusal and len(problems) == known:
        problems.append(f"{name} ({recipe}): Transformer Engine refuses it on this GPU: {hardware.te_refusal}")
    return problems


def check_fp8_platform(config: Config, platform: Optional[Platform] = None,
                       hardware: Optional[FP8Hardware] = None) -> None:
    """Raises ConfigError listing every reason train.fp8 cannot run here, before the model is built."""
    problems = fp8_platform_problems(config, platform, hardware)
    if problems:
        raise report_problems(problems, "train.fp8 cannot run on this machine")


__all__ = ["FP8Hardware", "check_fp8_platform", "fp8_platform_problems", "precision_plan"]
