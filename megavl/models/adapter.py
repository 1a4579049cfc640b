"""The vision-to-language adapter: merge each 2x2 block of patches, then a 2-layer MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megavl.models.norm import LayerNorm, RMSNorm

# TransformerConfig.normalization -> the module normalising each patch before the merge.
_NORMS = {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}


class PatchMergerAdapter(MegatronModule):
    """Norm each patch, concatenate the merge x merge patches of a block, MLP to the LM width.

    The norm is the vision tower's kind (RMSNorm for Qwen2.5-VL, LayerNorm with
    bias for Qwen2-VL), read from the vision TransformerConfig.

    The MLP is tensor-parallel: the first linear is split by columns, the
    second by rows, so the output arrives whole on every TP rank.
    """

    def __init__(
        self,
        vision_config: TransformerConfig,
        vision_hidden: int,
        merge: int,
        ffn_hidden: int,
        lm_hidden: int,
    ):
        super().__init__(config=vision_config)
        self.merged_width = vision_hidden * merge * merge
        norm = _NORMS[vision_config.normalization]
        self.norm = norm(vision_config, vision_hidden, eps=vision_config.layernorm_epsilon)
        self.linear_fc1 = ColumnParallelLinear(
            self.merged_width,
            ffn_hidden,
            config=vision_config,
            init_method=vision_config.init_method,
            bias=True,
            gather_output=False,
        )
        self.linear_fc2 = RowParallelLinear(
            ffn_hidden,
            lm_hidden,
            config=vision_config,
            init_method=vision_config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """[N patches, vision_hidden] -> [N / merge^2, lm_hidden]."""
        merged = self.norm(patches).reshape(-1, 1, self.merged_width)
        hidden, _ = self.linear_fc1(merged)
        hidden, _ = self.linear_fc2(F.gelu(hidden))
        return hidden[:, 0, :]
