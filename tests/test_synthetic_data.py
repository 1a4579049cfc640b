"""The synthetic corpus: shard layout, determinism, and answers checked against the pixels."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter, defaultdict, deque

import numpy as np
import braceexpand
import pytest
import yaml
from PIL import Image

from megavl.data.tokenizer import load_tokenizer
from megavl.datasets import synthetic

TRAIN, VAL, PER_SHARD, SEED = 40, 10, 16, 3

# The test's own reading of the questions, independent of the generator's tables.
RGB = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 20)}
EN_SHAPES = {"circle": "circle", "square": "square", "triangle": "triangle"}
AR_COLOURS = {
    "الأحمر": "red", "الحمراء": "red", "الأخضر": "green", "الخضراء": "green",
    "الأزرق": "blue", "الزرقاء": "blue", "الأصفر": "yellow", "الصفراء": "yellow",
}
AR_SHAPES = {
    "الدائرة": "circle", "الدوائر": "circle", "المربع": "square", "المربعات": "square",
    "المثلث": "triangle", "المثلثات": "triangle",
}
POINT_RE = re.compile(
    r"^<\|object_ref_start\|>(.+)<\|object_ref_end\|><\|point_start\|>\((\d+), (\d+)\)<\|point_end\|>$"
)
BOX_RE = re.compile(
    r"^<\|object_ref_start\|>(.+)<\|object_ref_end\|><\|box_start\|>\[(\d+), (\d+), (\d+), (\d+)\]<\|box_end\|>$"
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    manifest = synthetic.generate(str(out), TRAIN, VAL, seed=SEED, vocab_size=600, samples_per_shard=PER_SHARD)
    return out, manifest


def shard_names(split_dir) -> list[str]:
    return sorted(n for n in os.listdir(split_dir) if n.endswith(".tar"))


def read_split(split_dir) -> list[dict]:
    """Samples in shard order: {"key", "json", "images": {index: PIL image}}."""
    samples: dict[str, dict] = {}
    for name in shard_names(split_dir):
        with tarfile.open(os.path.join(split_dir, name)) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                sample = samples.setdefault(key, {"key": key, "images": {}})
                data = tar.extractfile(member).read()
                if extension == "json":
                    sample["json"] = json.loads(data)
                else:
                    match = re.fullmatch(r"img(\d+)\.png", extension)
                    assert match, f"unexpected member {member.name}"
                    sample["images"][int(match.group(1))] = Image.open(io.BytesIO(data)).convert("RGB")
    return list(samples.values())


@pytest.fixture(scope="module")
def samples(corpus):
    out, _ = corpus
    return {split: read_split(out / split) for split in ("train", "val")}


def all_samples(samples) -> list[dict]:
    return samples["train"] + samples["val"]


# ---------------------------------------------------------------- pixels


def components(image: Image.Image, colour: str) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(shape, pixel box with exclusive ends) of each blob of exactly this colour."""
    pixels = np.asarray(image)
    mask = np.all(pixels == RGB[colour], axis=-1)
    seen = np.zeros_like(mask)
    found = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, points = deque([(y, x)]), []
        while queue:
            cy, cx = queue.popleft()
            points.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        ys, xs = zip(*points)
        box = (min(xs), min(ys), max(xs) + 1, max(ys) + 1)
        fill = len(points) / ((box[2] - box[0]) * (box[3] - box[1]))
        # A full square fills its box, a disc about 0.79 of it, a triangle about half.
        shape = "square" if fill > 0.93 else "circle" if fill > 0.68 else "triangle"
        found.append((shape, box))
    return found


def pixel_count(image: Image.Image, shape, colour) -> int:
    colours = [colour] if colour else list(RGB)
    return sum(1 for c in colours for s, _ in components(image, c) if shape is None or s == shape)


def count_predicate(question: str, language: str):
    """(shape or None, colour or None) that a counting question asks about."""
    if language == "ar":
        words = re.findall("[\u0621-\u064a]+", question)  # letters only, no "؟"
        colour = next((AR_COLOURS[w] for w in words if w in AR_COLOURS), None)
        shape = next((AR_SHAPES[w] for w in words if w in AR_SHAPES), None)
    else:
        words = re.findall(r"[a-z]+", question.lower())
        colour = next((w for w in words if w in RGB), None)
        shape = next((w[:-1] for w in words if w[:-1] in EN_SHAPES), None)
    return shape, colour


def object_from_phrase(phrase: str, language: str) -> tuple[str, str]:
    if language == "ar":
        noun, adjective = phrase.split(" ")
        return AR_SHAPES[noun], AR_COLOURS[adjective]
    the, colour, shape = phrase.split(" ")
    assert the == "the"
    return shape, colour


def qa_pairs(record: dict) -> list[tuple[str, str]]:
    turns = record["conversations"]
    assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
    return [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns), 2)]


def question_text(question: str) -> str:
    return question.replace(synthetic.IMAGE_PLACEHOLDER + "\n", "")


# ---------------------------------------------------------------- layout


def test_shards_layout_and_manifest(corpus, samples):
    out, manifest = corpus
    for split, count in (("train", TRAIN), ("val", VAL)):
        names = shard_names(out / split)
        assert names == manifest["splits"][split]["shards"]
        # Energon-prepared, with the split part named after the folder.
        with open(out / split / ".nv-meta" / "split.yaml") as f:
            parts = yaml.safe_load(f)["split_parts"]
        assert list(parts) == [split]
        assert [n for pattern in parts[split] for n in braceexpand.braceexpand(pattern)] == names
        assert len(names) == -(-count // PER_SHARD)
        assert all(re.fullmatch(r"shard-\d{6}\.tar", n) for n in names), "temporary files left behind"
        got = samples[split]
        assert [s["key"] for s in got] == [f"{split}-{i:07d}" for i in range(count)]
        info = manifest["splits"][split]
        assert info["samples"] == count
        assert info["tasks"] == {t: Counter(s["json"]["task"] for s in got)[t] for t in synthetic.TASKS}
        assert info["languages"] == {lang: Counter(s["json"]["language"] for s in got)[lang] for lang in ("en", "ar")}
        assert info["images"] == sum(len(s["images"]) for s in got)
    assert manifest["seed"] == SEED
    assert manifest["parameters"]["samples_per_shard"] == PER_SHARD
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert min(manifest["splits"]["train"]["tasks"].values()) >= TRAIN // len(synthetic.TASKS)


def test_every_sample_has_json_and_one_image_per_placeholder(samples):
    for sample in all_samples(samples):
        record = sample["json"]
        assert record["id"] == sample["key"]
        assert record["task"] in synthetic.TASKS and record["language"] in ("en", "ar")
        placeholders = sum(t["content"].count("<image>") for t in record["conversations"] if t["role"] == "user")
        assert placeholders >= 1
        assert sorted(sample["images"]) == list(range(placeholders))
        assert placeholders == (2 if record["task"] == "multi_image" else 1)
        for image in sample["images"].values():
            assert 112 <= image.width <= 336 and 112 <= image.height <= 336
        assert all(t["content"].count("<image>") == 0 for t in record["conversations"] if t["role"] == "assistant")


def test_images_vary_in_size_and_aspect(samples):
    sizes = {image.size for s in all_samples(samples) for image in s["images"].values()}
    assert len(sizes) > 20
    assert any(w != h for w, h in sizes)


def test_webdataset_reads_the_shards(corpus):
    import webdataset
    out, _ = corpus
    urls = [str(out / "val" / n) for n in shard_names(out / "val")]
    loaded = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(loaded) == VAL
    assert all("json" in s and "img0.png" in s for s in loaded)


def test_arabic_samples_exist(samples):
    arabic = [s["json"] for s in all_samples(samples) if s["json"]["language"] == "ar"]
    assert arabic, "no Arabic samples"
    for record in arabic:
        question = record["conversations"][0]["content"]
        assert re.search("[\u0600-\u06ff]", question), question
    assert {r["task"] for r in arabic} & {"counting", "reading", "multi_qa", "multi_image", "pointing", "boxes"}


# ---------------------------------------------------------------- determinism


def shard_bytes(root) -> dict[str, bytes]:
    return {
        f"{split}/{n}": (root / split / n).read_bytes() for split in ("train", "val") for n in shard_names(root / split)
    }


def test_same_seed_same_bytes_and_other_seed_differs(corpus, tmp_path):
    out, manifest = corpus
    again = synthetic.generate(str(tmp_path / "again"), TRAIN, VAL, SEED, 600, PER_SHARD)
    assert again == manifest
    assert shard_bytes(tmp_path / "again") == shard_bytes(out)
    assert (tmp_path / "again/tokenizer/tokenizer.json").read_bytes() == (out / "tokenizer/tokenizer.json").read_bytes()

    other = synthetic.generate(str(tmp_path / "other"), TRAIN, VAL, SEED + 1, 600, PER_SHARD)
    assert other["seed"] == SEED + 1
    theirs = shard_bytes(tmp_path / "other")
    ours = shard_bytes(out)
    assert theirs.keys() == ours.keys()
    assert all(theirs[name] != ours[name] for name in ours)


def test_a_crash_leaves_no_partial_shard(tmp_path):
    def broken():
        yield from synthetic.iter_samples(0, "train", 5)
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError):
        synthetic.write_shards(broken(), str(tmp_path), samples_per_shard=3)
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.tar", "shard-000001.tar.tmp"]
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert len(tar.getmembers()) == 6  # 3 samples x (json + image)


# ---------------------------------------------------------------- answers


def test_counting_answers_match_the_pixels(samples):
    checked = 0
    for sample in all_samples(samples):
        record, images = sample["json"], sample["images"]
        if record["task"] not in ("counting", "multi_qa") or record["grounding"]:
            continue
        for question, answer in qa_pairs(record):
            shape, colour = count_predicate(question_text(question), record["language"])
            assert shape or colour, question
            assert answer == str(pixel_count(images[0], shape, colour)), (record["id"], question)
            checked += 1
    assert checked >= 5


def test_multi_image_answers_match_the_pixels(samples):
    checked = 0
    for sample in all_samples(samples):
        record, images = sample["json"], sample["images"]
        if record["task"] != "multi_image":
            continue
        (question, answer), = qa_pairs(record)
        shape, colour = count_predicate(question_text(question), record["language"])
        first, second = (pixel_count(images[i], shape, colour) for i in (0, 1))
        if answer.isdigit():
            assert int(answer) == first + second, record["id"]
        else:
            assert first != second
            assert answer in ("first", "الأولى") if first > second else answer in ("second", "الثانية"), record["id"]
        checked += 1
    assert checked >= 2


def test_points_and_boxes_locate_the_named_unique_object(samples):
    checked = defaultdict(int)
    for sample in all_samples(samples):
        record, images = sample["json"], sample["images"]
        if not record["grounding"]:
            continue
        image = images[0]
        for question, answer in qa_pairs(record):
            point, box = POINT_RE.match(answer), BOX_RE.match(answer)
            assert point or box, answer
            phrase = (point or box).group(1)
            shape, colour = object_from_phrase(phrase, record["language"])
            assert phrase in question
            matches = [b for s, b in components(image, colour) if s == shape]
            assert len(matches) == 1, f"{record['id']}: {phrase!r} is not unique"
            x0, y0, x1, y1 = matches[0]
            if point:
                x, y = int(point.group(2)), int(point.group(3))
                assert 0 <= x <= 1000 and 0 <= y <= 1000
                px, py = x * image.width / 1000, y * image.height / 1000
                assert x0 <= px <= x1 and y0 <= py <= y1, record["id"]
                checked["point"] += 1
            else:
                coords = [int(v) for v in box.groups()[1:]]
                assert all(0 <= v <= 1000 for v in coords)
                assert coords[0] < coords[2] and coords[1] < coords[3]
                scale = [image.width, image.height] * 2
                for got, want, extent in zip(coords, (x0, y0, x1, y1), scale, strict=True):
                    assert abs(got * extent / 1000 - want) <= 2, (record["id"], coords, (x0, y0, x1, y1))
                checked["box"] += 1
    assert checked["point"] >= 2 and checked["box"] >= 2


def test_reading_images_hold_dark_text(samples):
    readings = [s for s in all_samples(samples) if s["json"]["task"] == "reading"]
    assert readings
    for sample in readings:
        pixels = np.asarray(sample["images"][0]).astype(int)
        assert (pixels.sum(axis=-1) < 300).sum() > 30, sample["key"]


def test_arabic_is_shaped_not_drawn_letter_by_letter():
    from PIL import ImageFont, features

    synthetic.check_arabic_rendering()
    if not features.check("raqm"):
        pytest.skip("raqm unavailable; the arabic-reshaper fallback is in use")

    def draw(engine) -> bytes:
        font = ImageFont.truetype(synthetic.find_font(), 40, layout_engine=engine)
        image = Image.new("L", (300, 80), 255)
        from PIL import ImageDraw

        ImageDraw.Draw(image).text((10, 10), "مدرسة", font=font, fill=0)
        return image.tobytes()

    # The basic engine draws isolated letters left to right; shaping must change that.
    assert draw(ImageFont.Layout.RAQM) != draw(ImageFont.Layout.BASIC)


def test_tokenizer_is_written_and_covers_the_corpus(corpus, samples):
    out, manifest = corpus
    tokenizer = load_tokenizer(str(out / "tokenizer"))
    assert len(tokenizer) == manifest["tokenizer"]["vocab_size"] <= 600
    for sample in samples["val"]:
        for turn in sample["json"]["conversations"]:
            ids = tokenizer.encode(turn["content"], add_special_tokens=False)
            assert tokenizer.decode(ids) == turn["content"]


def test_missing_font_error_names_the_package(monkeypatch):
    monkeypatch.setattr(synthetic, "FONT_CANDIDATES", ["/nonexistent/font.ttf"])
    monkeypatch.setattr(synthetic, "_matplotlib_font", lambda: [])
    monkeypatch.delenv(synthetic.FONT_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="fonts-dejavu-core"):
        synthetic.find_font()


def test_task_weights_mix_the_tasks_in_proportion():
    from collections import Counter

    order = synthetic._task_order(0, "train", 100, {"counting": 3, "reading": 3, "boxes": 1})
    assert Counter(order) == {"counting": 43, "reading": 43, "boxes": 14}
    assert synthetic._task_order(0, "train", 100, {"counting": 3, "reading": 3, "boxes": 1}) == order
    balanced = Counter(synthetic._task_order(0, "train", 100))
    assert set(balanced) == set(synthetic.TASKS) and max(balanced.values()) - min(balanced.values()) <= 1
    for bad, match in (({"count": 1}, "unknown tasks"), ({"counting": -1}, ">= 0"), ({"counting": 0}, "one > 0")):
        with pytest.raises(ValueError, match=match):
            synthetic.check_task_weights(bad)
