"""RMSNorm for megatron-core's local (non-Transformer-Engine) layer specs.

megatron's torch-norm fallback refuses sequence parallelism because it cannot
mark its weight for the tensor-parallel gradient all-reduce that sequence
parallelism needs. This norm marks it, so the local specs support SP.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Under SP each rank normalises a different slice of the sequence, so the
        # weight's gradient is partial and finalize_model_grads must sum it over TP.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as the reference implementations do, then cast back.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
