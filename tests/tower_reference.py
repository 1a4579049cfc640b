"""megavl's SigLIP / CLIP towers against Hugging Face's SiglipVisionModel / CLIPVisionModel.

Tiny random Hugging Face towers are built offline (every weight, norms and biases
included, drawn at random so that no mapping can pass by accident), their weights
are mapped into megavl's tower through the converter's mapping table and split for
the current tensor-parallel layout, and both run on the same images: a packed pair of
different sizes, one of them off the pretrained grid so the position table is resized.
Used in-process (TP=1) and by tests/workers/vision_tower_reference.py (TP=2).
"""

from __future__ import annotations

import dataclasses

import torch

# Hidden 48 differs from 2 x intermediate (80), so swapped layouts cannot agree.
HIDDEN, FFN, HEADS = 48, 80, 4
# (kind, post_norm, layers megavl keeps of the HF tower's, projector merge).
CASES = {
    # SigLIP as Idefics3 / SiQ-VL read it: every layer, then post_layernorm.
    "siglip": dict(layers=2, keep=2, post_norm=True, image_size=56, merge=2),
    # CLIP as LLaVA reads it: the second-to-last layer, no final norm, every patch its own token.
    "clip": dict(layers=3, keep=2, post_norm=False, image_size=42, merge=1),
}
# (height, width) of the packed images of each case: the pretrained size, then an off-grid one.
IMAGE_SIZES = {"siglip": [(56, 56), (84, 56)], "clip": [(42, 42), (56, 42)]}


def hf_tower(kind: str, seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    case = CASES[kind]
    common = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=case["layers"],
                  num_attention_heads=HEADS, image_size=case["image_size"], patch_size=14)
    torch.manual_seed(seed)
    if kind == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**common, hidden_act="gelu_pytorch_tanh"))
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**common, hidden_act="quick_gelu"))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return model.eval()


def megavl_config(kind: str, hf_model, tensor_parallel: int):
    from megavl.config import load_config
    from megavl.convert.vision_towers import vision_config_from_hf

    from conftest import TINY_CONFIG

    case = CASES[kind]
    config = load_config(str(TINY_CONFIG), [f"parallel.tensor={tensor_parallel}", "train.dtype=fp32"])
    vision = vision_config_from_hf(hf_model.config, kind, post_norm=case["post_norm"], merge=case["merge"],
                                   num_layers=case["keep"])
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vision=vision))


def build_tower(config):
    from megavl.models.specs import layer_spec
    from megavl.models.transformer_configs import vision_transformer_config
    from megavl.models.vision import VisionEncoder

    return VisionEncoder(vision_transformer_config(config), config.model.vision, layer_spec("local", "sdpa"),
                         "sdpa")


def load_hf_weights(tower, hf_model, config) -> None:
    """The Hugging Face tower's weights into megavl's, each split for this rank's TP shard."""
    from megatron.core import parallel_state as ps

    from megavl.convert.mapping import MappingTable
    from megavl.convert.vision_towers import tower_mappings

    hf_state = hf_model.state_dict()
    params = dict(tower.named_parameters())
    # transformers 5 holds the tower at the top of SiglipVisionModel; checkpoints on disk
    # (and older versions) put it under vision_model.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in hf_state) else ""
    table = MappingTable(tower_mappings(config.model.vision, prefix))
    whole = {}
    for bound in table.bind(f"vision.{name}" for name in params):
        for name, value in zip(bound.megavl, bound.to_megavl([hf_state[n] for n in bound.hf])):
            whole[name.removeprefix("vision.")] = value
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, param in params.items():
            value = whole[name]
            if getattr(param, "tensor_model_parallel", False):
                value = value.chunk(tp, dim=param.partition_dim)[rank]
            param.copy_(value.reshape(param.shape))


def images(kind: str, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=generator) for h, w in IMAGE_SIZES[kind]]


def hf_features(kind: str, hf_model, image: torch.Tensor) -> torch.Tensor:
    """[rows * cols, hidden] features of one image, row-major, as the VLMs read them."""
    with torch.no_grad():
        out = hf_model(pixel_values=image[None], output_hidden_states=True, interpolate_pos_encoding=True)
    if kind == "siglip":
        return out.last_hidden_state[0]
    return out.hidden_states[CASES[kind]["keep"]][0, 1:]  # hidden_states[0] is the input; drop CLS


def megavl_features(tower, config, pictures: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each image's features, reordered from megavl's merge-block order to row-major."""
    from megavl.convert.vision_towers import row_major_features
    from megavl.data.image_patches import image_to_patches

    v = config.model.vision
    patches, grids = zip(*(image_to_patches(p, v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
                           for p in pictures))
    with torch.no_grad():
        out = tower(torch.cat(patches), torch.tensor(grids))
    return row_major_features(out, grids, v.spatial_merge_size)


def max_errors(kind: str, tensor_parallel: int) -> list[float]:
    """Max |megavl - HF| per image of the packed pair (parallel state must be initialised)."""
    hf_model = hf_tower(kind)
    config = megavl_config(kind, hf_model, tensor_parallel)
    tower = build_tower(config)
    load_hf_weights(tower, hf_model, config)
    pictures = images(kind)
    ours = megavl_features(tower, config, pictures)
    return [float((mine - hf_features(kind, hf_model, p)).abs().max()) for mine, p in zip(ours, pictures)]
