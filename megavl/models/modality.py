"""Which tokens of the forward pass in progress are vision tokens.

The VLM knows this from the image-pad tokens; MoE routers (expert-load
statistics), the MoE layers (which send the flags along with the tokens) and
the vision-only LoRA linears need it deep inside megatron's layers. megatron's
call signatures have no route for it: GPTModel -> TransformerBlock ->
TransformerLayer -> attention / MLP -> linear pass hidden states (and the
attention mask) only, and SequentialMLP calls each expert's MLP, which calls its
linears, with the expert's tokens alone. So the flags travel in one typed
context object, ``VisionFlags``, that only the context managers below set, each
restoring what was there before on exit. It is a ``ContextVar``, so it is never
visible outside the ``with`` block that set it, nor in another thread.

Shapes follow megatron: ``sequence`` is [s, b], s-major, for the whole
sequence (under sequence parallelism each tensor-parallel rank takes its slice
with ``local_tokens``); ``expert_rows`` is [tokens] for the expert now running.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass(frozen=True)
class VisionFlags:
    """bool flags, True for vision tokens; None where no VLM forward (or no expert) is running."""

    sequence: Optional[torch.Tensor] = None  # [s, b], the whole sequence of the VLM forward
    expert_rows: Optional[torch.Tensor] = None  # [tokens], the rows the running expert computes


_CURRENT: contextvars.ContextVar[VisionFlags] = contextvars.ContextVar("megavl_vision_flags", default=VisionFlags())


@contextlib.contextmanager
def _flags(**fields) -> Iterator[None]:
    token = _CURRENT.set(dataclasses.replace(_CURRENT.get(), **fields))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def vision_tokens(mask: Optional[torch.Tensor]) -> contextlib.AbstractContextManager:
    """For one VLM forward. mask: bool [b, s] (the batch layout), True for vision tokens."""
    return _flags(sequence=None if mask is None else mask.transpose(0, 1).contiguous())


def expert_rows(flags: torch.Tensor) -> contextlib.AbstractContextManager:
    """For one expert's computation: bool [tokens] flags of the rows it computes."""
    return _flags(expert_rows=flags)


def current_flags() -> VisionFlags:
    """All the flags now set, to set again later with ``restored`` (activation recompute)."""
    return _CURRENT.get()


@contextlib.contextmanager
def restored(flags: VisionFlags) -> Iterator[None]:
    """Sets flags taken with ``current_flags``, e.g. while the backward recomputes a layer."""
    token = _CURRENT.set(flags)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_vision_mask() -> Optional[torch.Tensor]:
    """bool [s, b] for the whole sequence, or None outside a VLM forward."""
    return _CURRENT.get().sequence


def current_expert_rows() -> Optional[torch.Tensor]:
    """bool [tokens] of the running expert's rows, or None outside an expert."""
    return _CURRENT.get().expert_rows


def local_tokens(mask: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """The flattened [s_local * b] flags of the tokens this rank holds (s-major, as megatron flattens)."""
    if sequence_parallel:
        from megatron.core import parallel_state

        size = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        chunk = mask.shape[0] // size
        mask = mask[rank * chunk : (rank + 1) * chunk]
    return mask.reshape(-1)
