"""The vision towers, built from megatron-core TransformerLayers: Qwen2.5-VL / Qwen2-VL,
SigLIP, CLIP and compression_first (``model.vision.kind``; megavl/config/towers.py says what
each fixes).

Qwen2-VL differs from Qwen2.5-VL by LayerNorm instead of RMSNorm, a QuickGELU MLP
instead of SwiGLU, and every layer full attention. SigLIP and CLIP have learned
absolute positions instead of rotary ones, biased patch embeddings (SigLIP) or a
class token and a LayerNorm before the layers (CLIP), and attend over whole images.

Images of different native resolutions are packed into one sequence of 14x14
patches. Attention is restricted to each image (full-attention layers) or to
windows inside each image (the other layers), expressed as segment masks rather
than by reordering tokens, which is equivalent and keeps the patch order the
adapter needs. Positions are 2D rotary embeddings over patch rows and columns
(Qwen) or a learned table read at each patch's row and column (SigLIP, CLIP), so
they too are independent of the order.

compression_first runs two stages in the manner of DeepSeek-OCR: a window-attention
ViT over the patches (learned positions at the patch grid, some layers global), a
compressor that concatenates each merge block's patches into one token (a convolution
whose kernel equals its stride, as a column-parallel linear), then a global-attention
ViT over the compressed tokens (learned positions at the compressed grid). 1024 px at
patch 16 and a 4 x 4 compressor: 4096 patches -> 256 tokens.

Patch order (as Qwen2-VL's image processor emits it): per image, per temporal
slice, 2x2 merge blocks in row-major order, the 4 patches of a block
consecutively. The adapter (or the compressor) relies on this to merge 4 consecutive
patches.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.fp8_utils import get_fp8_align_size, get_fp8_context
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default

from megavl.attention.mask import materialize, segment_mask_mod
from megavl.config import VisionConfig
from megavl.config.towers import (
    position_grid_side, tower_traits, window_stage_grid_side, window_stage_windowed_layers, windowed_layers,
)
from megavl.models.norm import LayerNorm, RMSNorm, norm_class
from megavl.models.vision_embeddings import LearnedPositionEmbedding, insert_class_tokens


def patch_coordinates(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(image, t, row, col) of every patch, in the packed patch order. Returns [N, 4] long."""
    coords = []
    for image, (t, h, w) in enumerate(grid_thw.tolist()):
        tt, hb, wb, hi, wi = torch.meshgrid(
            torch.arange(t),
            torch.arange(h // merge),
            torch.arange(w // merge),
            torch.arange(merge),
            torch.arange(merge),
            indexing="ij",
        )
        row = hb * merge + hi
        col = wb * merge + wi
        img = torch.full_like(row, image)
        coords.append(torch.stack([img, tt, row, col], dim=-1).reshape(-1, 4))
    if not coords:
        return torch.zeros(0, 4, dtype=torch.long)
    return torch.cat(coords)


def window_segments(coords: torch.Tensor, grid_thw: torch.Tensor, window_patches: int) -> torch.Tensor:
    """A distinct id per (image, temporal slice, window row, window column)."""
    image, t, row, col = coords.unbind(-1)
    win_row, win_col = row // window_patches, col // window_patches
    # Upper bounds so ids from different images/slices cannot collide.
    max_t = int(grid_thw[:, 0].max()) if len(grid_thw) else 1
    max_side = int(grid_thw[:, 1:].max()) // window_patches + 1 if len(grid_thw) else 1
    return ((image * max_t + t) * max_side + win_row) * max_side + win_col


class _PatchProjection(torch.nn.Conv3d):
    """A Conv3d weight [hidden, C, T, P, P] (the layout of Qwen2.5-VL's checkpoints) applied as
    a matmul on flattened patches: the same computation without the convolution overhead.

    The weight is read in this module's own forward, as megatron's DDP expects of every
    parameter: with perf.overlap_param_gather a module's forward pre-hook is what gathers its
    parameters' updated values, so a weight read from outside its module would stay stale.
    """

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        return F.linear(pixel_values.to(weight.dtype), weight.reshape(weight.shape[0], -1), self.bias)


class PatchEmbedding(torch.nn.Module):
    """A 3D convolution whose kernel equals its stride: one linear map per patch."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype, bias: bool = False):
        super().__init__()
        v = config
        self.proj = _PatchProjection(
            v.in_channels,
            v.hidden_size,
            kernel_size=(v.temporal_patch_size, v.patch_size, v.patch_size),
            stride=(v.temporal_patch_size, v.patch_size, v.patch_size),
            bias=bias,
            dtype=dtype,
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values)


class VisionRotaryEmbedding(torch.nn.Module):
    """2D RoPE: half of each head's rotary pairs encode the row, half the column."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        dim = head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Megatron's rotary layout [N, 1, 1, head_dim] (frequencies repeated for rotate-half)."""
        freqs = torch.cat(
            [rows.float()[:, None] * self.inv_freq, cols.float()[:, None] * self.inv_freq], dim=-1
        )
        return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]


def vision_layer_spec(spec: ModuleSpec, vision: VisionConfig) -> ModuleSpec:
    """The shared layer spec with its local norms replaced by the vision tower's kind.

    Only the local spec holds separate norm modules (megavl's RMSNorm); the
    Transformer Engine spec fuses its norms into the linears, which read the
    kind from TransformerConfig.normalization, so it is returned unchanged.
    """
    norm = norm_class(vision.norm)
    sub = spec.submodules
    swaps = {
        name: norm
        for name in ("input_layernorm", "pre_mlp_layernorm")
        if getattr(sub, name, None) is RMSNorm and norm is not RMSNorm
    }
    if not swaps:
        return spec
    return dataclasses.replace(spec, submodules=dataclasses.replace(sub, **swaps))


class VisionEncoder(MegatronModule):
    def __init__(
        self,
        transformer_config: TransformerConfig,
        vision: VisionConfig,
        layer_spec: ModuleSpec,
        attention_backend: str,
        window_config: TransformerConfig = None,
    ):
        """window_config: the TransformerConfig of a compression_first tower's window stage."""
        super().__init__(config=transformer_config)
        self.vision = vision
        self.traits = tower_traits(vision)
        self.attention_backend = attention_backend
        self.windowed_layers = windowed_layers(vision)
        self.window_patches = vision.window_size // vision.patch_size
        dtype, hidden, eps = transformer_config.params_dtype, vision.hidden_size, vision.norm_eps
        layer_spec = vision_layer_spec(layer_spec, vision)
        if self.traits.compresses:
            stage = vision.window_stage
            self.window_config = window_config
            # The patch embedding feeds the window stage, at its width.
            self.patch_embed = PatchEmbedding(dataclasses.replace(vision, hidden_size=stage.hidden_size), dtype,
                                              bias=self.traits.patch_bias)
            self.window_position_embedding = LearnedPositionEmbedding(
                window_stage_grid_side(vision), stage.hidden_size, False, dtype, vision.position_interpolation
            )
            self.window_stage_windowed = window_stage_windowed_layers(vision)
            self.window_layers = torch.nn.ModuleList(
                build_module(layer_spec, config=window_config, layer_number=i + 1) for i in range(stage.num_layers)
            )
            merged = stage.hidden_size * vision.spatial_merge_size**2
            self.compressor = ColumnParallelLinear(
                merged, hidden, config=transformer_config, init_method=transformer_config.init_method, bias=True,
                gather_output=True,
            )
        else:
            self.patch_embed = PatchEmbedding(vision, dtype, bias=self.traits.patch_bias)
        if self.traits.positions == "rope2d":
            self.rotary = VisionRotaryEmbedding(hidden // vision.num_attention_heads, vision.rope_theta)
        else:
            self.position_embedding = LearnedPositionEmbedding(
                position_grid_side(vision), hidden, self.traits.class_token, dtype, vision.position_interpolation
            )
        if self.traits.pre_norm:
            self.pre_norm = LayerNorm(transformer_config, hidden, eps=eps)
        self.layers = torch.nn.ModuleList(
            build_module(layer_spec, config=transformer_config, layer_number=i + 1)
            for i in range(vision.num_layers)
        )
        if vision.post_norm:
            self.post_norm = LayerNorm(transformer_config, hidden, eps=eps)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """[N patches, C*T*P*P] -> [N, hidden] for all images of a microbatch packed together
        ([N / spatial_merge_size**2, hidden] for a compressing tower)."""
        coords = patch_coordinates(grid_thw.cpu(), self.vision.spatial_merge_size).to(pixel_values.device)
        hidden = self.patch_embed(pixel_values)  # the patch embedding is a plain matmul, never FP8
        if self.traits.positions == "rope2d":
            return self._layers(hidden, coords, grid_thw)
        if self.traits.compresses:
            hidden, coords, grid_thw = self._window_stage_and_compressor(hidden, coords, grid_thw)
        hidden = hidden + self.position_embedding(grid_thw.tolist(), coords)
        image_of_row, patch_rows = coords[:, 0], None
        if self.traits.class_token:
            hidden, image_of_row, patch_rows = insert_class_tokens(
                hidden, coords[:, 0], len(grid_thw), self.position_embedding.class_token()
            )
        if self.traits.pre_norm:
            hidden = self.pre_norm(hidden)
        hidden = self._layers(hidden, None, grid_thw, image_of_row)
        if patch_rows is not None:
            hidden = hidden[patch_rows]
        return hidden

    def _window_stage_and_compressor(self, hidden: torch.Tensor, coords: torch.Tensor, grid_thw: torch.Tensor):
        """compression_first's window stage over the patches, then the compressor: ([tokens, hidden],
        each token's (image, t, row, col) on the compressed grid, the compressed grid per image)."""
        merge = self.vision.spatial_merge_size
        hidden = hidden + self.window_position_embedding(grid_thw.tolist(), coords)
        hidden = self._run_layers(self.window_layers, self.window_stage_windowed, self.window_config, hidden,
                                  coords[:, 0], coords, grid_thw)
        # Each merge block's patches are consecutive: one row of the compressor's input.
        hidden, _ = self.compressor(hidden.reshape(-1, merge * merge * hidden.shape[-1]))
        compressed = coords[:: merge * merge].clone()
        compressed[:, 2:] //= merge
        grid = grid_thw.clone()
        grid[:, 1:] //= merge
        return hidden, compressed, grid

    def _layers(self, hidden: torch.Tensor, coords, grid_thw: torch.Tensor, image_of_row=None) -> torch.Tensor:
        """The transformer layers (and the final norm) over [rows, hidden].

        coords: (image, t, row, col) per row for rotary positions and windows, or None
        for a tower without them, whose rows attend within their image (image_of_row).
        """
        if coords is not None:
            image_of_row = coords[:, 0]
        hidden = self._run_layers(self.layers, self.windowed_layers, self.config, hidden, image_of_row, coords,
                                  grid_thw, rotary=self.traits.positions == "rope2d")
        if self.vision.post_norm:
            hidden = self.post_norm(hidden)
        return hidden

    def _run_layers(self, layers, windowed: set, config: TransformerConfig, hidden: torch.Tensor,
                    image_of_row: torch.Tensor, coords, grid_thw: torch.Tensor, rotary: bool = False) -> torch.Tensor:
        """layers over [rows, hidden]: the `windowed` ones attend within windows of the rows' coords
        (image, t, row, col), the others within each image; rotary: 2D RoPE from the coords."""
        segments = {"full": image_of_row}
        if windowed:
            segments["window"] = window_segments(coords, grid_thw.cpu(), self.window_patches)
        patches = hidden.shape[0]
        pad = (-patches) % get_fp8_align_size(config.fp8_recipe) if config.fp8 else 0
        if pad:
            # An FP8 GEMM needs a token count that is a multiple of 16 (32 for MXFP8), and an
            # image's patch count is only a multiple of merge**2. The extra rows are their own
            # segment, so no patch attends to them, and they are dropped at the end.
            segments = {kind: torch.cat([ids, ids.new_full((pad,), int(ids.max()) + 1)])
                        for kind, ids in segments.items()}
            if coords is not None:
                coords = torch.cat([coords, coords.new_zeros(pad, coords.shape[1])])
            hidden = torch.cat([hidden, hidden.new_zeros(pad, hidden.shape[1])])
        masks = {kind: self._mask(ids) for kind, ids in segments.items()}
        rotary_pos_emb = self.rotary(coords[:, 2], coords[:, 3]) if rotary else None
        hidden = hidden[:, None, :]  # [N, 1, hidden]: megatron's [s, b, h]
        # megatron's TransformerBlock enters the FP8 region around its layers; the tower calls its
        # layers itself, so it enters it here. Without train.fp8_vision its config has no fp8 and
        # this is a null context: the tower's linears then run in bf16 even on FP8 runs.
        with get_fp8_context(config):
            for index, layer in enumerate(layers):
                kind = "window" if index in windowed else "full"
                hidden, _ = layer(hidden, attention_mask=masks[kind], rotary_pos_emb=rotary_pos_emb)
        return hidden[:patches, 0, :]

    def _mask(self, segments: torch.Tensor):
        return materialize(segment_mask_mod(segments[None, :]), 1, segments.numel(), self.attention_backend)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        # A plain ModuleList would be checkpointed as if replicated; give each
        # layer its own prefix so its tensor-parallel shards are described.
        tp_group = getattr(self, "tp_group", None) or parallel_state.get_tensor_model_parallel_group()
        state = {}
        for name, module in self.named_children():
            if name in ("layers", "window_layers"):
                for i, layer in enumerate(module):
                    state.update(layer.sharded_state_dict(f"{prefix}{name}.{i}.", sharded_offsets, metadata))
            else:
                state.update(
                    sharded_state_dict_default(
                        module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=tp_group
                    )
                )
        return state

