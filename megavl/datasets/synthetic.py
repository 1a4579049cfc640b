"""A small synthetic vision-language corpus: WebDataset shards plus a tokenizer.

Six tasks over drawn shapes and rendered words, in English and Arabic:
counting, pointing, boxes, reading, multi_qa (2-4 questions on one image)
and multi_image (two images in one sample). The answers are exact by
construction, so a tiny model's progress on them is measurable.

Layout written by ``generate(out_dir, ...)``::

    out_dir/train/shard-000000.tar ...   WebDataset shards, energon-prepared
    out_dir/train/.nv-meta/             (split part "train"; val: split part "val")
    out_dir/val/shard-000000.tar ...
    out_dir/tokenizer/                  trained on the train conversations
    out_dir/manifest.json               counts and parameters (written last)

A sample with key ``train-0000042`` holds ``train-0000042.json`` and one PNG
per ``<image>`` placeholder, ``train-0000042.img0.png``, ``.img1.png``, ... in
the order the placeholders appear in the user turns. A grounding record also holds
``target_boxes``: per QA turn, the named object's box on the 0..1000 scale. Coordinates in answers
are integers on a 0..1000 scale of the image's width and height.

The same seed and parameters give byte-identical shards: every sample draws
from its own generator seeded by (seed, split, index), tar headers carry a
fixed mtime, and PNG encoding is deterministic.

The tasks are in synthetic_tasks.py, the drawing in synthetic_scenes.py; this
module writes the corpus and checks what drawing it needs (a font with Arabic
glyphs, Arabic shaping).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from typing import Iterable, Iterator, Optional

from PIL import Image, features

from megavl.data.tokenizer import IMAGE_PLACEHOLDER, render_chat, train_tokenizer
from megavl.datasets.energon_meta import write_energon_metadata
from megavl.datasets.shards import TEMPORARY_SUFFIX, ShardWriter
from megavl.datasets.synthetic_scenes import Scene, draw_scene, draw_text, png_bytes
from megavl.datasets.synthetic_tasks import TASK_BUILDERS, TASKS, Picture

SPLITS = ["train", "val"]
ARABIC_FRACTION = 0.3


# ---------------------------------------------------------------- fonts

# Each needs Latin and Arabic glyphs; Debian's fonts-dejavu-core gives the first.
FONT_CANDIDATES = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",  # Debian/Ubuntu fonts-dejavu-core
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",  # Fedora dejavu-sans-fonts
    "/usr/share/fonts/TTF/DejaVuSans.ttf",  # Arch ttf-dejavu
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/local/share/fonts/DejaVuSans.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
    "/System/Library/Fonts/Supplemental/Arial Unicode.ttf",
    "C:/Windows/Fonts/arial.ttf",
]
FONT_ENV = "MEGAVL_FONT"


def find_font() -> str:
    """Path of a TrueType font with Latin and Arabic glyphs (``$MEGAVL_FONT`` first)."""
    override = os.environ.get(FONT_ENV)
    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"${FONT_ENV} names {override!r}, which is not a file")
        return override
    for path in FONT_CANDIDATES + _matplotlib_font():
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        "no font with Arabic glyphs found (looked in " + ", ".join(FONT_CANDIDATES) + "). "
        "Install one: `apt-get install fonts-dejavu-core` on Debian/Ubuntu, "
        f"or set ${FONT_ENV} to a .ttf with Latin and Arabic glyphs"
    )


def _matplotlib_font() -> list[str]:
    # matplotlib, when installed, ships DejaVu Sans: a pip-only route to a font.
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = list(spec.submodule_search_locations)[0]
    return [os.path.join(root, "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")]


def check_arabic_rendering() -> None:
    """Raises with the install step if Arabic can't be drawn with joined letters."""
    if features.check("raqm"):
        return
    try:
        import arabic_reshaper  # noqa: F401
        import bidi  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "Pillow cannot shape Arabic: its raqm layout engine is unavailable. Pillow's wheels "
            "bundle raqm but load FriBiDi from the system: `apt-get install libfribidi0` "
            "(Debian/Ubuntu). Alternatively `pip install arabic-reshaper python-bidi`."
        ) from None


# ---------------------------------------------------------------- samples


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:07d}"


def check_task_weights(weights: Optional[dict]) -> None:
    if weights is None:
        return
    unknown = sorted(set(weights) - set(TASKS))
    if unknown:
        raise ValueError(f"task weights name unknown tasks {unknown}; the tasks are {TASKS}")
    bad = {task: w for task, w in weights.items() if not isinstance(w, (int, float)) or w < 0}
    if bad or not any(weights.values()):
        raise ValueError(f"task weights {weights}: each must be a number >= 0, and one > 0")


def _task_order(seed: int, split: str, count: int, weights: Optional[dict] = None) -> list[str]:
    """Each sample's task, in shuffled order: balanced (every task within one of count / 6), or
    with ``weights`` ({task: weight}, missing tasks 0) in proportion, by largest remainder."""
    if weights is None:
        order = [TASKS[i % len(TASKS)] for i in range(count)]
    else:
        total = sum(weights.values())
        shares = {task: count * weights.get(task, 0) / total for task in TASKS}
        counts = {task: int(share) for task, share in shares.items()}
        by_remainder = sorted(TASKS, key=lambda t: (-(shares[t] - counts[t]), TASKS.index(t)))
        for task in by_remainder[:count - sum(counts.values())]:
            counts[task] += 1
        order = [task for task in TASKS for _ in range(counts[task])]
    random.Random(f"{seed}/{split}/tasks").shuffle(order)
    return order


def make_sample(seed: int, split: str, index: int, task: str) -> tuple[dict, list[bytes]]:
    """(the sample's JSON record, its images as PNG bytes); depends only on the arguments."""
    rng = random.Random(f"{seed}/{split}/{index}")
    language = "ar" if rng.random() < ARABIC_FRACTION else "en"
    turns, pictures, grounding = TASK_BUILDERS[task](rng, language)
    prefix = (IMAGE_PLACEHOLDER + "\n") * len(pictures)
    conversations, target_boxes = [], []
    for i, (question, answer, *box) in enumerate(turns):
        conversations.append({"role": "user", "content": (prefix if i == 0 else "") + question})
        conversations.append({"role": "assistant", "content": answer})
        target_boxes.append(box[0] if box else None)
    key = sample_key(split, index)
    record = {
        "id": key,
        "task": task,
        "language": language,
        "grounding": grounding,
        "conversations": conversations,
    }
    if grounding:
        # Per turn, the named object's box (0..1000): a pointing answer hits when inside it.
        record["target_boxes"] = target_boxes
    # After the task: a text picture's layout draws from rng, following all the task drew.
    return record, [png_bytes(_draw(picture, rng)) for picture in pictures]


def _draw(picture: Picture, rng: random.Random) -> Image.Image:
    if isinstance(picture, Scene):
        return draw_scene(picture)
    return draw_text(rng, picture.text, find_font())


def iter_samples(seed: int, split: str, count: int,
                 task_weights: Optional[dict] = None) -> Iterator[tuple[dict, list[bytes]]]:
    for index, task in enumerate(_task_order(seed, split, count, task_weights)):
        yield make_sample(seed, split, index, task)


# ---------------------------------------------------------------- shards


def _tar_members(record: dict, images: list[bytes]) -> list[tuple[str, bytes]]:
    members = [("json", json.dumps(record, ensure_ascii=False, sort_keys=True).encode())]
    members += [(f"img{i}.png", data) for i, data in enumerate(images)]
    return members


def _clear_split_dir(split_dir: str) -> None:
    # Shards of an earlier, larger run would otherwise be picked up by globs,
    # and their energon index would describe the wrong files.
    for name in os.listdir(split_dir):
        if name.startswith("shard-") and name.endswith((".tar", TEMPORARY_SUFFIX, ".tar.idx")):
            os.remove(os.path.join(split_dir, name))
    shutil.rmtree(os.path.join(split_dir, ".nv-meta"), ignore_errors=True)


def write_shards(
    samples: Iterable[tuple[dict, list[bytes]]], split_dir: str, samples_per_shard: int
) -> list[str]:
    """Writes samples into shard-NNNNNN.tar files (megavl.datasets.shards); returns their names."""
    writer = ShardWriter(split_dir, "shard", samples_per_shard)
    os.makedirs(split_dir, exist_ok=True)
    _clear_split_dir(split_dir)
    for record, images in samples:
        writer.add(record["id"], _tar_members(record, images))
    return writer.close()


# ---------------------------------------------------------------- corpus


def _write_split(out_dir: str, split: str, count: int, seed: int, samples_per_shard: int, texts: list[str],
                 task_weights: Optional[dict] = None):
    tasks, languages = Counter(), Counter()
    stats = Counter()

    def tracked() -> Iterator[tuple[dict, list[bytes]]]:
        for record, images in iter_samples(seed, split, count, task_weights):
            tasks[record["task"]] += 1
            languages[record["language"]] += 1
            stats["images"] += len(images)
            stats["grounding"] += int(record["grounding"])
            stats["turns"] += len(record["conversations"]) // 2
            texts.append(render_chat(record["conversations"]))
            yield record, images

    split_dir = os.path.join(out_dir, split)
    shards = write_shards(tracked(), split_dir, samples_per_shard)
    # Energon's index and dataset.yaml make the folder a dataset the loader
    # reads; the split part is named after the folder (train / val).
    write_energon_metadata(split_dir, shards, split=split)
    return {
        "samples": count,
        "shards": shards,
        "images": stats["images"],
        "qa_turns": stats["turns"],
        "grounding_samples": stats["grounding"],
        "tasks": {task: tasks[task] for task in TASKS},
        "languages": {lang: languages[lang] for lang in ("en", "ar")},
    }


def generate(
    out_dir: str,
    train_samples: int = 2000,
    val_samples: int = 100,
    seed: int = 0,
    vocab_size: int = 2048,
    samples_per_shard: int = 250,
    task_weights: Optional[dict] = None,
) -> dict:
    """Writes shards, tokenizer and manifest.json under ``out_dir``; returns the manifest.
    ``task_weights`` ({task: weight}) mixes the tasks in proportion (None: equally)."""
    check_task_weights(task_weights)
    check_arabic_rendering()
    find_font()
    parameters = {
        "train_samples": train_samples,
        "val_samples": val_samples,
        "seed": seed,
        "vocab_size": vocab_size,
        "samples_per_shard": samples_per_shard,
    }
    if task_weights is not None:
        parameters["task_weights"] = dict(task_weights)
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # its absence marks a corpus being rewritten

    # The tokenizer learns from the train split only, so val stays unseen text.
    train_texts: list[str] = []
    splits = {
        "train": _write_split(out_dir, "train", train_samples, seed, samples_per_shard, train_texts, task_weights),
        "val": _write_split(out_dir, "val", val_samples, seed, samples_per_shard, [], task_weights),
    }
    tokenizer = train_tokenizer(train_texts, vocab_size, os.path.join(out_dir, "tokenizer"))

    manifest = {
        "seed": seed,
        "parameters": parameters,
        "tasks": list(TASKS),
        "splits": splits,
        "tokenizer": {"path": "tokenizer", "vocab_size": len(tokenizer)},
        "coordinates": "integers 0..1000 relative to image width and height",
    }
    with open(manifest_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(manifest_path + ".tmp", manifest_path)
    return manifest
