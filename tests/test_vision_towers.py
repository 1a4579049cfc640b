"""The SigLIP and CLIP towers match Hugging Face's models to 1e-5 at TP=1 and TP=2, on a packed
pair of images one of which needs its position table resized; and what each kind refuses."""

import pytest

import tower_reference
from conftest import ROOT, TINY_CONFIG, read_json, run_torchrun

TOLERANCE = 1e-5


@pytest.mark.parametrize("kind", sorted(tower_reference.CASES))
def test_tower_matches_hugging_face(kind, megatron_world):
    errors = tower_reference.max_errors(kind, tensor_parallel=1)
    assert len(errors) == 2 and max(errors) < TOLERANCE, errors


@pytest.mark.slow
def test_towers_match_hugging_face_under_tensor_parallelism(tmp_path):
    out = tmp_path / "errors.json"
    run_torchrun(2, "vision_tower_reference.py", ["--tensor", "2", "--out", str(out)])
    errors = read_json(out)
    assert sorted(errors) == sorted(tower_reference.CASES)
    for kind, per_image in errors.items():
        assert len(per_image) == 2 and max(per_image) < TOLERANCE, (kind, per_image)


@pytest.mark.parametrize("name,reason", [
    ("tiny_siglip_cpu.yaml", "model.vision.kind = siglip: Qwen2_5_VLForConditionalGeneration's vision tower is qwen2_5_vl"),
    ("tiny_clip_cpu.yaml", "model.adapter.kind = mlp, bias = True: Qwen2VLForConditionalGeneration's projector"),
])
def test_a_whole_model_export_names_what_the_qwen_architectures_lack(name, reason):
    from megavl.config import load_config
    from megavl.convert.errors import UnsupportedModelError
    from megavl.convert.registry import architecture_for_megavl

    config = load_config(str(ROOT / "examples" / "configs" / name))
    with pytest.raises(UnsupportedModelError) as raised:
        architecture_for_megavl(config)
    assert reason in str(raised.value)
    assert "model.lm.image_positions = sequential" in str(raised.value)


@pytest.mark.parametrize("scale", [2, 3])
def test_pixel_shuffle_concatenates_patches_in_idefics3s_channel_order(scale):
    """The tower emits each merge block's patches consecutively; reshaping them is Idefics3's
    pixel_shuffle of the row-major patch grid (channels: row in block, column in block, feature)."""
    import torch
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    from megavl.models.vision import patch_coordinates

    side, width = 6, 5
    grid = torch.randn(side, side, width)  # a feature per patch, indexed by (row, col)
    coords = patch_coordinates(torch.tensor([[1, side, side]]), scale)
    ours = grid[coords[:, 2], coords[:, 3]].reshape(-1, scale * scale * width)
    theirs = Idefics3Connector.pixel_shuffle(None, grid.reshape(1, side * side, width), scale)[0]
    assert torch.equal(ours, theirs)


# (config, overrides, image sizes (height, width) -> vision tokens the resolution policy plans)
TOKEN_TABLE = [
    # SigLIP + pixel shuffle x3, fixed 84 px squares: 2 x 2 tokens whatever the image.
    ("tiny_siglip_cpu.yaml", [], {(30, 200): 4, (84, 84): 4, (500, 333): 4}),
    # The same tower at native aspect ratios (SigLIP2's way: the table resized bilinearly per grid).
    ("tiny_siglip_cpu.yaml", ["data.resolution.mode=native", "data.resolution.max_pixels=30000",
                              "model.vision.position_interpolation=bilinear_antialias"],
     {(84, 84): 4, (42, 168): 4, (126, 252): 10}),  # 126 x 252 is over the cap: 84 x 210
    # The same tower on 84 px tiles (up to 4) plus a global view of 4 tokens.
    ("tiny_siglip_cpu.yaml", ["data.resolution.mode=tiling", "data.resolution.tile_size=84",
                              "data.resolution.max_tiles=4"], {(84, 84): 4, (84, 168): 12, (300, 310): 20}),
    # CLIP + LLaVA's MLP: one token per 14 px patch, 4 x 4 at the fixed 56 px.
    ("tiny_clip_cpu.yaml", [], {(20, 90): 16, (56, 56): 16}),
    # A regime of 12 tokens, not a square: a 3 x 4 grid (42 x 56 px), the position table interpolated.
    ("tiny_clip_cpu.yaml", ["data.resolution.fixed_tokens=12"], {(20, 90): 12, (300, 100): 12}),
    # compression_first: 64 patches per 64 px tile compressed to 16 tokens; 2 tiles + the global view.
    ("tiny_roaya_cpu.yaml", [], {(64, 64): 16, (64, 128): 48, (30, 200): 16 * 5}),
    # ... and a fixed regime of 12 tokens, not a square: a 3 x 4 grid (96 x 128 px, 12 x 16 patches).
    ("tiny_roaya_cpu.yaml", ["data.resolution.mode=fixed", "data.resolution.fixed_tokens=12"],
     {(64, 64): 12, (300, 90): 12}),
    # CLIP at native resolution: (h / 14) * (w / 14) tokens, its position table interpolated.
    ("tiny_clip_cpu.yaml", ["data.resolution.mode=native", "data.resolution.max_pixels=20000"],
     {(56, 56): 16, (42, 112): 24, (140, 70): 50}),
]


@pytest.mark.parametrize("name,overrides,table", TOKEN_TABLE, ids=["siglip-fixed", "siglip-native-bilinear", "siglip-tiles", "clip-fixed",
                                                                  "clip-fixed-grid", "compression-first-tiles",
                                                                  "compression-first-fixed-grid", "clip-native"])
def test_projector_token_counts_follow_the_resolution_policy(megatron_world, name, overrides, table):
    """For a table of image sizes, the tokens the policy plans are the rows the tower + projector emit."""
    import torch

    from megavl.config import load_config
    from megavl.data.image_patches import image_to_patches
    from megavl.data.resolution import plan_image, vision_token_count
    from megavl.models.build import build_model

    config = load_config(str(ROOT / "examples" / "configs" / name), overrides)
    v = config.model.vision
    factor = v.patch_size * v.spatial_merge_size
    model = build_model(config)
    for (height, width), tokens in table.items():
        plan = plan_image(height, width, config.data.resolution, factor)
        assert vision_token_count(plan, factor) == tokens, (height, width)
        sizes = [part.box[2:] if part.box is not None else plan.thumbnail_size for part in plan.parts]
        pieces = [image_to_patches(torch.zeros(3, h, w), v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
                  for h, w in sizes]
        pixels = torch.cat([p for p, _ in pieces])
        grid = torch.tensor([g for _, g in pieces])
        with torch.no_grad():
            rows = model.adapter(model.vision(pixels, grid))
        assert rows.shape == (tokens, config.model.lm.hidden_size), (height, width)
