"""Detects CUDA, Transformer Engine, apex, DALI and FlexAttention, and picks back ends."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

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
        """Which megatron-core layer implementations the model specs use."""
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
