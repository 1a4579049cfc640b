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
