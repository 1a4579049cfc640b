"""Vision-only LoRA: W·x + (alpha / r)·B·A·x for vision tokens, W·x for text tokens.

Drop-in subclasses of megatron's ColumnParallelLinear and RowParallelLinear,
used by the LM layer specs for the attention's QKV and output projections, the
dense MLPs and every expert's fc1 and fc2. Each layer gets its adapter's shape
as a ``VisionLoRA`` through its ModuleSpec's params (megavl.models.specs).
Which rows are vision tokens comes from ``megavl.models.modality``: the whole
sequence's flags in attention and dense MLPs, and inside an expert the flags
that travelled with its tokens through the dispatcher. B starts at zero, so a
fresh adapter changes nothing.

Sharding follows the base weight: for a column-parallel W (output split over
TP) B is split the same way and A is whole; for a row-parallel W (input
split) A is split the same way and B is whole. The few collectives needed are
on rank-r tensors, which are tiny next to the base layer's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megavl.models.modality import current_expert_rows, current_vision_mask


@dataclass(frozen=True)
class VisionLoRA:
    """The adapter of one linear layer. rank 0: no adapter; not enabled: present but frozen and unused."""

    rank: int
    alpha: float
    enabled: bool


@dataclass(frozen=True)
class VisionLoRASettings:
    """``model.lm.vision_lora`` as the LM's layer specs use it (the default: no adapters)."""

    mlp_rank: int = 0
    attn_rank: int = 0
    alpha: float = 1.0
    enabled: bool = False

    @classmethod
    def from_config(cls, lora) -> "VisionLoRASettings":
        """lora: megavl's VisionLoRAConfig."""
        return cls(mlp_rank=lora.mlp_rank, attn_rank=lora.attn_rank, alpha=lora.alpha, enabled=lora.enabled)

    @property
    def present(self) -> bool:
        """Whether any layer has an adapter (and so is built from the LoRA linears)."""
        return bool(self.mlp_rank or self.attn_rank)

    @property
    def attention(self) -> VisionLoRA:
        return VisionLoRA(self.attn_rank, self.alpha, self.enabled)

    @property
    def mlp(self) -> VisionLoRA:
        return VisionLoRA(self.mlp_rank, self.alpha, self.enabled)

    @property
    def experts_need_vision_flags(self) -> bool:
        """Whether MoE tokens must carry their vision flag to the experts' active adapters."""
        return self.enabled and self.mlp_rank > 0


def _row_mask(x: torch.Tensor, is_expert: bool) -> Optional[torch.Tensor]:
    """[rows..., 1] float mask over x's leading dims, or None when there are no vision rows."""
    flags = current_expert_rows() if is_expert else current_vision_mask()  # [tokens] / [s, b]
    if flags is None:
        return None
    if flags.shape != x.shape[:-1]:
        raise RuntimeError(
            f"vision-token flags of shape {tuple(flags.shape)} do not match the LoRA input {tuple(x.shape)}"
        )
    return flags.unsqueeze(-1).to(x.dtype)


class _VisionLoRA:
    """Shared parameter set-up; the subclasses decide the sharding and the collectives."""

    def _add_lora(self, lora: VisionLoRA, a_shape, b_shape, dtype) -> None:
        rank = lora.rank
        self.lora_rank = rank
        self.lora_scale = lora.alpha / rank if rank else 0.0
        self.lora_enabled = lora.enabled and rank > 0
        if rank == 0:
            self.lora_a = self.lora_b = None
            return
        self.lora_a = torch.nn.Parameter(torch.empty(a_shape, dtype=dtype))
        self.lora_b = torch.nn.Parameter(torch.zeros(b_shape, dtype=dtype))
        torch.nn.init.normal_(self.lora_a, std=1.0 / math.sqrt(a_shape[1]))
        for p in (self.lora_a, self.lora_b):
            p.vision_lora = True
            # A stage that trains without adapters keeps them, frozen and unchanged.
            p.requires_grad_(self.lora_enabled)
            setattr(p, "allreduce", not (self.is_expert and self.expert_parallel))

    def _active(self) -> bool:
        return self.lora_enabled and self.lora_a is not None


class VisionLoRAColumnParallelLinear(_VisionLoRA, ColumnParallelLinear):
    _gated = False

    def __init__(self, input_size, output_size, *, config, lora: VisionLoRA, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self._add_lora(lora, (lora.rank, input_size), (self.output_size_per_partition, lora.rank),
                       config.params_dtype)
        if self.lora_a is not None:
            set_tensor_model_parallel_attributes(self.lora_b, True, 0, 1)
            # Under SP each TP rank's A sees the whole sequence but only its output
            # shard's gradient: finalize_model_grads sums it over TP.
            setattr(self.lora_a, "sequence_parallel", self.sequence_parallel and not self.explicit_expert_comm)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        output, bias = super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        if not self._active():
            return output, bias
        distributed = self.tp_group.size() > 1 and not self.explicit_expert_comm
        x = input_
        if distributed and self.sequence_parallel:
            x = tensor_parallel.gather_from_sequence_parallel_region(x, group=self.tp_group)
        mask = _row_mask(x, self.is_expert)
        if mask is None:
            return output, bias
        hidden = torch.nn.functional.linear(x * mask, self.lora_a)
        if distributed and not self.sequence_parallel:
            hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)
        delta = torch.nn.functional.linear(hidden, self.lora_b) * self.lora_scale
        if getattr(self, "gather_output", False) and distributed:
            delta = tensor_parallel.gather_from_tensor_model_parallel_region(delta, group=self.tp_group)
        return output + delta.to(output.dtype), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(
            state, prefix, {"weight": 0, "bias": 0, "lora_b": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )
        if self._gated and f"{prefix}lora_b" in sharded:
            # Rows of a gated fc1 are [gate; up] per TP rank, as for its weight.
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            sharded[f"{prefix}lora_b"] = apply_swiglu_sharded_factory(sharded[f"{prefix}lora_b"], sharded_offsets)
        return sharded


class VisionLoRAGatedColumnParallelLinear(VisionLoRAColumnParallelLinear):
    """The fc1 of a gated (SwiGLU) MLP: B's rows follow the weight's [gate; up] layout."""

    _gated = True


class VisionLoRARowParallelLinear(_VisionLoRA, RowParallelLinear):
    def __init__(self, input_size, output_size, *, config, lora: VisionLoRA, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self._add_lora(lora, (lora.rank, self.input_size_per_partition), (output_size, lora.rank),
                       config.params_dtype)
        if self.lora_a is not None:
            set_tensor_model_parallel_attributes(self.lora_a, True, 1, 1)

    def forward(self, input_):
        output, bias = super().forward(input_)
        if not self._active():
            return output, bias
        mask = _row_mask(input_, self.is_expert)
        if mask is None:
            return output, bias
        distributed = self.tp_group.size() > 1 and not self.explicit_expert_comm
        hidden = torch.nn.functional.linear(input_ * mask, self.lora_a)
        if distributed:
            hidden = tensor_parallel.reduce_from_tensor_model_parallel_region(hidden, group=self.tp_group)
        delta = torch.nn.functional.linear(hidden, self.lora_b) * self.lora_scale
        if distributed and self.sequence_parallel:
            delta = tensor_parallel.scatter_to_sequence_parallel_region(delta, group=self.tp_group)
        return output + delta.to(output.dtype), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"weight": 1, "lora_a": 1}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )
