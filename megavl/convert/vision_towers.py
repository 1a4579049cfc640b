"""SigLIP and CLIP vision towers as Hugging Face stores them <-> megavl's tower.

Both store an encoder of ``layers.*.{layer_norm1, self_attn.{q,k,v,out}_proj,
layer_norm2, mlp.fc1, mlp.fc2}`` under a prefix that depends on the model class
(``vision_model.`` in SiglipVisionModel / CLIPVisionModel, longer inside a VLM),
so the table takes the prefix. The config translation reads a SiglipVisionConfig
or CLIPVisionConfig.
"""

from __future__ import annotations

from typing import Optional

from megavl.config import VisionConfig
from megavl.convert.errors import ConversionError
from megavl.convert.mapping import Direct, Mapping, PatchEmbedConv2d, PatchEmbedLinear, QKV, Replicated

VISION_LAYER = "vision.layers.*."

# Hugging Face's hidden_act of each tower -> megavl's model.vision.mlp.
_ACTIVATIONS = {"siglip": {"gelu_pytorch_tanh": "gelu_tanh"}, "clip": {"quick_gelu": "gelu_quick"}}


def tower_mappings(vision: VisionConfig, hf_prefix: str, linear_patches: bool = False) -> list[Mapping]:
    """The mappings of a siglip / clip tower whose Hugging Face tensors start with hf_prefix
    (e.g. ``vision_model.``); linear_patches: the patch embedding is SigLIP2's linear over
    channel-last patches rather than a convolution."""
    if vision.kind not in _ACTIVATIONS:
        raise ConversionError(f"model.vision.kind = {vision.kind}: not a SigLIP or CLIP tower")
    v, hf, heads = VISION_LAYER, hf_prefix + "encoder.layers.*.", vision.num_attention_heads
    embeddings = hf_prefix + "embeddings."
    patches = (PatchEmbedLinear("vision.patch_embed.proj.weight", embeddings + "patch_embedding.weight",
                                vision.patch_size, vision.in_channels) if linear_patches
               else PatchEmbedConv2d("vision.patch_embed.proj.weight", embeddings + "patch_embedding.weight"))
    mappings: list[Mapping] = [
        patches,
        Replicated("vision.position_embedding.weight", embeddings + "position_embedding.weight"),
    ]
    if vision.kind == "siglip":
        mappings.append(Replicated("vision.patch_embed.proj.bias", embeddings + "patch_embedding.bias"))
    else:
        mappings += [
            Replicated("vision.position_embedding.class_embedding", embeddings + "class_embedding"),
            Replicated("vision.pre_norm.weight", hf_prefix + "pre_layrnorm.weight"),
            Replicated("vision.pre_norm.bias", hf_prefix + "pre_layrnorm.bias"),
        ]
    for part in ("weight", "bias"):
        attn = hf + "self_attn."
        mappings += [
            Replicated(v + f"input_layernorm.{part}", hf + f"layer_norm1.{part}"),
            QKV(v + f"self_attention.linear_qkv.{part}", attn + f"q_proj.{part}", attn + f"k_proj.{part}",
                attn + f"v_proj.{part}", heads, heads),
            Replicated(v + f"pre_mlp_layernorm.{part}", hf + f"layer_norm2.{part}"),
            Direct(v + f"mlp.linear_fc1.{part}", hf + f"mlp.fc1.{part}"),
        ]
    mappings += [
        Direct(v + "self_attention.linear_proj.weight", hf + "self_attn.out_proj.weight"),
        Replicated(v + "self_attention.linear_proj.bias", hf + "self_attn.out_proj.bias"),
        Direct(v + "mlp.linear_fc2.weight", hf + "mlp.fc2.weight"),
        Replicated(v + "mlp.linear_fc2.bias", hf + "mlp.fc2.bias"),
    ]
    if vision.post_norm:
        mappings += [
            Replicated("vision.post_norm.weight", hf_prefix + "post_layernorm.weight"),
            Replicated("vision.post_norm.bias", hf_prefix + "post_layernorm.bias"),
        ]
    return mappings


def vision_config_from_hf(hf_vision_config, kind: str, post_norm: bool, merge: int,
                          num_layers: Optional[int] = None, interpolation: str = "bicubic") -> VisionConfig:
    """A VisionConfig for a SiglipVisionConfig / CLIPVisionConfig.

    post_norm: whether the features are read after the final LayerNorm (SigLIP as Idefics3
    and SiQ-VL use it) or before it (LLaVA's CLIP). merge: the projector's
    model.vision.spatial_merge_size (1 for LLaVA's MLP). num_layers: the layers to keep, when the
    features come from an earlier layer (LLaVA's vision_feature_layer = -2 keeps all but one).
    interpolation: how the position table is resized (SigLIP2's is bilinear_antialias; its config
    gives num_patches instead of image_size).
    """
    import math

    c = hf_vision_config
    image_size = getattr(c, "image_size", None) or math.isqrt(c.num_patches) * c.patch_size
    activation = _ACTIVATIONS[kind].get(c.hidden_act)
    if activation is None:
        raise ConversionError(
            f"vision_config.hidden_act = {c.hidden_act}: megavl's {kind} tower has "
            f"{', '.join(_ACTIVATIONS[kind])}"
        )
    return VisionConfig(
        kind=kind,
        num_layers=c.num_hidden_layers if num_layers is None else num_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads,
        ffn_hidden_size=c.intermediate_size,
        patch_size=c.patch_size,
        temporal_patch_size=1,
        in_channels=c.num_channels,
        norm_eps=c.layer_norm_eps,
        norm="layernorm",
        mlp=activation,
        spatial_merge_size=merge,
        image_size=image_size,
        position_interpolation=interpolation,
        post_norm=post_norm,
        full_attention_layers=[],
    )


def vision_config_to_hf(vision: VisionConfig) -> dict:
    """The SiglipVisionConfig / CLIPVisionConfig fields (also Idefics3VisionConfig's) of a siglip /
    clip tower: vision_config_from_hf's inverse. The layer count is the layers megavl holds, so
    the features are the last layer's (vision_feature_layer -1 in a VLM's config)."""
    activation = {megavl: hf for hf, megavl in _ACTIVATIONS.get(vision.kind, {}).items()}.get(vision.mlp)
    if activation is None:
        raise ConversionError(f"model.vision.mlp = {vision.mlp}: not the MLP of a {vision.kind} tower")
    return dict(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.ffn_hidden_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_attention_heads,
        num_channels=vision.in_channels,
        patch_size=vision.patch_size,
        image_size=vision.image_size,
        layer_norm_eps=vision.norm_eps,
        hidden_act=activation,
    )


def row_major_features(features, grids, merge: int):
    """A tower's output [patches of all images, hidden], in megavl's merge-block patch order, as one
    [rows * cols, hidden] tensor per image in row-major order (how Hugging Face's towers emit them)."""
    import torch

    from megavl.models.vision import patch_coordinates

    grid = torch.tensor([list(g) for g in grids])
    coords = patch_coordinates(grid, merge)
    out, start = [], 0
    for t, h, w in grid.tolist():
        n = t * h * w
        rows = torch.empty_like(features[start:start + n])
        rows[coords[start:start + n, 2] * w + coords[start:start + n, 3]] = features[start:start + n]
        out.append(rows)
        start += n
    return out
