"""What each vision tower and projector kind fixes, and the checks that follow from it.

``model.vision.kind`` names an architecture; its norm, MLP, position scheme and
the extra modules around the layers are part of that architecture, so a config
that names a kind must agree with it (one table here, read by the model, the
planners and ``validate``). ``model.adapter.kind`` names the projector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megavl.config.schema import AdapterConfig, Config, VisionConfig


# OpenAI CLIP's pixel statistics, which CLIP and the Qwen2-VL / Qwen2.5-VL towers were trained with;
# SigLIP maps [0, 1] to [-1, 1].
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class TowerTraits:
    norm: str  # model.vision.norm the kind uses
    mlp: str  # model.vision.mlp the kind uses
    # rope2d: 2D rotary embeddings over patch rows and columns (any grid);
    # learned: an absolute position table added to the patch embeddings.
    positions: str
    # Some layers attend within windows (model.vision.full_attention_layers are the others);
    # without windows every layer attends over the whole image.
    windows: bool
    class_token: bool = False  # a learned token before each image's patches (dropped from the output)
    pre_norm: bool = False  # a LayerNorm between the embeddings and the first layer
    patch_bias: bool = False  # the patch embedding has a bias
    # A temporal_patch_size the kind requires (still-image towers take one frame), or None.
    temporal_patch_size: Optional[int] = None
    # The tower itself merges spatial_merge_size**2 patches into each output token (its compressor),
    # after a window stage (model.vision.window_stage); the projector then maps every token.
    compresses: bool = False
    # The pixel statistics the kind's pretrained towers were trained with (model.vision.image_mean / std).
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD


TOWERS = {
    "qwen2_5_vl": TowerTraits(norm="rmsnorm", mlp="swiglu", positions="rope2d", windows=True),
    "qwen2_vl": TowerTraits(norm="layernorm", mlp="gelu_quick", positions="rope2d", windows=True),
    "siglip": TowerTraits(norm="layernorm", mlp="gelu_tanh", positions="learned", windows=False,
                          patch_bias=True, temporal_patch_size=1, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD),
    "clip": TowerTraits(norm="layernorm", mlp="gelu_quick", positions="learned", windows=False,
                        class_token=True, pre_norm=True, temporal_patch_size=1),
    # windows=False: the stage after the compressor attends over whole images; the window stage's
    # windows are window_stage_windowed_layers'.
    "compression_first": TowerTraits(norm="layernorm", mlp="gelu_quick", positions="learned", windows=False,
                                     patch_bias=True, temporal_patch_size=1, compresses=True),
}


def tower_traits(vision: VisionConfig) -> TowerTraits:
    return TOWERS[vision.kind]


def image_normalisation(vision: VisionConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel the images are normalised with: model.vision's, else the kind's."""
    traits = tower_traits(vision)
    mean = traits.image_mean if vision.image_mean is None else vision.image_mean
    std = traits.image_std if vision.image_std is None else vision.image_std
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def windowed_layers(vision: VisionConfig) -> set[int]:
    """0-based vision layers that attend within windows (none for kinds without windows)."""
    if not tower_traits(vision).windows:
        return set()
    return set(range(vision.num_layers)) - set(vision.full_attention_layers)


def position_grid_side(vision: VisionConfig) -> int:
    """Rows per side of the learned position table of the tower's (last) stage: patches, or for a
    compressing tower compressed tokens (0 for RoPE towers)."""
    if tower_traits(vision).positions != "learned":
        return 0
    side = vision.image_size // vision.patch_size
    return side // vision.spatial_merge_size if tower_traits(vision).compresses else side


def window_stage_grid_side(vision: VisionConfig) -> int:
    """Patches per side of a compressing tower's window-stage position table (0 for other towers)."""
    return vision.image_size // vision.patch_size if tower_traits(vision).compresses else 0


def window_stage_windowed_layers(vision: VisionConfig) -> set[int]:
    """0-based layers of a compressing tower's window stage that attend within windows."""
    if not tower_traits(vision).compresses:
        return set()
    stage = vision.window_stage
    return set(range(stage.num_layers)) - set(stage.full_attention_layers)


def tower_output_rows(patches: int, vision: VisionConfig) -> int:
    """Rows the tower emits for `patches` patches: one per patch, or one per compressed block."""
    return patches // vision.spatial_merge_size**2 if tower_traits(vision).compresses else patches


def adapter_norm(adapter: AdapterConfig) -> str:
    """model.adapter.norm with its kind's default filled in."""
    if adapter.norm is not None:
        return adapter.norm
    return "before" if adapter.kind == "merge_mlp" else "none"


def adapter_ffn_hidden_size(config: Config) -> Optional[int]:
    """The projector MLP's hidden width, or None for pixel_shuffle's single linear."""
    a, v = config.model.adapter, config.model.vision
    if a.kind == "pixel_shuffle":
        return None
    if a.ffn_hidden_size is not None:
        return a.ffn_hidden_size
    if a.kind == "mlp":
        return config.model.lm.hidden_size
    return v.hidden_size * v.spatial_merge_size**2


def _window_stage_problems(config: Config, traits: TowerTraits) -> list[str]:
    v, s = config.model.vision, "model.vision.window_stage"
    stage = v.window_stage
    if not traits.compresses:
        return [f"{s}.num_layers = {stage.num_layers}: only model.vision.kind = compression_first has a window "
                "stage; set it to 0"] if stage.num_layers else []
    problems = []
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
        if getattr(stage, name) < 1:
            problems.append(f"{s}.{name} = {getattr(stage, name)}: model.vision.kind = compression_first needs a "
                            "window stage (e.g. SAM-base's 12 layers of 768 with 12 heads and 3072 MLP)")
    if problems:
        return problems
    tp = config.parallel.tensor
    if stage.hidden_size % stage.num_attention_heads or (stage.hidden_size // stage.num_attention_heads) % 2:
        problems.append(f"{s}.hidden_size = {stage.hidden_size}: must split into num_attention_heads = "
                        f"{stage.num_attention_heads} heads of an even width")
    for name in ("num_attention_heads", "ffn_hidden_size"):
        if getattr(stage, name) % tp:
            problems.append(f"{s}.{name} = {getattr(stage, name)}: must be divisible by parallel.tensor ({tp})")
    bad = [i for i in stage.full_attention_layers if not 0 <= i < stage.num_layers]
    if bad:
        problems.append(f"{s}.full_attention_layers = {stage.full_attention_layers}: indices {bad} are outside "
                        f"[0, {stage.num_layers})")
    side = v.image_size // v.patch_size if v.patch_size else 0
    if v.spatial_merge_size and side % v.spatial_merge_size:
        problems.append(f"model.vision.image_size = {v.image_size}: its {side} x {side} patch table must split into "
                        f"the compressor's {v.spatial_merge_size} x {v.spatial_merge_size} blocks")
    return problems


def tower_problems(config: Config) -> list[str]:
    """What contradicts model.vision.kind or model.adapter.kind (each message names the field)."""
    v, a = config.model.vision, config.model.adapter
    problems: list[str] = []
    if v.kind not in TOWERS or a.kind not in ("merge_mlp", "pixel_shuffle", "mlp"):
        return problems  # the choice check names the valid kinds
    traits = tower_traits(v)
    s = "model.vision"
    for name, wanted in (("norm", traits.norm), ("mlp", traits.mlp)):
        value = getattr(v, name)
        if value != wanted:
            problems.append(f"{s}.{name} = {value}: {s}.kind = {v.kind} uses {wanted}; set {s}.{name}={wanted}")
    if traits.temporal_patch_size is not None and v.temporal_patch_size != traits.temporal_patch_size:
        problems.append(
            f"{s}.temporal_patch_size = {v.temporal_patch_size}: {s}.kind = {v.kind} embeds single frames; "
            f"set it to {traits.temporal_patch_size}"
        )
    if traits.positions == "learned":
        if v.image_size < v.patch_size:
            problems.append(
                f"{s}.image_size = {v.image_size}: {s}.kind = {v.kind} has a learned position table for "
                f"images of this side in pixels; it must be >= {s}.patch_size = {v.patch_size} "
                "(e.g. 384 for SigLIP so400m-patch14-384, 336 for CLIP ViT-L/14-336)"
            )
    elif v.image_size != 0:
        problems.append(
            f"{s}.image_size = {v.image_size}: {s}.kind = {v.kind} has rotary positions for any size; "
            "image_size sizes the learned position table of siglip / clip; set it to 0"
        )
    if traits.positions != "learned" and v.position_interpolation != "bicubic":
        problems.append(
            f"{s}.position_interpolation = {v.position_interpolation}: {s}.kind = {v.kind} has no learned "
            "position table to resize (keep bicubic)"
        )
    for name in ("image_mean", "image_std"):
        value = getattr(v, name)
        if value is None:
            continue
        if len(value) != v.in_channels:
            problems.append(f"{s}.{name} = {value}: give one value per channel ({s}.in_channels = {v.in_channels})")
        elif name == "image_std" and min(value) <= 0:
            problems.append(f"{s}.{name} = {value}: every value must be > 0")
    merge = v.spatial_merge_size
    problems += _window_stage_problems(config, traits)
    if traits.compresses and a.kind != "mlp":
        problems.append(
            f"model.adapter.kind = {a.kind}: {s}.kind = {v.kind} merges {merge} x {merge} patches in its own "
            "compressor; its tokens are projected one by one (model.adapter.kind = mlp)"
        )
    if a.kind == "mlp" and merge != 1 and not traits.compresses:
        problems.append(
            f"{s}.spatial_merge_size = {merge}: model.adapter.kind = mlp projects every patch to its own "
            "LM token; set it to 1 (or use pixel_shuffle / merge_mlp to merge patches)"
        )
    if a.kind == "merge_mlp" and adapter_norm(a) != "before":
        problems.append(
            f"model.adapter.norm = {a.norm}: merge_mlp normalises each patch (in the tower's norm kind) before "
            "the merge; leave it null or before"
        )
    if a.kind == "pixel_shuffle" and a.ffn_hidden_size is not None:
        problems.append(
            f"model.adapter.ffn_hidden_size = {a.ffn_hidden_size}: model.adapter.kind = pixel_shuffle is one "
            "linear with no hidden layer; leave it null"
        )
    return problems
