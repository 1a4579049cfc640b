"""Random but well-formed samples, for smoke tests, parallel-equivalence checks and benchmarks."""

from __future__ import annotations

import random
from typing import Optional, Sequence

import torch

from megavl.config import Config
from megavl.data.batch import IGNORE_INDEX, ImagePatches, Sample, collate_rows, pack_row
from megavl.data.image_patches import image_to_patches
from megavl.data.tokenizer import SPECIAL_TOKENS

# Random text never uses the tokenizer's special tokens (ids 0..11).
_FIRST_TEXT_ID = len(SPECIAL_TOKENS)


def random_image(rng: random.Random, config: Config, sides: Optional[Sequence[int]] = None) -> ImagePatches:
    """A random image with sides from `sides`, by default 2-4 merged tokens (patch * merge pixels)."""
    v = config.model.vision
    sides = sides or tuple(k * v.patch_size * v.spatial_merge_size for k in (2, 3, 4))
    height, width = rng.choice(sides), rng.choice(sides)
    generator = torch.Generator().manual_seed(rng.getrandbits(31))
    pixels = torch.randn(v.in_channels, height, width, generator=generator)
    values, grid = image_to_patches(pixels, v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
    return ImagePatches(values, grid)


def random_sample(
    rng: random.Random,
    config: Config,
    max_images: int = 2,
    sides: Optional[Sequence[int]] = None,
    conversation_masking: bool = False,
) -> Sample:
    """Context text, 0..max_images images, then 1-3 question/answer turns with loss on answers."""
    lm = config.model.lm
    merge = config.model.vision.spatial_merge_size

    def text(n: int) -> list[int]:
        return [rng.randrange(_FIRST_TEXT_ID, lm.vocab_size) for _ in range(n)]

    tokens, trained, turns, images = [], [], [], []
    tokens += text(rng.randint(1, 6))
    for _ in range(rng.randint(0, max_images)):
        image = random_image(rng, config, sides)
        images.append(image)
        tokens += [lm.image_token_id] * image.num_tokens(merge)
    trained += [False] * len(tokens)
    turns += [0] * len(tokens)
    for turn in range(1, rng.randint(1, 3) + 1):
        question, answer = text(rng.randint(2, 8)), text(rng.randint(1, 6))
        tokens += question + answer
        trained += [False] * len(question) + [True] * len(answer)
        turns += [turn if conversation_masking else 0] * (len(question) + len(answer))
    # Position i predicts token i+1; answer tokens are the targets.
    labels = [tokens[i + 1] if trained[i + 1] else IGNORE_INDEX for i in range(len(tokens) - 1)]
    labels.append(IGNORE_INDEX)
    return Sample(tokens=tokens, labels=labels, turn_ids=turns, images=images)


def random_batches(config: Config, count: int, seed: int, samples_per_row: int = 3, max_images: int = 2) -> list[dict]:
    """`count` microbatches of micro_batch_size packed rows, deterministic by seed; max_images = 0
    gives text-only ones."""
    rng = random.Random(seed)
    t, merge = config.train, config.model.vision.spatial_merge_size
    batches = []
    for _ in range(count):
        rows = []
        for _ in range(t.micro_batch_size):
            samples, used = [], 0
            for _ in range(samples_per_row):
                sample = random_sample(rng, config, max_images, conversation_masking=rng.random() < 0.5)
                if used + len(sample) <= t.seq_length:
                    samples.append(sample)
                    used += len(sample)
            rows.append(pack_row(samples, t.seq_length, config.model.lm.image_token_id, merge,
                                 positions=config.model.lm.image_positions))
        batches.append(collate_rows(rows))
    return batches
