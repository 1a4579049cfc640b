"""Norms for megatron-core's local (non-Transformer-Engine) layer specs.

megatron's torch-norm fallback refuses sequence parallelism because it cannot
mark its weight for the tensor-parallel gradient all-reduce that sequence
parallelism needs. These norms mark their parameters, so the local specs
support SP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


def _mark_sequence_parallel(param: torch.nn.Parameter, config: TransformerConfig) -> None:
    # Under SP each rank normalises a different slice of the sequence, so the
    # gradient is partial and finalize_model_grads must sum it over TP.
    setattr(param, "sequence_parallel", config.sequence_parallel)


class RMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        _mark_sequence_parallel(self.weight, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as the reference implementations do, then cast back.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LayerNorm(torch.nn.Module):
    """LayerNorm with a bias (Qwen2-VL's vision tower); same constructor as RMSNorm."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        _mark_sequence_parallel(self.weight, config)
        _mark_sequence_parallel(self.bias, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


# VisionConfig.norm -> module.
NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}


def norm_class(kind: str) -> type:
    if kind not in NORMS:
        raise ValueError(f"norm {kind!r} is not one of {sorted(NORMS)}")
    return NORMS[kind]
