"""Prints how much of the LM's token slots hold real tokens: greedy packing vs padding.

    python benchmarks/packing_efficiency.py
    python benchmarks/packing_efficiency.py --samples 50000 --seq-lengths 4096 8192 16384

Efficiency = real tokens / token slots the LM computes on (rows *
seq_length when packing; rows * the longest row of a micro-batch when
padding). Compared on the same samples:

* The training loader's packing (megavl.data.task_encoder.select_packs):
  first-fit decreasing over each buffer of data.packing_buffer_size samples
  that energon hands the task encoder, packs closed at the buffer's end.
* GreedyPacker (megavl.data.packing) streaming, first fit under the token
  budget, the image budget and optionally a vision-token budget.
* Padding every sample to the longest sample of its micro-batch (B samples
  per micro-batch, in arrival order): what a loader without packing does.
* Padding every sample to seq_length: one sample per row.

Samples longer than seq_length cannot be trained on whole by any method and
are left out of all of them (the packer counts them as dropped).

The length mix imitates VLM pretraining data (``vlm_mix``, fixed seed):

* 60% captions: 40-150 text tokens and one image;
* 30% question-answer pairs: 100-600 text tokens and one image (a fifth of
  them two);
* 10% interleaved documents: 1,500-12,000 tokens in all (log-uniform, so
  shorter documents are more common), 0-4 images.

Images keep a native-resolution shape: merged grids of 8-28 x 8-28 tokens
(64-784 vision tokens, i.e. 448-1568 px sides at 14 px patches with a 2x2
merge), a few hundred on average. Samples are real ``Sample`` objects with
``ImagePatches`` whose pixel values are empty (the packer reads only the grids).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
from typing import Iterator

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megavl.data.batch import IGNORE_INDEX, ImagePatches, Sample  # noqa: E402
from megavl.data.packing import GreedyPacker  # noqa: E402

IMAGE_PAD = 3
TEXT = 1000
MERGE = 2
_NO_PIXELS = torch.empty(0, 3 * 2 * 14 * 14)


# Dropped samples are counted in the packer's stats; one warning each would bury the table.
logging.getLogger("megavl.data.packing").setLevel(logging.ERROR)


def _image(rng: random.Random) -> ImagePatches:
    h, w = rng.randint(8, 28), rng.randint(8, 28)  # merged tokens per side
    return ImagePatches(_NO_PIXELS, (1, h * MERGE, w * MERGE))


def _sample(key: str, text: int, images: list[ImagePatches]) -> Sample:
    vision = sum(image.num_tokens(MERGE) for image in images)
    length = vision + text
    return Sample([IMAGE_PAD] * vision + [TEXT] * text, [IGNORE_INDEX] * length, [0] * length, images, key)


def _document(rng: random.Random, key: str) -> Sample:
    length = int(math.exp(rng.uniform(math.log(1500), math.log(12000))))
    images = [_image(rng) for _ in range(rng.randint(0, 4))]
    # Keep documents mostly text, as interleaved web documents are.
    while images and sum(image.num_tokens(MERGE) for image in images) > length // 2:
        images.pop()
    return _sample(key, length - sum(image.num_tokens(MERGE) for image in images), images)


def vlm_mix(seed: int) -> Iterator[Sample]:
    """An endless stream of samples with the length mix the module docstring describes."""
    rng = random.Random(seed)
    n = 0
    while True:
        kind = rng.random()
        key = f"{seed}-{n}"
        if kind < 0.6:
            yield _sample(key, rng.randint(40, 150), [_image(rng)])
        elif kind < 0.9:
            images = 2 if rng.random() < 0.2 else 1
            yield _sample(key, rng.randint(100, 600), [_image(rng) for _ in range(images)])
        else:
            yield _document(rng, key)
        n += 1


def take(stream: Iterator[Sample], count: int) -> list[Sample]:
    return [next(stream) for _ in range(count)]


def greedy(samples: list[Sample], seq_length: int, **packer_args) -> dict:
    packer = GreedyPacker(seq_length, spatial_merge_size=MERGE, **packer_args)
    for sample in samples:
        packer.add(sample)
    packer.flush()
    stats = packer.stats
    dropped = stats.dropped_too_long + stats.dropped_too_many_images + stats.dropped_too_many_vision_tokens
    return {"rows": stats.packs, "slots": stats.padded_tokens, "real": stats.real_tokens,
            "vision_per_row": stats.vision_tokens_per_pack, "dropped": dropped}


def loader_buffers(samples: list[Sample], seq_length: int, buffer: int, max_images: int,
                   max_vision_tokens: int = 0) -> dict:
    """What the training loader does: select_packs over consecutive buffers."""
    from megavl.config import Config
    from megavl.data.task_encoder import select_packs

    config = Config()
    config.train.seq_length = seq_length
    config.model.vision.spatial_merge_size = MERGE
    config.data.max_images_per_pack = max_images
    config.data.max_vision_tokens_per_pack = max_vision_tokens
    rows = real = vision = 0
    for start in range(0, len(samples), buffer):
        items = [{"sample": s, "failure": None, "key": s.key, "dataset": "mix"} for s in samples[start:start + buffer]]
        for pack in select_packs(items, config):
            packed = [item["sample"] for item in pack if item["failure"] is None]
            rows += 1
            real += sum(len(s) for s in packed)
            vision += sum(image.num_tokens(MERGE) for s in packed for image in s.images)
    return {"rows": rows, "slots": rows * seq_length, "real": real, "vision_per_row": vision // max(rows, 1),
            "dropped": 0}


def pad_to_longest(samples: list[Sample], micro_batch: int) -> dict:
    real = slots = 0
    for start in range(0, len(samples), micro_batch):
        lengths = [len(s) for s in samples[start : start + micro_batch]]
        real += sum(lengths)
        slots += len(lengths) * max(lengths)
    return {"rows": len(samples), "slots": slots, "real": real, "vision_per_row": None, "dropped": 0}


def pad_to_seq_length(samples: list[Sample], seq_length: int) -> dict:
    return {"rows": len(samples), "slots": len(samples) * seq_length, "real": sum(len(s) for s in samples),
            "vision_per_row": None, "dropped": 0}


def describe(samples: list[Sample]) -> str:
    lengths = sorted(len(s) for s in samples)
    vision = sum(sum(im.num_tokens(MERGE) for im in s.images) for s in samples)
    total = sum(lengths)
    quantile = lambda q: lengths[int(q * (len(lengths) - 1))]  # noqa: E731
    return (
        f"{len(samples)} samples, {total} tokens ({vision / total:.0%} vision); length median {quantile(0.5)}, "
        f"p90 {quantile(0.9)}, p99 {quantile(0.99)}, max {lengths[-1]}"
    )


def report(samples: list[Sample], seq_length: int, micro_batches: list[int]) -> None:
    fitting = [s for s in samples if len(s) <= seq_length]
    print(f"\nseq_length {seq_length}: {len(samples) - len(fitting)} samples longer than seq_length left out")
    rows = [
        *[(f"loader: FFD per {b}-sample buffer, <=64 images", loader_buffers(fitting, seq_length, b, 64))
          for b in (64, 512, 2048)],
        ("greedy, 64 open packs, <=64 images", greedy(fitting, seq_length, max_images_per_pack=64)),
        ("greedy, 64 open packs, <=8 images", greedy(fitting, seq_length, max_images_per_pack=8)),
        ("greedy, 8 open packs, <=64 images", greedy(fitting, seq_length, max_images_per_pack=64, buffer_size=8)),
        (f"greedy, 64 open, <=64 img, <={seq_length // 2} vision tok",
         greedy(fitting, seq_length, max_images_per_pack=64, max_vision_tokens_per_pack=seq_length // 2)),
    ]
    rows += [(f"pad to longest of {b} samples", pad_to_longest(fitting, b)) for b in micro_batches]
    rows.append(("pad to seq_length", pad_to_seq_length(fitting, seq_length)))
    print(f"{'method':<48} {'rows':>7} {'slots (M)':>9} {'efficiency':>10} {'vision/row':>10} {'dropped':>7}")
    for name, r in rows:
        vision = f"{r['vision_per_row']:.0f}" if r["vision_per_row"] is not None else "-"
        print(f"{name:<48} {r['rows']:>7} {r['slots'] / 1e6:>9.1f} {r['real'] / r['slots']:>10.1%} {vision:>10} "
              f"{r['dropped']:>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 16],
                        help="samples per micro-batch for the pad-to-longest baseline")
    args = parser.parse_args()
    samples = take(vlm_mix(args.seed), args.samples)
    print(describe(samples))
    for seq_length in args.seq_lengths:
        report(samples, seq_length, args.micro_batches)


if __name__ == "__main__":
    main()
