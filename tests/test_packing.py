"""GreedyPacker: no token lost, all budgets respected, overlong samples dropped and counted."""

from __future__ import annotations

import collections
import logging
import random

import pytest
import torch

from megavl.data.batch import IGNORE_INDEX, ImagePatches, Sample, pack_row
from megavl.data.packing import GreedyPacker, PackingStats

IMAGE_TOKEN = 3
MERGE = 2
SEQ = 64


def make_sample(rng: random.Random, key: str, length: int, images: int = 0) -> Sample:
    """A sample of `length` tokens whose first `images` tokens are one-token images."""
    tokens = [IMAGE_TOKEN] * images + [rng.randrange(10, 1000) for _ in range(length - images)]
    pictures = [ImagePatches(torch.zeros(4, 8), (1, 2, 2)) for _ in range(images)]  # 1 token each
    return Sample(tokens, [IGNORE_INDEX] * length, [0] * length, pictures, key)


def random_samples(seed: int, count: int, max_images: int = 3) -> list[Sample]:
    rng = random.Random(seed)
    return [
        make_sample(rng, f"s{i}", rng.randint(max_images + 1, SEQ // 2), rng.randint(0, max_images))
        for i in range(count)
    ]


def pack_all(packer: GreedyPacker, samples: list[Sample]) -> list[list[Sample]]:
    packs = []
    for sample in samples:
        packs.extend(packer.add(sample))
    return packs + packer.flush()


def test_packing_loses_no_token_and_respects_budgets():
    samples = random_samples(0, 200)
    packer = GreedyPacker(SEQ, max_images_per_pack=4, buffer_size=8)
    packs = pack_all(packer, samples)

    assert sorted(s.key for pack in packs for s in pack) == sorted(s.key for s in samples)
    packed = collections.Counter()
    for pack in packs:
        assert sum(len(s) for s in pack) <= SEQ
        assert sum(len(s.images) for s in pack) <= 4
        row = pack_row(pack, SEQ, IMAGE_TOKEN, MERGE, pad_token_id=0)
        packed.update(row["tokens"][row["document_ids"] >= 0].tolist())
    assert packed == collections.Counter(t for s in samples for t in s.tokens)
    assert packer.stats.packs == len(packs)
    assert packer.stats.samples == len(samples)
    # Near the lower bound set by whichever budget binds (here the images).
    tokens = sum(len(s) for s in samples)
    images = sum(len(s.images) for s in samples)
    lower_bound = max(-(-tokens // SEQ), -(-images // 4))
    assert len(packs) <= 1.1 * lower_bound


def test_efficiency_is_real_over_padded_tokens():
    rng = random.Random(1)
    packer = GreedyPacker(SEQ, max_images_per_pack=8)
    packs = pack_all(packer, [make_sample(rng, f"s{i}", n) for i, n in enumerate([40, 30, 20, 10])])
    assert [[len(s) for s in p] for p in packs] == [[40, 20], [30, 10]]
    assert packer.stats.real_tokens == 100
    assert packer.stats.padded_tokens == 2 * SEQ
    assert packer.stats.efficiency == 100 / 128
    assert GreedyPacker(SEQ, 1).stats.efficiency == 0.0


def test_overlong_samples_are_dropped_counted_and_logged(caplog):
    rng = random.Random(2)
    packer = GreedyPacker(SEQ, max_images_per_pack=2)
    samples = [
        make_sample(rng, "ok-1", 10),
        make_sample(rng, "too-long", SEQ + 1),
        make_sample(rng, "too-many-images", 10, images=3),
        make_sample(rng, "ok-2", SEQ),  # exactly full fits
    ]
    with caplog.at_level(logging.WARNING, logger="megavl.data.packing"):
        packs = pack_all(packer, samples)
    assert sorted(s.key for p in packs for s in p) == ["ok-1", "ok-2"]
    assert packer.stats.dropped_too_long == 1
    assert packer.stats.dropped_too_many_images == 1
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "'too-long'" in messages[0] and "'too-many-images'" in messages[1]


def test_emission_policy():
    rng = random.Random(3)
    packer = GreedyPacker(SEQ, max_images_per_pack=8, buffer_size=2)
    # A pack that reaches seq_length exactly is emitted at once.
    assert packer.add(make_sample(rng, "a", 40)) == []
    assert [s.key for p in packer.add(make_sample(rng, "b", 24)) for s in p] == ["a", "b"]
    # Beyond buffer_size open packs, the fullest one goes.
    assert packer.add(make_sample(rng, "c", 50)) == []
    assert packer.add(make_sample(rng, "d", 60)) == []
    emitted = packer.add(make_sample(rng, "e", 55))
    assert [[s.key for s in p] for p in emitted] == [["d"]]
    assert [[s.key for s in p] for p in packer.flush()] == [["c"], ["e"]]


def test_packing_is_deterministic_and_pending_round_trips():
    samples = random_samples(4, 80)
    keys = lambda packs: [[s.key for s in p] for p in packs]  # noqa: E731
    first = keys(pack_all(GreedyPacker(SEQ, 4, buffer_size=6), samples))
    assert first == keys(pack_all(GreedyPacker(SEQ, 4, buffer_size=6), samples))

    # Restoring the open packs into a fresh packer continues identically.
    original = GreedyPacker(SEQ, 4, buffer_size=6)
    head = [p for s in samples[:40] for p in original.add(s)]
    restored = GreedyPacker(SEQ, 4, buffer_size=6)
    restored.load_pending(original.pending())
    tail = [p for s in samples[40:] for p in restored.add(s)] + restored.flush()
    assert keys(head) + keys(tail) == first


# -- the vision-token budget ---------------------------------------------------


def make_vision_sample(rng: random.Random, key: str, length: int, image_tokens: list[int]) -> Sample:
    """A sample of `length` tokens that opens with images of the given merged-token counts."""
    pads = sum(image_tokens)
    tokens = [IMAGE_TOKEN] * pads + [rng.randrange(10, 1000) for _ in range(length - pads)]
    # A (1, 2, 2n) patch grid merges 2x2 into n tokens.
    pictures = [ImagePatches(torch.zeros(4 * n, 8), (1, 2, 2 * n)) for n in image_tokens]
    return Sample(tokens, [IGNORE_INDEX] * length, [0] * length, pictures, key)


def random_vision_samples(seed: int, count: int) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for i in range(count):
        image_tokens = [rng.randint(1, 12) for _ in range(rng.randint(0, 2))]
        length = rng.randint(sum(image_tokens) + 1, SEQ // 2)
        samples.append(make_vision_sample(rng, f"v{i}", length, image_tokens))
    return samples


def test_vision_budget_is_respected_and_only_counted_drops_are_lost(caplog):
    budget = 16
    samples = random_vision_samples(5, 300)
    packer = GreedyPacker(SEQ, max_images_per_pack=4, buffer_size=8, max_vision_tokens_per_pack=budget)
    with caplog.at_level(logging.WARNING, logger="megavl.data.packing"):
        packs = pack_all(packer, samples)

    too_many = {s.key for s in samples if packer.vision_tokens([s]) > budget}
    assert too_many  # the mix must exercise the drop
    assert packer.stats.dropped_too_many_vision_tokens == len(too_many)
    assert sorted(s.key for p in packs for s in p) == sorted(s.key for s in samples if s.key not in too_many)
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == len(too_many)
    assert all("max_vision_tokens_per_pack=16" in m for m in logged)
    assert {m.split("'")[1] for m in logged} == too_many

    for pack in packs:
        assert packer.vision_tokens(pack) <= budget
        assert sum(len(s) for s in pack) <= SEQ
        assert sum(len(s.images) for s in pack) <= 4
        pack_row(pack, SEQ, IMAGE_TOKEN, MERGE)  # the merged counts agree with the image-pad tokens
    assert packer.stats.vision_tokens == sum(packer.vision_tokens(p) for p in packs)
    assert packer.stats.vision_tokens_per_pack == packer.stats.vision_tokens / len(packs)


def test_vision_budget_keeps_first_fit():
    rng = random.Random(6)
    packer = GreedyPacker(SEQ, max_images_per_pack=8, max_vision_tokens_per_pack=10)
    samples = [
        make_vision_sample(rng, "a", 20, [8]),
        make_vision_sample(rng, "b", 20, [4]),  # tokens fit beside a, vision tokens do not
        make_vision_sample(rng, "c", 10, [2]),  # first pack with room: a's
        make_vision_sample(rng, "d", 10, []),  # text only: a's pack still has token room
    ]
    assert [[s.key for s in p] for p in pack_all(packer, samples)] == [["a", "c", "d"], ["b"]]
    assert packer.stats.vision_tokens == 14


def test_no_vision_budget_by_default():
    rng = random.Random(7)
    packer = GreedyPacker(SEQ, max_images_per_pack=8)
    samples = [make_vision_sample(rng, k, 30, [25]) for k in "ab"]
    assert [[s.key for s in p] for p in pack_all(packer, samples)] == [["a", "b"]]
    assert packer.stats.dropped_too_many_vision_tokens == 0


def test_vision_tokens_follow_the_merge_size():
    sample = Sample([0], [0], [0], [ImagePatches(torch.zeros(0, 8), (2, 4, 6))], "k")
    assert GreedyPacker(SEQ, 8).vision_tokens([sample]) == 12
    assert GreedyPacker(SEQ, 8, spatial_merge_size=1).vision_tokens([sample]) == 48


def test_pending_round_trips_under_a_vision_budget():
    samples = random_vision_samples(8, 120)
    keys = lambda packs: [[s.key for s in p] for p in packs]  # noqa: E731
    make = lambda: GreedyPacker(SEQ, 4, buffer_size=5, max_vision_tokens_per_pack=20)  # noqa: E731
    first = keys(pack_all(make(), samples))
    original, restored = make(), make()
    head = [p for s in samples[:60] for p in original.add(s)]
    restored.load_pending(original.pending())
    tail = [p for s in samples[60:] for p in restored.add(s)] + restored.flush()
    assert keys(head) + keys(tail) == first


def test_invalid_vision_arguments_are_named():
    with pytest.raises(ValueError, match="max_vision_tokens_per_pack = -1"):
        GreedyPacker(SEQ, 8, max_vision_tokens_per_pack=-1)
    with pytest.raises(ValueError, match="spatial_merge_size = 0"):
        GreedyPacker(SEQ, 8, spatial_merge_size=0)


def test_stats_load_states_saved_without_the_vision_counters():
    stats = PackingStats(seq_length=SEQ, packs=3, vision_tokens=7, dropped_too_many_vision_tokens=2)
    old = {k: v for k, v in stats.state_dict().items() if "vision" not in k}
    restored = PackingStats()
    restored.load_state_dict(old)
    assert restored == PackingStats(seq_length=SEQ, packs=3)
    restored.load_state_dict(stats.state_dict())
    assert restored == stats
    with pytest.raises(ValueError, match="'packs'"):
        restored.load_state_dict({k: v for k, v in old.items() if k != "packs"})


def test_image_positions_spatial_or_sequential():
    """An image of 2x2 merged tokens between text: spatial ids share the image's temporal position and
    spread over height and width; sequential ids number every token one after the other."""
    tokens = [20, 21] + [IMAGE_TOKEN] * 4 + [22]
    image = ImagePatches(torch.zeros(16, 8), (1, 4, 4))  # 4x4 patches -> 2x2 merged tokens
    sample = Sample(tokens, [IGNORE_INDEX] * 7, [0] * 7, [image], "k")
    spatial = pack_row([sample, sample], 16, IMAGE_TOKEN, MERGE)["position_ids"]
    sequential = pack_row([sample, sample], 16, IMAGE_TOKEN, MERGE, positions="sequential")["position_ids"]
    assert spatial[:, :7].tolist() == [[0, 1, 2, 2, 2, 2, 4], [0, 1, 2, 2, 3, 3, 4], [0, 1, 2, 3, 2, 3, 4]]
    # Each packed sample starts again at 0; all three rows are the same 1-D positions.
    assert sequential[0, :14].tolist() == list(range(7)) * 2
    assert (sequential[:, :14] == sequential[0, :14]).all()
    with pytest.raises(ValueError, match="model.lm.image_positions"):
        pack_row([sample], 16, IMAGE_TOKEN, MERGE, positions="1d")
