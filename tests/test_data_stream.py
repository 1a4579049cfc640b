"""EnergonDataStream over small prepared datasets: bad data counted, rank split, exact resume,
blending, per-dataset resolution, the max-pixel schedule and the failure-rate stop."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import random
import re
from collections import Counter

import pytest
import torch
import webdataset as wds

from conftest import tiny_tokenizer
from megavl.config import Config, ConfigError
from megavl.config import config_from_dict, validate
from megavl.data.distribute import StepBatches
from megavl.data.energon_stream import DataFailureRateError, EnergonDataStream, check_failure_rates
from megavl.data.trainer_decode import TrainerImageDecoder, decode_place
from megavl.datasets.energon_meta import write_energon_metadata
from test_images import image_bytes

SIZES = [(56, 56), (84, 112), (112, 70)]


def build_tokenizer():
    return tiny_tokenizer([
        "You are a helpful assistant.", "system\n", "user\n", "assistant\n", "<tile_1_1><tile_global>",
        "What is in picture k012? Describe it.", "answer for k003: a red square at (12,34),(56,78).",
    ])


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


def write_dataset(root, shards: list[list[dict]], split: str):
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i, samples in enumerate(shards):
        names.append(f"shard-{i:03d}.tar")
        with wds.TarWriter(str(root / names[-1])) as writer:
            for sample in samples:
                writer.write(sample)
    write_energon_metadata(root, names, split=split)
    return root


GOOD_KEYS = {f"k{i:03d}" for i in range(21)}


def _samples_with_faults() -> list[list[dict]]:
    """21 usable samples, three bad ones and one longer than train.seq_length, in three shards."""
    rng = random.Random(0)
    good = [record(rng, f"k{i:03d}", rng.randint(0, 2)) for i in range(21)]
    bad_image = record(rng, "bad-image", 1)
    name = next(k for k in bad_image if k.startswith("img0"))
    bad_image[name] = bad_image[name][: len(bad_image[name]) // 2]
    missing_image = record(rng, "missing-image", 2)
    del missing_image[next(k for k in missing_image if k.startswith("img1"))]
    bad_json = record(rng, "bad-json", 0)
    bad_json["json"] = b'{"id": "bad-json", "conversations": ['
    too_long = record(rng, "too-long", 1)
    meta = json.loads(too_long["json"])
    meta["conversations"][0]["content"] += " Describe it." * 300
    too_long["json"] = json.dumps(meta).encode()
    return [good[0:3] + [bad_image] + good[3:6], good[6:9] + [missing_image, bad_json] + good[9:12],
            good[12:16] + [too_long] + good[16:21]]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    shards = _samples_with_faults()
    return {split: write_dataset(root / split, shards, split) for split in ("train", "val")}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def make_config(**data) -> Config:
    config = Config()
    config.train.seq_length = 256
    config.train.micro_batch_size = 2
    config.data.resolution.max_pixels = 112 * 112
    config.data.max_images_per_pack = 3
    config.data.image_backend = "pillow"
    config.data.packing_buffer_size = 8
    config.data.shuffle_buffer_size = 4
    config.data.max_samples_per_sequence = 4
    for name, value in data.items():
        setattr(config.data, name, value)
    return config


def keys_in(batch: dict, tokenizer) -> list[str]:
    keys = []
    for tokens, docs in zip(batch["tokens"], batch["document_ids"]):
        for doc in docs.unique().tolist():
            if doc >= 0:
                text = tokenizer.decode(tokens[docs == doc].tolist())
                keys += re.findall(r"answer for ([a-z]*\d{3})", text)
    return keys


def stream(path, tokenizer, config=None, split="train", rank=0, world_size=1, **kwargs) -> EnergonDataStream:
    return EnergonDataStream(path, tokenizer, config or make_config(), rank, world_size, seed=3, split=split, **kwargs)


def test_one_pass_skips_bad_samples_and_logs_them(datasets, tokenizer, caplog):
    data = stream(datasets["val"], tokenizer, split="val")
    with caplog.at_level(logging.WARNING, logger="megavl.data.energon_stream"):
        batches = list(data)
    seen = [key for batch in batches for key in keys_in(batch, tokenizer)]
    assert sorted(seen) == sorted(GOOD_KEYS)
    for batch in batches:
        assert batch["tokens"].shape == (2, 256)
        assert int(batch["loss_mask"].sum()) > 0
    assert data.stats.skipped == {"bad_image": 1, "missing_image": 1, "bad_json": 1, "too_long": 1}
    assert data.stats.read == {"val": 25}
    assert data.stats.real_tokens == sum(int((b["document_ids"] >= 0).sum()) for b in batches)
    assert 0 < data.stats.packing_efficiency <= 1
    messages = [r.getMessage() for r in caplog.records]
    for key, reason in [("bad-image", "bad_image"), ("missing-image", "missing_image"), ("bad-json", "bad_json"),
                        ("too-long", "too_long")]:
        assert any(f"'{key}'" in m and reason in m for m in messages), (key, messages)


def test_ranks_see_disjoint_samples_covering_everything(datasets, tokenizer):
    per_rank = []
    for rank in range(2):
        batches = list(stream(datasets["val"], tokenizer, split="val", rank=rank, world_size=2))
        keys = [key for batch in batches for key in keys_in(batch, tokenizer)]
        assert len(keys) == len(set(keys))
        per_rank.append(set(keys))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == GOOD_KEYS


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name in x:
            if torch.is_tensor(x[name]):
                assert torch.equal(x[name], y[name]), name
            else:
                assert x[name] == y[name], name


@pytest.mark.parametrize("consumed, workers, world_size", [(1, 0, 1), (2, 0, 1), (7, 0, 2), (3, 2, 1)])
def test_resume_yields_exactly_the_uninterrupted_batches(datasets, tokenizer, consumed, workers, world_size):
    config = make_config(num_workers=workers)
    following = 5
    reference = stream(datasets["train"], tokenizer, config, rank=world_size - 1, world_size=world_size)
    for _ in range(consumed):
        next(reference)
    state = reference.state_dict()
    expected = [next(reference) for _ in range(following)]
    reference.close()

    resumed = stream(datasets["train"], tokenizer, config, rank=world_size - 1, world_size=world_size)
    resumed.load_state_dict(state)
    actual = [next(resumed) for _ in range(following)]
    resumed.close()
    assert_same_batches(expected, actual)
    assert resumed.stats.state_dict() == reference.stats.state_dict()


def test_state_from_another_setting_is_refused(datasets, tokenizer):
    state = stream(datasets["train"], tokenizer, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        stream(datasets["train"], tokenizer, rank=0, world_size=4).load_state_dict(state)


def test_a_lower_max_pixel_cap_continues_from_the_same_position(datasets, tokenizer):
    """The schedule's loader rebuild neither repeats nor skips data, and resumes exactly."""
    cap = 56 * 56
    changed = stream(datasets["train"], tokenizer)
    before = [next(changed) for _ in range(2)]
    changed.set_max_pixels(cap)
    after = [next(changed) for _ in range(4)]

    plain = stream(datasets["train"], tokenizer)
    assert_same_batches(before, [next(plain) for _ in range(2)])
    state = plain.state_dict()
    resumed = stream(datasets["train"], tokenizer, max_pixels=cap)
    resumed.load_state_dict(state)
    assert_same_batches(after, [next(resumed) for _ in range(4)])
    for batch in after:
        if batch["image_grid_thw"] is not None:
            pixels = batch["image_grid_thw"][:, 1:].prod(dim=1) * 14 * 14
            assert int(pixels.max()) <= cap


def test_a_truncated_shard_is_left_out_and_counted(tmp_path, tokenizer, caplog):
    root = write_dataset(tmp_path / "cut", _samples_with_faults(), "val")
    split_yaml = (root / ".nv-meta" / "split.yaml").read_text()
    shard = root / "shard-002.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with caplog.at_level(logging.WARNING, logger="megavl.data.energon_stream"):
        data = stream(root, tokenizer, split="val")
        batches = list(data)
    seen = {key for batch in batches for key in keys_in(batch, tokenizer)}
    assert seen == {f"k{i:03d}" for i in range(12)}  # the good samples of the two whole shards
    assert data.stats.skipped == {"bad_image": 1, "missing_image": 1, "bad_json": 1, "truncated_shard": 10}
    assert data.stats.read == {"cut": 25}
    assert any("shard-002.tar: 5000 bytes" in r.getMessage() and "samples cut off" in r.getMessage()
               for r in caplog.records)
    assert (root / ".nv-meta" / "split.yaml").read_text() == split_yaml  # the dataset's own split is untouched

    _metadataset(tmp_path / "meta.yaml", [{"weight": 1, "path": "cut"}])
    meta = (tmp_path / "meta.yaml").read_text().replace("  train:", "  val:")
    (tmp_path / "meta.yaml").write_text(meta)
    with pytest.raises(ValueError, match=r"(?s)truncated shards .*shard-002.tar: 5000 bytes .* samples cut off"):
        stream(tmp_path / "meta.yaml", tokenizer, split="val")


def test_missing_split_part_names_the_parts(datasets, tokenizer):
    with pytest.raises(ValueError, match=r"split parts \['val'\] but the loader needs 'train'"):
        stream(datasets["val"], tokenizer)


def _plain_dataset(root, prefix: str, count: int, images: int = 0):
    rng = random.Random(prefix)
    samples = [record(rng, f"{prefix}{i:03d}", images) for i in range(count)]
    return write_dataset(root, [samples[: count // 2], samples[count // 2 :]], "train")


def _metadataset(path, entries: list[dict]) -> None:
    blend = "\n".join(
        f"      - weight: {e['weight']}\n        path: {e['path']}"
        + (f"\n        subflavors: {json.dumps(e['subflavors'])}" if "subflavors" in e else "")
        for e in entries
    )
    path.write_text(
        "__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n    blend:\n" + blend + "\n"
    )


def test_blend_weights_are_respected(tmp_path, tokenizer):
    _plain_dataset(tmp_path / "often", "often", 40)
    _plain_dataset(tmp_path / "rare", "rare", 40)
    _metadataset(tmp_path / "blend.yaml", [{"weight": 3, "path": "often"}, {"weight": 1, "path": "rare"}])
    data = stream(tmp_path / "blend.yaml", tokenizer)
    counts = Counter()
    while sum(counts.values()) < 600:
        batch = next(data)
        counts.update(re.sub(r"\d+$", "", key) for key in keys_in(batch, tokenizer))
    assert counts.keys() == {"often", "rare"}
    n = sum(counts.values())
    # Binomial(n, 3/4): 5 standard deviations, a false alarm about once in 3 million runs.
    sd = (n * 0.75 * 0.25) ** 0.5
    assert abs(counts["often"] - 0.75 * n) < 5 * sd, counts
    assert data.stats.read.keys() == {"often", "rare"}


def test_dataset_resolution_override_tiles_its_images(tmp_path, tokenizer):
    _plain_dataset(tmp_path / "photos", "photo", 6, images=1)
    _plain_dataset(tmp_path / "docs", "doc", 6, images=1)
    tiling = {"mode": "tiling", "tile_size": 56, "max_tiles": 4, "thumbnail": True, "tile_tags": True}
    _metadataset(tmp_path / "mix.yaml", [
        {"weight": 1, "path": "photos"},
        {"weight": 1, "path": "docs", "subflavors": {"name": "documents", "resolution": tiling}},
    ])
    data = stream(tmp_path / "mix.yaml", tokenizer, make_config(max_images_per_pack=16))
    seen, tiled = set(), 0
    for _ in range(12):
        batch = next(data)
        for tokens, docs in zip(batch["tokens"], batch["document_ids"]):
            for doc in docs.unique().tolist():
                if doc < 0:
                    continue
                ids = tokens[docs == doc].tolist()
                text = tokenizer.decode(ids)
                (key,) = re.findall(r"answer for ([a-z]+)\d{3}", text)
                seen.add(key)
                images = sum(1 for i in ids if i == 4)  # <|vision_start|> opens each image
                if key == "doc":
                    # A 56x56 source is one tile; larger ones get a grid plus the thumbnail.
                    assert "<tile_1_1>" in text
                    assert ("<tile_global>" in text) == (images > 1)
                    tiled += images > 1
                else:
                    assert images == 1 and "<tile_" not in text
    assert seen == {"doc", "photo"} and tiled
    assert data.stats.read.keys() == {"photos", "documents"}


def test_bad_dataset_setting_fails_at_once_naming_the_dataset(tmp_path, tokenizer):
    _plain_dataset(tmp_path / "docs", "doc", 4)
    _metadataset(tmp_path / "bad.yaml", [{"weight": 1, "path": "docs", "subflavors": {"resolution": {"max_tiles": 0}}}])
    with pytest.raises(ConfigError, match=r"blend\[0\] \(docs\): subflavors.resolution.max_tiles = 0"):
        stream(tmp_path / "bad.yaml", tokenizer)


def test_failure_rate_stops_only_above_the_limit_after_enough_samples():
    config = make_config(max_failure_rate=0.05, failure_check_min_samples=200)
    check_failure_rates({"web": 199}, {"web": {"bad_image": 100}}, config)  # too few to judge
    check_failure_rates({"web": 400}, {"web": {"bad_image": 20}}, config)  # exactly 5%
    with pytest.raises(DataFailureRateError, match=r"dataset 'web': 21 of 400 records failed \(5.2%\).*bad_image: 21"):
        check_failure_rates({"web": 400, "ok": 400}, {"web": {"bad_image": 21}}, config)


def test_failures_count_toward_the_rate_through_the_stream(datasets, tokenizer):
    config = make_config(max_failure_rate=0.1, failure_check_min_samples=10)
    data = stream(datasets["val"], tokenizer, config, split="val")
    list(data)
    with pytest.raises(DataFailureRateError, match="dataset 'val': 4 of 25"):
        check_failure_rates(data.stats.read, data.stats.failed, config)


def test_a_restored_pack_finds_its_unpackable_riders_again(tokenizer):
    """Energon restores a pack by re-encoding its records, without the marks select_packs made:
    a rider longer than seq_length must be recognised again, not packed."""
    from megavl.data.batch import Sample
    from megavl.data.task_encoder import make_task_encoder

    config = make_config()
    encoder = make_task_encoder(config, tokenizer, seed=3, max_pixels=None)

    def item(key, length):
        sample = Sample(tokens=[20] * length, labels=[-100] * (length - 1) + [20], turn_ids=[0] * length,
                        images=[], key=key)
        return {"__restore_key__": (), "key": key, "dataset": "d", "sample": sample, "images": [], "failure": None}

    pack = encoder.pack_selected_samples([item("long", 300), item("short", 40)])
    assert [(i["key"], i["failure"] and i["failure"][0]) for i in pack["items"]] == [("long", "too_long"), ("short", None)]
    assert int((pack["row"]["document_ids"] >= 0).sum()) == 40


def test_object_storage_urls_read_like_local_paths(datasets, tokenizer, tmp_path, monkeypatch):
    """Energon's storage layer (multi-storage-client): an msc:// URL, here backed by a POSIX
    profile, gives exactly the batches of the local path."""
    import yaml

    profile = {"profiles": {"shards": {"storage_provider": {"type": "file",
                                                             "options": {"base_path": str(datasets["val"].parent)}}}}}
    (tmp_path / "msc.yaml").write_text(yaml.safe_dump(profile))
    monkeypatch.setenv("MSC_CONFIG", str(tmp_path / "msc.yaml"))
    remote = stream("msc://shards/val", tokenizer, split="val")
    local = stream(datasets["val"], tokenizer, split="val")
    assert_same_batches(list(local), list(remote))
    assert remote.stats.read == local.stats.read


# -- decoding in the training process (data.decode_images_in = trainer) ------------------------


def _tiled_config(**data):
    config = make_config(max_images_per_pack=16, **data)
    config.data.resolution = dataclasses.replace(config.data.resolution, mode="tiling", tile_size=56, max_tiles=4,
                                                 thumbnail=True, tile_tags=True)
    return config


@pytest.mark.parametrize("backend, workers", [("pillow", 0), ("dali", 2)])
def test_decoding_in_the_trainer_gives_the_loaders_batches(tmp_path, tokenizer, backend, workers):
    """The same back end gives the same microbatches decoded in the loader or after it, tiles and
    thumbnails included; the undecoded batch survives pickling (balancing sends it to other ranks)."""
    path = _plain_dataset(tmp_path / "photos", "photo", 10, images=2)
    loader = stream(path, tokenizer, _tiled_config(image_backend=backend, num_workers=workers))
    trainer = stream(path, tokenizer, _tiled_config(image_backend=backend, num_workers=workers,
                                                    decode_images_in="trainer"))
    assert (loader.decode_in_trainer, trainer.decode_in_trainer) == (False, True)
    decoder = TrainerImageDecoder(trainer.config, torch.device("cpu"))
    expected, decoded = [], []
    for _ in range(4):
        expected.append(next(loader))
        batch = pickle.loads(pickle.dumps(next(trainer)))
        assert batch["pixel_values"] is None and batch["encoded_images"]
        assert decoder.decode(batch) == []
        decoded.append(batch)
    assert sum(b["image_grid_thw"].shape[0] for b in expected) > 8  # several parts per image
    assert_same_batches(expected, decoded)


def test_an_image_that_fails_in_the_trainer_masks_its_record_and_is_counted(datasets, tokenizer, caplog):
    """The truncated image passes the header check in the loader and fails when the trainer decodes it:
    its record stays in the row with no loss, the rest train, and the counts equal the loader's."""
    config = make_config(decode_images_in="trainer")
    batches_of = StepBatches(lambda rank, world: stream(datasets["val"], tokenizer, config, split="val"),
                             microbatches=1, dp_rank=0, dp_size=1, layout_invariant=True)
    with caplog.at_level(logging.WARNING, logger="megavl.data.energon_stream"):
        batches = []
        while step := batches_of.next_step():
            batches += step
    assert sorted(key for batch in batches for key in keys_in(batch, tokenizer)) == sorted(GOOD_KEYS)
    assert batches_of.stats.skipped == {"bad_image": 1, "missing_image": 1, "bad_json": 1, "too_long": 1}
    assert batches_of.stats.read == {"val": 25}
    assert any("'bad-image'" in r.getMessage() and "bad_image (img0:" in r.getMessage() for r in caplog.records)
    masked = []
    for batch in batches:
        assert batch["pixel_values"] is None or batch["pixel_values"].shape[0] == int(
            batch["image_grid_thw"].prod(dim=1).sum())
        for row, (tokens, docs) in enumerate(zip(batch["tokens"], batch["document_ids"])):
            for doc in docs.unique().tolist():
                text = tokenizer.decode(tokens[docs == doc].tolist())
                if doc >= 0 and "answer for bad-image" in text:
                    masked.append(bool(batch["loss_mask"][row][docs == doc].any()))
                elif doc >= 0:
                    assert batch["loss_mask"][row][docs == doc].any()
    assert masked == [False]


def test_auto_decodes_in_the_trainer_only_for_dali_on_cuda():
    config = make_config(decode_images_in="auto", image_backend="dali")
    assert decode_place(config, torch.device("cuda", 0)) == "trainer"
    assert decode_place(config, torch.device("cpu")) == "loader"
    assert decode_place(make_config(decode_images_in="auto", image_backend="pillow"), torch.device("cuda", 0)) == "loader"
    assert decode_place(make_config(decode_images_in="trainer"), torch.device("cpu")) == "trainer"
    with pytest.raises(ConfigError, match=r"data.decode_images_in.*'gpu'"):
        validate(config_from_dict({"data": {"decode_images_in": "gpu"}}), 1)
