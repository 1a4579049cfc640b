"""The projectors from vision features to the LM width (``model.adapter.kind``).

- merge_mlp (Qwen2-VL / Qwen2.5-VL): norm each patch, concatenate the merge x merge
  patches of a block, a 2-layer GELU MLP.
- pixel_shuffle (Idefics3, SmolVLM, SiQ-VL): concatenate the s x s patches of a block
  (space-to-depth), one linear, optionally a LayerNorm before (per patch) or after.
- mlp (LLaVA): a 2-layer GELU MLP on every patch.

The tower emits an image's patches grouped by merge block, the patches of a block
consecutive in row-major order (megavl/data/image_patches.py), so every merge is a
reshape of consecutive rows; the channel order of a merged token is (row in block,
column in block, feature), as Idefics3's pixel_shuffle produces it.

Every linear is tensor-parallel and the output arrives whole on every TP rank:
MLPs split their first linear by columns and their second by rows; the single
pixel-shuffle linear is split by columns and gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megavl.config import Config
from megavl.config.towers import adapter_ffn_hidden_size, adapter_norm
from megavl.models.norm import LayerNorm, RMSNorm

# TransformerConfig.normalization -> the module normalising each patch before the merge.
_NORMS = {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}


class _MLP(MegatronModule):
    """fc1 (column-parallel) -> GELU -> fc2 (row-parallel): the output is whole on every rank."""

    def __init__(self, config: TransformerConfig, width: int, ffn_hidden: int, out: int, bias: bool):
        super().__init__(config=config)
        self.linear_fc1 = ColumnParallelLinear(
            width, ffn_hidden, config=config, init_method=config.init_method, bias=bias, gather_output=False
        )
        self.linear_fc2 = RowParallelLinear(
            ffn_hidden, out, config=config, init_method=config.output_layer_init_method, bias=bias,
            input_is_parallel=True, skip_bias_add=False,
        )

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, width] -> [n, out]."""
        hidden, _ = self.linear_fc1(rows[:, None, :])
        hidden, _ = self.linear_fc2(F.gelu(hidden))
        return hidden[:, 0, :]


class PatchMergerAdapter(_MLP):
    """Norm each patch, concatenate the merge x merge patches of a block, MLP to the LM width.

    The norm is the vision tower's kind (RMSNorm for Qwen2.5-VL, LayerNorm with
    bias for Qwen2-VL), read from the vision TransformerConfig.
    """

    def __init__(self, vision_config: TransformerConfig, vision_hidden: int, merge: int, ffn_hidden: int,
                 lm_hidden: int, bias: bool = True):
        merged_width = vision_hidden * merge * merge
        super().__init__(vision_config, merged_width, ffn_hidden, lm_hidden, bias)
        self.merged_width = merged_width
        norm = _NORMS[vision_config.normalization]
        self.norm = norm(vision_config, vision_hidden, eps=vision_config.layernorm_epsilon)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """[N patches, vision_hidden] -> [N / merge^2, lm_hidden]."""
        return self.project(self.norm(patches).reshape(-1, self.merged_width))


class PixelShuffleAdapter(MegatronModule):
    """Space-to-depth over merge x merge blocks, one linear to the LM width, a LayerNorm
    before (over each patch) or after (over the output) when norm says so."""

    def __init__(self, vision_config: TransformerConfig, vision_hidden: int, merge: int, lm_hidden: int,
                 norm: str, bias: bool):
        super().__init__(config=vision_config)
        self.merged_width = vision_hidden * merge * merge
        self.norm_at = norm
        eps = vision_config.layernorm_epsilon
        if norm != "none":
            self.norm = LayerNorm(vision_config, vision_hidden if norm == "before" else lm_hidden, eps=eps)
        self.linear = ColumnParallelLinear(
            self.merged_width, lm_hidden, config=vision_config, init_method=vision_config.init_method,
            bias=bias, gather_output=True,
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if self.norm_at == "before":
            patches = self.norm(patches)
        hidden, _ = self.linear(patches.reshape(-1, 1, self.merged_width))
        hidden = hidden[:, 0, :]
        return self.norm(hidden) if self.norm_at == "after" else hidden


class PatchMLPAdapter(_MLP):
    """LLaVA's projector: every patch through a 2-layer GELU MLP (optionally a LayerNorm
    before or after)."""

    def __init__(self, vision_config: TransformerConfig, vision_hidden: int, ffn_hidden: int, lm_hidden: int,
                 norm: str, bias: bool):
        super().__init__(vision_config, vision_hidden, ffn_hidden, lm_hidden, bias)
        self.norm_at = norm
        if norm != "none":
            width = vision_hidden if norm == "before" else lm_hidden
            self.norm = LayerNorm(vision_config, width, eps=vision_config.layernorm_epsilon)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if self.norm_at == "before":
            patches = self.norm(patches)
        hidden = self.project(patches)
        return self.norm(hidden) if self.norm_at == "after" else hidden


def build_adapter(config: Config, vision_config: TransformerConfig) -> MegatronModule:
    """The projector model.adapter describes."""
    a, v, lm = config.model.adapter, config.model.vision, config.model.lm
    norm = adapter_norm(a)
    if a.kind == "merge_mlp":
        if norm != "before":
            raise ValueError(f"model.adapter.norm = {norm}: merge_mlp normalises each patch before the merge")
        return PatchMergerAdapter(vision_config, v.hidden_size, v.spatial_merge_size,
                                  adapter_ffn_hidden_size(config), lm.hidden_size, bias=a.bias)
    if a.kind == "pixel_shuffle":
        return PixelShuffleAdapter(vision_config, v.hidden_size, v.spatial_merge_size, lm.hidden_size, norm, a.bias)
    if a.kind == "mlp":
        return PatchMLPAdapter(vision_config, v.hidden_size, adapter_ffn_hidden_size(config), lm.hidden_size,
                               norm, a.bias)
    raise ValueError(f"model.adapter.kind = {a.kind!r}: must be one of merge_mlp, pixel_shuffle, mlp")
