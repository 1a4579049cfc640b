"""Which tokens of the current forward pass are vision tokens.

The VLM sets this once per forward from the image-pad tokens; MoE routers
(expert-load statistics) and, later, vision-only adapters read it inside
megatron's layers, whose signatures cannot carry it. Shapes follow megatron:
[s, b], s-major, for the whole sequence; under sequence parallelism each
tensor-parallel rank takes its slice with ``local_tokens``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

_vision_mask: Optional[torch.Tensor] = None


@contextlib.contextmanager
def vision_tokens(mask: Optional[torch.Tensor]) -> Iterator[None]:
    """mask: bool [b, s] (the batch layout), True for vision tokens."""
    global _vision_mask
    previous = _vision_mask
    _vision_mask = None if mask is None else mask.transpose(0, 1).contiguous()
    try:
        yield
    finally:
        _vision_mask = previous


def current_vision_mask() -> Optional[torch.Tensor]:
    """bool [s, b] for the whole sequence, or None outside a VLM forward."""
    return _vision_mask


def local_tokens(mask: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """The flattened [s_local * b] flags of the tokens this rank holds (s-major, as megatron flattens)."""
    if sequence_parallel:
        from megatron.core import parallel_state

        size = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        chunk = mask.shape[0] // size
        mask = mask[rank * chunk : (rank + 1) * chunk]
    return mask.reshape(-1)
