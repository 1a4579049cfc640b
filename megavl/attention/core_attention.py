"""megatron-core ``core_attention`` modules that take megavl's attention masks.

Both plug into megatron's ``SelfAttention`` through a ModuleSpec, so the model
never branches on the back end:

* ``SDPACoreAttention``: a dense boolean mask ``[b, 1, sq, sk]`` (True = may
  attend) with ``scaled_dot_product_attention``. Used on CPU, where
  FlexAttention has no backward.
* ``FlexCoreAttention``: a FlexAttention ``BlockMask`` with compiled
  ``flex_attention``. Used on CUDA, where it skips fully-masked blocks.

The masks come from one definition in ``megavl.attention.mask``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class _CoreAttentionBase(MegatronModule):
    """Shared constructor: the per-partition head counts and the softmax scale."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                f"context_parallel_size={config.context_parallel_size}: megavl's attention "
                "back ends support only context_parallel_size=1"
            )
        if pg_collection is not None and hasattr(pg_collection, "tp"):
            tp_size = pg_collection.tp.size()
        else:
            from megatron.core import parallel_state

            tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.layer_number = layer_number
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        )
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    @staticmethod
    def _to_bhsd(x: torch.Tensor) -> torch.Tensor:
        # megatron's layout is [s, b, heads, d]; torch's attention wants [b, heads, s, d].
        return x.permute(1, 2, 0, 3)

    def _from_bhsd(self, context: torch.Tensor) -> torch.Tensor:
        b, heads, s, d = context.shape
        return context.permute(2, 0, 1, 3).reshape(s, b, heads * d)

    def _check_unsupported(self, attention_bias, packed_seq_params) -> None:
        if attention_bias is not None:
            raise ValueError(f"{type(self).__name__} does not take an attention_bias")
        if packed_seq_params is not None:
            raise ValueError(
                f"{type(self).__name__} expresses packing through its mask; "
                "packed_seq_params must be None"
            )


class SDPACoreAttention(_CoreAttentionBase):
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        self._check_unsupported(attention_bias, packed_seq_params)
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            raise TypeError(
                f"SDPACoreAttention needs a boolean mask (True = may attend), got {attention_mask.dtype}"
            )
        dropout_p = self.dropout_p if self.training else 0.0
        q, k, v = self._to_bhsd(query), self._to_bhsd(key), self._to_bhsd(value)

        def attend():
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attention_mask,
                dropout_p=dropout_p,
                scale=self.softmax_scale,
                enable_gqa=self.heads_per_partition != self.groups_per_partition,
            )

        if dropout_p > 0 and not self.config.sequence_parallel:
            # Heads differ per tensor-parallel rank, so their dropout must too.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        return self._from_bhsd(context)


_compiled_flex_attention = None


def _flex_attention():
    """Compiles flex_attention once per process, on first use (compiling is slow)."""
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention


class FlexCoreAttention(_CoreAttentionBase):
    def __init__(self, config: TransformerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if self.dropout_p > 0:
            raise ValueError(
                f"attention_dropout={self.dropout_p}: FlexAttention has no attention dropout; "
                "set it to 0 (train.dropout applies to hidden states only)"
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        from torch.nn.attention.flex_attention import BlockMask

        self._check_unsupported(attention_bias, packed_seq_params)
        if not isinstance(attention_mask, BlockMask):
            raise TypeError(
                f"FlexCoreAttention needs a FlexAttention BlockMask, got {type(attention_mask).__name__}"
            )
        q, k, v = self._to_bhsd(query), self._to_bhsd(key), self._to_bhsd(value)
        context = _flex_attention()(
            q,
            k,
            v,
            block_mask=attention_mask,
            scale=self.softmax_scale,
            enable_gqa=self.heads_per_partition != self.groups_per_partition,
        )
        return self._from_bhsd(context)


def core_attention_class(backend: str) -> type:
    """The core-attention module for an attention back end name ('sdpa' or 'flex')."""
    classes = {"sdpa": SDPACoreAttention, "flex": FlexCoreAttention}
    if backend not in classes:
        raise ValueError(f"attention backend {backend!r} is not one of {sorted(classes)}")
    return classes[backend]
