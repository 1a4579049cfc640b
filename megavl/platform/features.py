"""Detects CUDA, Transformer Engine, apex, DALI and FlexAttention, and picks back ends."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _transformer_engine_usable() -> bool:
    # TE can be present but unusable (e.g. built for another CUDA); import it for real.
    if not (torch.cuda.is_available() and _importable("transformer_engine")):
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def _flex_attention_present() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Platform:
    cuda: bool
    device_count: int
    transformer_engine: bool
    apex: bool
    dali: bool
    flex_attention: bool

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")

    @property
    def distributed_backend(self) -> str:
        return "nccl" if self.cuda else "gloo"

    @property
    def layer_backend(self) -> str:
        """The layer implementations model.layer_backend: auto would start from (see layer_backend_for)."""
        return "te" if self.transformer_engine else "local"

    @property
    def attention_backend(self) -> str:
        """FlexAttention needs a GPU for its backward; the CPU trains with SDPA and a dense mask."""
        return "flex" if (self.cuda and self.flex_attention) else "sdpa"

    def describe(self) -> str:
        """The one start-up line that says what was found and what was chosen."""
        device = f"cuda x{self.device_count}" if self.cuda else "cpu"
        return (
            f"platform: device={device} dist={self.distributed_backend} "
            f"layers={self.layer_backend} attention={self.attention_backend} "
            f"transformer_engine={self.transformer_engine} apex={self.apex} dali={self.dali} "
            f"torch={torch.__version__}"
        )


@functools.lru_cache(maxsize=1)
def detect() -> Platform:
    cuda = torch.cuda.is_available()
    return Platform(
        cuda=cuda,
        device_count=torch.cuda.device_count() if cuda else 0,
        transformer_engine=_transformer_engine_usable(),
        apex=_importable("apex"),
        dali=_importable("nvidia.dali"),
        flex_attention=_flex_attention_present(),
    )


# Why a config cannot use Transformer Engine layers today, or None.
def te_layers_refusal(config) -> Optional[str]:
    lora = config.model.lm.vision_lora
    if lora.mlp_rank or lora.attn_rank:
        return (f"vision LoRA (model.lm.vision_lora.mlp_rank = {lora.mlp_rank}, attn_rank = {lora.attn_rank}) "
                "is built on megatron-core's local linears only")
    return None


def layer_backend_for(config, platform: Optional[Platform] = None) -> tuple[str, str]:
    """(the layer back end the model is built with, why), from model.layer_backend and this process."""
    platform = platform or detect()
    asked = config.model.layer_backend
    if asked != "auto":
        return asked, f"model.layer_backend = {asked}"
    if not platform.transformer_engine:
        return "local", "model.layer_backend = auto and Transformer Engine is not installed"
    refusal = te_layers_refusal(config)
    if refusal is not None:
        return "local", f"model.layer_backend = auto with Transformer Engine installed, but {refusal}"
    return "te", "model.layer_backend = auto and Transformer Engine is installed"

