"""The assembled VLM on one process: forward/backward with mixed image sizes, and its building blocks."""

from __future__ import annotations

import random

import pytest
import torch

from megavl.config import load_config
from megavl.data.batch import Sample, collate_rows, mrope_position_ids, pack_row
from megavl.data.image_patches import image_to_patches
from megavl.data.random_samples import random_sample
from megavl.models.vision import patch_coordinates, window_segments
from megavl.models.inputs import attention_mask_for
from megavl.models.inputs import to_device as model_inputs

from conftest import TINY_CONFIG


@pytest.fixture(scope="module")
def model(megatron_world):
    from megavl.models.build import build_model

    torch.manual_seed(0)
    return build_model(megatron_world)


def _batch_with_images(config, sides_per_image):
    """One row: a sample whose images have the given (height, width) sizes."""
    rng = random.Random(3)
    v, lm = config.model.vision, config.model.lm
    images, tokens = [], [10, 11]
    for height, width in sides_per_image:
        values, grid = image_to_patches(torch.randn(3, height, width), v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
        from megavl.data.batch import ImagePatches

        image = ImagePatches(values, grid)
        images.append(image)
        tokens += [lm.image_token_id] * image.num_tokens(v.spatial_merge_size)
    answer = [rng.randrange(8, lm.vocab_size) for _ in range(6)]
    tokens += [12, 13] + answer
    labels = [-100] * (len(tokens) - len(answer) - 1) + answer + [-100]
    sample = Sample(tokens=tokens, labels=labels, turn_ids=[0] * len(tokens), images=images)
    row = pack_row([sample], config.train.seq_length, lm.image_token_id, v.spatial_merge_size)
    return collate_rows([row])


def _forward(model, config, batch):
    b = model_inputs(batch, config, torch.device("cpu"))
    mask = attention_mask_for(b, True, "sdpa")
    return model(b["tokens"], b["position_ids"], mask, labels=b["labels"],
                 pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"]), b


def test_forward_backward_with_images_of_different_sizes(model, megatron_world):
    config = megatron_world
    batch = _batch_with_images(config, [(56, 112), (112, 56), (84, 84)])
    model.zero_grad()
    per_token, b = _forward(model, config, batch)
    assert per_token.shape == b["tokens"].shape
    loss = (per_token * b["loss_mask"]).sum() / b["loss_mask"].sum()
    assert torch.isfinite(loss)
    loss.backward()
    for name in ("vision", "adapter", "language_model"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.grad is not None]
        assert grads, f"{name} received no gradients"
        assert all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads), f"{name} gradients are all zero"


def test_each_image_is_encoded_independently(model, megatron_world):
    """Changing one image's pixels leaves the other image's patch features unchanged."""
    config = megatron_world
    v = config.model.vision
    a, grid_a = image_to_patches(torch.randn(3, 56, 112), v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
    b, grid_b = image_to_patches(torch.randn(3, 112, 112), v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
    grid = torch.tensor([grid_a, grid_b])
    with torch.no_grad():
        before = model.vision(torch.cat([a, b]), grid)
        after = model.vision(torch.cat([a, b + 1.0]), grid)
    n_a = a.shape[0]
    torch.testing.assert_close(before[:n_a], after[:n_a], atol=1e-6, rtol=0)
    assert (before[n_a:] - after[n_a:]).abs().max() > 1e-3


def test_image_pad_count_mismatch_is_a_clear_error(model, megatron_world):
    config = megatron_world
    batch = _batch_with_images(config, [(56, 56)])
    batch["image_grid_thw"] = torch.tensor([[1, 4, 8]])
    batch["pixel_values"] = torch.cat([batch["pixel_values"]] * 2)
    with pytest.raises(ValueError, match="image-pad tokens"):
        _forward(model, config, batch)


def _packed(config, samples, seq_length):
    row = pack_row(samples, seq_length, config.model.lm.image_token_id, config.model.vision.spatial_merge_size)
    return collate_rows([row])


@pytest.mark.parametrize("max_images", [0, 2], ids=["text-only", "with-images"])
def test_a_documents_loss_ignores_its_pack_neighbours_and_padding(model, megatron_world, max_images):
    """Document masking, per-document positions and in-order image scattering: a packed
    document's per-token loss is the one it has alone, whatever precedes it and however much
    padding follows."""
    config = megatron_world
    rng = random.Random(5)
    sample = random_sample(rng, config, max_images=max_images)
    neighbour = random_sample(rng, config, max_images=max_images)
    while max_images and not (sample.images and neighbour.images):
        sample, neighbour = neighbour, random_sample(rng, config, max_images=max_images)
    n, m = len(sample), len(neighbour)
    pair = _packed(config, [neighbour, sample], config.train.seq_length)
    one_document = dict(pair, document_ids=pair["document_ids"].clamp(max=0))  # 1 -> 0, padding stays -1
    with torch.no_grad():
        alone, b = _forward(model, config, _packed(config, [sample], config.train.seq_length))
        after_neighbour, _ = _forward(model, config, pair)
        little_padding, _ = _forward(model, config, _packed(config, [sample], n + 5))
        neighbour_alone, _ = _forward(model, config, _packed(config, [neighbour], config.train.seq_length))
        seeing_neighbour, _ = _forward(model, config, one_document)
    assert b["loss_mask"][0, :n].any() and torch.isfinite(alone[0, :n]).all()
    torch.testing.assert_close(after_neighbour[0, m : m + n], alone[0, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(after_neighbour[0, :m], neighbour_alone[0, :m], atol=1e-5, rtol=0)
    torch.testing.assert_close(little_padding[0, :n], alone[0, :n], atol=1e-5, rtol=0)
    # The comparison can fail: attending to the neighbour does move the losses.
    assert (seeing_neighbour[0, m : m + n] - alone[0, :n]).abs().max() > 1e-3


def test_per_token_loss_is_the_cross_entropy_of_the_logits(model, megatron_world):
    """The labels path (megatron's fused vocab-parallel cross entropy) scores the next token
    from the very logits the label-free path returns."""
    config = megatron_world
    batch = _batch_with_images(config, [(56, 84)])
    b = model_inputs(batch, config, torch.device("cpu"))
    mask = attention_mask_for(b, True, "sdpa")
    with torch.no_grad():
        per_token = model(b["tokens"], b["position_ids"], mask, labels=b["labels"],
                          pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"])
        logits = model(b["tokens"], b["position_ids"], mask, pixel_values=b["pixel_values"],
                       image_grid_thw=b["image_grid_thw"], gather_logits=True)
    assert logits.shape == (*b["tokens"].shape, config.model.lm.vocab_size)
    expected = torch.nn.functional.cross_entropy(logits[0].float(), b["labels"][0], reduction="none")
    torch.testing.assert_close(per_token[0], expected, atol=1e-5, rtol=1e-6)


def test_image_to_patches_groups_merge_blocks():
    # Pixel value encodes (row, col) of its patch so the order can be read back.
    patch, merge = 14, 2
    height, width = 56, 84
    rows = torch.arange(height)[:, None].expand(height, width) // patch
    cols = torch.arange(width)[None, :].expand(height, width) // patch
    image = torch.stack([rows.float(), cols.float(), torch.zeros(height, width)])
    values, grid = image_to_patches(image, patch, 2, merge)
    assert grid == (1, 4, 6)
    assert values.shape == (24, 3 * 2 * patch * patch)
    per_patch = values.reshape(24, 3, 2, patch, patch)[:, :, 0, 0, 0]
    expected = patch_coordinates(torch.tensor([grid]), merge)[:, 2:]
    assert torch.equal(per_patch[:, :2].long(), expected)
    # The first 4 patches form the top-left 2x2 block.
    assert expected[:4].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_image_size_must_fit_merged_patches():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        image_to_patches(torch.zeros(3, 50, 56))


def test_window_segments_split_images_into_windows():
    grid = torch.tensor([[1, 8, 8], [1, 4, 4]])
    coords = patch_coordinates(grid, 2)
    segments = window_segments(coords, grid, window_patches=4)
    assert len(set(segments[:64].tolist())) == 4  # 8x8 patches -> 2x2 windows of 4x4
    assert len(set(segments[64:].tolist())) == 1
    assert not set(segments[:64].tolist()) & set(segments[64:].tolist())


def test_mrope_positions_follow_the_image_grid():
    grid_tokens = 2 * 3  # a 4x6-patch image merges to 2x3 tokens
    tokens = [5, 6] + [3] * grid_tokens + [7]
    values = torch.zeros(24, 3 * 2 * 14 * 14)
    from megavl.data.batch import ImagePatches

    sample = Sample(tokens=tokens, labels=[-100] * len(tokens), turn_ids=[0] * len(tokens),
                    images=[ImagePatches(values, (1, 4, 6))])
    positions = mrope_position_ids(sample, image_token_id=3, merge=2)
    assert positions[:, :2].tolist() == [[0, 1]] * 3
    image = positions[:, 2:8]
    assert image[0].tolist() == [2] * 6
    assert image[1].tolist() == [2, 2, 2, 3, 3, 3]
    assert image[2].tolist() == [2, 3, 4, 2, 3, 4]
    assert positions[:, 8].tolist() == [5, 5, 5]


def test_pack_row_marks_documents_images_and_padding():
    config = load_config(str(TINY_CONFIG))
    rng = random.Random(11)
    samples = [random_sample(rng, config, max_images=2) for _ in range(2)]
    row = pack_row(samples, 512, config.model.lm.image_token_id, 2)
    n0, n1 = len(samples[0]), len(samples[1])
    assert row["document_ids"][:n0].eq(0).all() and row["document_ids"][n0 : n0 + n1].eq(1).all()
    assert row["document_ids"][n0 + n1 :].eq(-1).all()
    is_image = row["tokens"] == config.model.lm.image_token_id
    assert torch.equal(is_image, row["image_ids"] >= 0)
    assert len(row["images"]) == len(samples[0].images) + len(samples[1].images)
    assert row["labels"][n0 + n1 :].eq(-100).all()
