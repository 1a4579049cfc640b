"""PackedDataStream over small WebDataset shards: bad data skipped, rank split, exact resume."""

from __future__ import annotations

import io
import json
import logging
import random
import re
import tarfile

import pytest
import torch
import webdataset as wds
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from megavl.config import Config
from megavl.data.loader import PackedDataStream, count_answer_tokens

# Order gives <|image_pad|> id 3, the default model.lm.image_token_id.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>",
    "<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
]
SIZES = [(56, 56), (84, 112), (112, 70)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    corpus = [
        "You are a helpful assistant.", "system\n", "user\n", "assistant\n",
        "What is in picture k012? Describe it.", "answer for k003: a red square at (12,34),(56,78).",
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(corpus * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|endoftext|>")


def image_bytes(rng: random.Random, size: tuple[int, int], fmt: str) -> bytes:
    height, width = size
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    image.putpixel((1, 1), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def record(rng: random.Random, key: str, images: int) -> dict:
    sample = {"__key__": key}
    for i in range(images):
        fmt = rng.choice(["png", "jpeg"])
        sample[f"img{i}.{'png' if fmt == 'png' else 'jpg'}"] = image_bytes(rng, rng.choice(SIZES), fmt)
    question = "<image>" * images + f"What is in picture {key}?"
    answer = f"answer for {key}: a red square at <|box_start|>(12,34),(56,78)<|box_end|>."
    meta = {
        "id": key, "task": "vqa", "language": "en", "grounding": rng.random() < 0.5,
        "conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
    }
    sample["json"] = json.dumps(meta).encode()
    return sample


def write_shard(path, samples) -> None:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four shards: 21 usable samples, three bad ones and a truncated last shard."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("shards")
    good = [record(rng, f"k{i:03d}", rng.randint(0, 2)) for i in range(22)]

    bad_image = record(rng, "bad-image", 1)
    data = next(v for k, v in bad_image.items() if k.startswith("img0"))
    bad_image[next(k for k in bad_image if k.startswith("img0"))] = data[: len(data) // 2]
    missing_image = record(rng, "missing-image", 2)
    del missing_image[next(k for k in missing_image if k.startswith("img1"))]
    bad_json = record(rng, "bad-json", 0)
    bad_json["json"] = b'{"id": "bad-json", "conversations": ['

    write_shard(root / "shard-000.tar", good[0:3] + [bad_image] + good[3:6])
    write_shard(root / "shard-001.tar", good[6:9] + [missing_image, bad_json] + good[9:12])
    write_shard(root / "shard-002.tar", good[12:18])
    # The last shard breaks off inside k021's first member.
    last = root / "shard-003.tar"
    write_shard(last, good[18:22])
    with tarfile.open(last) as tar:
        cut = next(m for m in tar.getmembers() if m.name.startswith("k021.")).offset_data + 5
    last.write_bytes(last.read_bytes()[:cut])
    return root, {f"k{i:03d}" for i in range(21)}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def make_config() -> Config:
    config = Config()
    config.train.seq_length = 256
    config.train.micro_batch_size = 2
    config.data.resolution.max_pixels = 112 * 112
    config.data.max_images_per_pack = 3
    return config


def keys_in(batch: dict, tokenizer) -> list[str]:
    keys = []
    for tokens, docs in zip(batch["tokens"], batch["document_ids"]):
        for doc in docs.unique().tolist():
            if doc >= 0:
                text = tokenizer.decode(tokens[docs == doc].tolist())
                keys += re.findall(r"answer for (k\d{3})", text)
    return keys


def stream(dataset, tokenizer, **kwargs) -> PackedDataStream:
    options = dict(rank=0, world_size=1, seed=3, shuffle=True, infinite=False)
    options.update(kwargs)
    return PackedDataStream(dataset[0], tokenizer, make_config(), **options)


def test_one_pass_skips_bad_samples_and_logs_them(dataset, tokenizer, caplog):
    root, expected = dataset
    data = stream(dataset, tokenizer, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="megavl.data.loader"):
        batches = list(data)
    seen = [key for batch in batches for key in keys_in(batch, tokenizer)]
    assert sorted(seen) == sorted(expected)
    for batch in batches:
        assert batch["tokens"].shape == (2, 256)
        assert count_answer_tokens(batch) == int(batch["loss_mask"].sum()) > 0
    assert data.stats.skipped == {"bad_image": 1, "missing_image": 1, "bad_json": 1, "truncated_shard": 1}
    assert data.stats.samples_read == 21 + 3
    assert data.stats.samples_used == 21
    assert data.stats.packing.packs == sum(
        int((b["document_ids"] >= 0).any(dim=1).sum()) for b in batches
    )
    assert 0 < data.stats.packing_efficiency <= 1

    messages = [r.getMessage() for r in caplog.records]
    for key, reason in [("bad-image", "bad_image"), ("missing-image", "missing_image"), ("bad-json", "bad_json")]:
        assert any(f"'{key}'" in m and reason in m for m in messages), (key, messages)
    assert any(str(root / "shard-003.tar") in m and "truncated" in m for m in messages)


def test_ranks_see_disjoint_samples_covering_everything(dataset, tokenizer):
    _, expected = dataset
    per_rank = []
    for rank in range(2):
        batches = list(stream(dataset, tokenizer, rank=rank, world_size=2))
        keys = [key for batch in batches for key in keys_in(batch, tokenizer)]
        assert len(keys) == len(set(keys))
        per_rank.append(set(keys))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == expected


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name in x:
            if x[name] is None:
                assert y[name] is None, name
            else:
                assert torch.equal(x[name], y[name]), name


@pytest.mark.parametrize(
    "consumed, options",
    [
        (1, dict(infinite=True, rank=1, world_size=2, pack_buffer_size=3)),
        (4, dict(infinite=True, rank=1, world_size=2, pack_buffer_size=3)),
        (2, dict(infinite=False)),
    ],
)
def test_resume_yields_exactly_the_uninterrupted_batches(dataset, tokenizer, consumed, options):
    following = 6
    reference = stream(dataset, tokenizer, **options)
    for _ in range(consumed):
        next(reference)
    # Checkpoints store the state as plain data.
    state = json.loads(json.dumps(reference.state_dict()))
    expected = [batch for _, batch in zip(range(following), reference)]

    resumed = stream(dataset, tokenizer, **options)
    resumed.load_state_dict(state)
    actual = [batch for _, batch in zip(range(following), resumed)]
    assert_same_batches(expected, actual)
    assert resumed.stats.state_dict() == reference.stats.state_dict()
    if options["infinite"]:
        assert len(actual) == following
        assert reference.state_dict()["epoch"] >= 1  # the comparison crossed an epoch boundary


def test_state_from_another_setting_is_refused(dataset, tokenizer):
    state = stream(dataset, tokenizer, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        stream(dataset, tokenizer, rank=0, world_size=4).load_state_dict(state)


# -- image decoding, the first stage of every record --------------------------


def test_decode_image_refuses_corrupt_bytes_and_bombs():
    from megavl.data.images import ImageDecodeError, decode_image

    data = image_bytes(random.Random(1), (100, 100), "png")
    assert decode_image(data).size == (100, 100)
    with pytest.raises(ImageDecodeError, match="corrupt|unreadable"):
        decode_image(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="unreadable"):
        decode_image(b"not an image")
    # Refused from the header alone: the size check runs before any pixel is decoded.
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(data[:100], max_pixels_allowed=5000)


def test_image_preprocessing_matches_qwen2_vl_reference():
    reference = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    from megavl.data.images import image_to_model_input, smart_resize

    rng = random.Random(2)
    for _ in range(2000):
        h, w = rng.randint(1, 4000), rng.randint(1, 4000)
        if max(h, w) / min(h, w) <= 200:
            assert smart_resize(h, w, 28, 3136, 50176) == reference.smart_resize(h, w, 28, 3136, 50176)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)

    config = Config()
    config.data.resolution.max_pixels = 50176
    pixels = torch.randint(0, 256, (300, 200, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    processor = reference.Qwen2VLImageProcessorPil(min_pixels=config.data.resolution.min_pixels, max_pixels=config.data.resolution.max_pixels)
    expected = processor(images=[image], return_tensors="pt")
    patches = image_to_model_input(image, config)
    assert patches.grid_thw == tuple(expected["image_grid_thw"][0].tolist())
    torch.testing.assert_close(patches.pixel_values, expected["pixel_values"], atol=1e-5, rtol=0)
