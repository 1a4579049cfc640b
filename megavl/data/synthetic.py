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
the order the placeholders appear in the user turns. Coordinates in answers
are integers on a 0..1000 scale of the image's width and height.

The same seed and parameters give byte-identical shards: every sample draws
from its own generator seeded by (seed, split, index), tar headers carry a
fixed mtime, and PNG encoding is deterministic.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

from PIL import Image, ImageDraw, ImageFont, features

from megavl.data.energon_meta import write_energon_metadata
from megavl.data.shards import TEMPORARY_SUFFIX, ShardWriter
from megavl.data.tokenizer import (
    BOX_END,
    BOX_START,
    IMAGE_PLACEHOLDER,
    OBJECT_REF_END,
    OBJECT_REF_START,
    POINT_END,
    POINT_START,
    render_chat,
    train_tokenizer,
)

TASKS = ["counting", "pointing", "boxes", "reading", "multi_qa", "multi_image"]
SPLITS = ["train", "val"]
ARABIC_FRACTION = 0.3

SHAPES = ["circle", "square", "triangle"]
# Saturated, far from each other and from the backgrounds, so each object's
# pixels are exactly one of these values (shapes are drawn without antialiasing).
COLOURS = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
}
BACKGROUNDS = [(255, 255, 255), (240, 240, 240), (250, 245, 230), (225, 235, 245), (235, 230, 240)]
TEXT_COLOURS = [(0, 0, 0), (40, 40, 40), (20, 30, 90), (90, 20, 20), (20, 70, 30)]

MIN_SIDE, MAX_SIDE = 112, 336
MAX_OBJECTS = 10

EN_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
# Arabic adjectives agree with the noun: masculine for the singular square and
# triangle, feminine for the circle and for every (non-human) plural.
AR_SINGULAR = {"circle": "الدائرة", "square": "المربع", "triangle": "المثلث"}
AR_SINGULAR_IS_FEMININE = {"circle": True, "square": False, "triangle": False}
AR_PLURAL = {"circle": "الدوائر", "square": "المربعات", "triangle": "المثلثات"}
AR_ANY_SHAPE_PLURAL = "الأشكال"
AR_COLOUR_MASCULINE = {"red": "الأحمر", "green": "الأخضر", "blue": "الأزرق", "yellow": "الأصفر"}
AR_COLOUR_FEMININE = {"red": "الحمراء", "green": "الخضراء", "blue": "الزرقاء", "yellow": "الصفراء"}

EN_COUNT_TEMPLATES = ["How many {}?", "How many {} are there?", "Count the {}."]
AR_COUNT_TEMPLATES = ["كم عدد {}؟", "كم عدد {} في الصورة؟"]
EN_READ_QUESTIONS = ["What is written?", "What is written in the image?", "Read the text in the image."]
AR_READ_QUESTIONS = ["ما المكتوب؟", "ما المكتوب في الصورة؟", "اقرأ النص في الصورة."]

EN_WORDS = (
    "cat dog sun moon star tree river apple house water bread light green music paper "
    "table chair window garden flower bird fish horse train plane road city night morning "
    "summer winter spring autumn cloud rain snow stone bridge forest mountain ocean island "
    "book pencil letter number circle square orange lemon honey sugar coffee milk salt "
    "happy quick small large bright quiet open close begin finish hello thanks friend family "
    "school market doctor farmer sister brother mother father child people world story "
    "yellow purple silver golden wooden castle rocket planet camera guitar piano violin "
    "basket bottle candle carpet pillow ladder hammer needle thread button pocket jacket "
    "desert valley harbor engine signal minute second hour today tomorrow"
).split()
AR_WORDS = (
    "قطة كلب شمس قمر نجمة شجرة نهر تفاحة بيت ماء خبز نور كتاب قلم باب مفتاح طريق مدينة "
    "ليل صباح صيف شتاء ربيع خريف سحابة مطر ثلج حجر جسر غابة جبل بحر جزيرة وردة زهرة "
    "عصفور سمكة حصان قطار طائرة سيارة مدرسة سوق طبيب مزارع أخت أخ أم أب طفل عالم قصة "
    "مرحبا شكرا سلام صديق عائلة سعيد كبير صغير جميل جديد قديم برتقال ليمون عسل سكر قهوة "
    "حليب ملح بيضاء سوداء فضة ذهب نافذة حديقة كرسي طاولة سماء أرض نار هواء رمل صحراء وادي"
).split()


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


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    engine = ImageFont.Layout.RAQM if features.check("raqm") else ImageFont.Layout.BASIC
    return ImageFont.truetype(find_font(), size, layout_engine=engine)


def _is_arabic(text: str) -> bool:
    return any("\u0600" <= ch <= "\u06ff" for ch in text)


def _layout_text(text: str) -> str:
    # Without raqm Pillow draws code points left to right, unjoined; reshaping
    # to joined presentation forms in visual order draws the word correctly.
    if features.check("raqm") or not _is_arabic(text):
        return text
    import arabic_reshaper
    from bidi import get_display

    return get_display(arabic_reshaper.reshape(text))


# ---------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; x1, y1 exclusive

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: list[Shape]

    def count(self, shape: Optional[str] = None, colour: Optional[str] = None) -> int:
        return sum(1 for s in self.shapes if _matches(s.shape, s.colour, shape, colour))

    def unique(self) -> list[Shape]:
        combos = Counter((s.shape, s.colour) for s in self.shapes)
        return [s for s in self.shapes if combos[(s.shape, s.colour)] == 1]


def _matches(shape: str, colour: str, wanted_shape: Optional[str], wanted_colour: Optional[str]) -> bool:
    """Whether a (shape, colour) fits a question's predicate; None matches anything."""
    return wanted_shape in (None, shape) and wanted_colour in (None, colour)


def _canvas_size(rng: random.Random) -> tuple[int, int]:
    return rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)


def _empty_scene(rng: random.Random) -> Scene:
    width, height = _canvas_size(rng)
    return Scene(width, height, rng.choice(BACKGROUNDS), [])


def _place(rng: random.Random, scene: Scene, shape: str, colour: str, attempts: int = 200) -> bool:
    """Adds a shape where it overlaps nothing (2 px apart); False if there was no room."""
    if len(scene.shapes) >= MAX_OBJECTS:
        return False
    small = min(scene.width, scene.height)
    lo, hi = max(14, small // 10), max(16, small // 5)
    for _ in range(attempts):
        size = rng.randint(lo, hi)
        x0 = rng.randint(2, scene.width - size - 2)
        y0 = rng.randint(2, scene.height - size - 2)
        box = (x0, y0, x0 + size, y0 + size)
        if all(_apart(box, other.box, gap=2) for other in scene.shapes):
            scene.shapes.append(Shape(shape, colour, box))
            return True
    return False


def _apart(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _random_combo(rng: random.Random, keep: Callable[[str, str], bool] = lambda s, c: True) -> tuple[str, str]:
    return rng.choice([(s, c) for s in SHAPES for c in COLOURS if keep(s, c)])


def _scene_with(rng: random.Random, targets: int, shape, colour, distractors: int) -> Scene:
    """``targets`` shapes matching (shape, colour) (None = any) plus non-matching ones."""
    scene = _empty_scene(rng)
    for _ in range(targets):
        _place(rng, scene, *_random_combo(rng, lambda s, c: _matches(s, c, shape, colour)))
    for _ in range(distractors):
        _place(rng, scene, *_random_combo(rng, lambda s, c: not _matches(s, c, shape, colour)))
    rng.shuffle(scene.shapes)  # so drawing order doesn't reveal which were targets
    return scene


def _scene_of_unique(rng: random.Random, unique: int, duplicated_pairs: int) -> Scene:
    """``unique`` shapes of distinct (shape, colour) plus pairs of other combos."""
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    rng.shuffle(combos)
    scene = _empty_scene(rng)
    for s, c in combos[:unique]:
        _place(rng, scene, s, c)
    for s, c in combos[unique:unique + duplicated_pairs]:
        _place(rng, scene, s, c)
        _place(rng, scene, s, c)
    return scene


def draw_scene(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        fill = COLOURS[s.colour]
        x0, y0, x1, y1 = s.box
        # Pillow's coordinates are inclusive, hence the -1.
        if s.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif s.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    return image


def draw_text(rng: random.Random, text: str) -> Image.Image:
    """The text, as large as fits, on a plain canvas."""
    width, height = _canvas_size(rng)
    image = Image.new("RGB", (width, height), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    laid_out = _layout_text(text)
    size = max(12, int(height * 0.45))
    while True:
        left, top, right, bottom = draw.textbbox((0, 0), laid_out, font=_font(size))
        if (right - left <= width * 0.85 and bottom - top <= height * 0.7) or size <= 10:
            break
        size -= 2
    room_x, room_y = max(0, width - (right - left)), max(0, height - (bottom - top))
    x = rng.randint(room_x // 4, max(room_x // 4, room_x - room_x // 4)) - left
    y = rng.randint(room_y // 4, max(room_y // 4, room_y - room_y // 4)) - top
    draw.text((x, y), laid_out, font=_font(size), fill=rng.choice(TEXT_COLOURS))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- phrases


def _object_phrase(shape: str, colour: str, language: str) -> str:
    """'the blue square' / 'المربع الأزرق'."""
    if language == "ar":
        adjective = AR_COLOUR_FEMININE if AR_SINGULAR_IS_FEMININE[shape] else AR_COLOUR_MASCULINE
        return f"{AR_SINGULAR[shape]} {adjective[colour]}"
    return f"the {colour} {shape}"


def _plural_phrase(shape: Optional[str], colour: Optional[str], language: str) -> str:
    """'red circles', 'circles', 'red shapes' (and the Arabic forms)."""
    if language == "ar":
        noun = AR_PLURAL[shape] if shape else AR_ANY_SHAPE_PLURAL
        return f"{noun} {AR_COLOUR_FEMININE[colour]}" if colour else noun
    noun = EN_PLURAL[shape] if shape else "shapes"
    return f"{colour} {noun}" if colour else noun


def _count_question(rng: random.Random, shape, colour, language: str) -> str:
    templates = AR_COUNT_TEMPLATES if language == "ar" else EN_COUNT_TEMPLATES
    return rng.choice(templates).format(_plural_phrase(shape, colour, language))


def _point_qa(scene: Scene, target: Shape, language: str) -> tuple[str, str]:
    phrase = _object_phrase(target.shape, target.colour, language)
    if language == "ar":
        question = f"أشر إلى {phrase}."
    else:
        question = f"Point to {phrase}."
    cx, cy = target.centre
    x, y = _scale(cx, scene.width), _scale(cy, scene.height)
    return question, f"{OBJECT_REF_START}{phrase}{OBJECT_REF_END}{POINT_START}({x}, {y}){POINT_END}"


def _box_qa(scene: Scene, target: Shape, language: str) -> tuple[str, str]:
    phrase = _object_phrase(target.shape, target.colour, language)
    if language == "ar":
        question = f"أعط الصندوق المحيط ب{phrase}."
    else:
        question = f"Give the bounding box of {phrase}."
    x0, y0, x1, y1 = target.box
    coords = [_scale(x0, scene.width), _scale(y0, scene.height), _scale(x1, scene.width), _scale(y1, scene.height)]
    answer = f"{OBJECT_REF_START}{phrase}{OBJECT_REF_END}{BOX_START}[{', '.join(map(str, coords))}]{BOX_END}"
    return question, answer


def _scale(pixels: float, extent: int) -> int:
    return min(1000, max(0, round(pixels * 1000 / extent)))


def _count_predicate(rng: random.Random) -> tuple[Optional[str], Optional[str]]:
    kind = rng.random()
    if kind < 0.7:
        return rng.choice(SHAPES), rng.choice(list(COLOURS))
    if kind < 0.85:
        return rng.choice(SHAPES), None
    return None, rng.choice(list(COLOURS))


# ---------------------------------------------------------------- tasks
# Each returns (turns as (question, answer) pairs, images, grounding); the
# first question starts with one placeholder per image.


def _counting(rng: random.Random, language: str):
    shape, colour = _count_predicate(rng)
    scene = _scene_with(rng, rng.randint(0, 5), shape, colour, rng.randint(0, 5))
    question = _count_question(rng, shape, colour, language)
    return [(question, str(scene.count(shape, colour)))], [draw_scene(scene)], False


def _grounding_scene(rng: random.Random) -> tuple[Scene, Shape]:
    while True:
        scene = _scene_of_unique(rng, rng.randint(1, 4), rng.randint(0, 2))
        unique = scene.unique()
        if unique:
            return scene, rng.choice(unique)


def _pointing(rng: random.Random, language: str):
    scene, target = _grounding_scene(rng)
    return [_point_qa(scene, target, language)], [draw_scene(scene)], True


def _boxes(rng: random.Random, language: str):
    scene, target = _grounding_scene(rng)
    return [_box_qa(scene, target, language)], [draw_scene(scene)], True


def _reading(rng: random.Random, language: str):
    if language == "ar":
        text, question = rng.choice(AR_WORDS), rng.choice(AR_READ_QUESTIONS)
    else:
        text = rng.choice(EN_WORDS) if rng.random() < 0.6 else str(rng.randint(0, 10 ** rng.randint(1, 4) - 1))
        question = rng.choice(EN_READ_QUESTIONS)
    return [(question, text)], [draw_text(rng, text)], False


def _multi_qa(rng: random.Random, language: str):
    questions = rng.randint(2, 4)
    if rng.random() < 0.5:
        scene = _empty_scene(rng)
        for _ in range(rng.randint(3, 9)):
            _place(rng, scene, *_random_combo(rng))
        predicates = set()
        while len(predicates) < questions:
            predicates.add(_count_predicate(rng))
        turns = [
            (_count_question(rng, shape, colour, language), str(scene.count(shape, colour)))
            for shape, colour in sorted(predicates, key=str)
        ]
        rng.shuffle(turns)
        return turns, [draw_scene(scene)], False
    while True:
        scene = _scene_of_unique(rng, questions + rng.randint(0, 2), rng.randint(0, 1))
        if len(scene.unique()) >= questions:
            break
    targets = rng.sample(scene.unique(), questions)
    turns = [(_point_qa if rng.random() < 0.5 else _box_qa)(scene, t, language) for t in targets]
    return turns, [draw_scene(scene)], True


def _multi_image(rng: random.Random, language: str):
    shape = rng.choice(SHAPES)
    if rng.random() < 0.5:
        colour = rng.choice([None, *COLOURS])
        scenes = [_scene_with(rng, rng.randint(0, 4), shape, colour, rng.randint(0, 4)) for _ in range(2)]
        total = sum(scene.count(shape, colour) for scene in scenes)
        phrase = _plural_phrase(shape, colour, language)
        if language == "ar":
            question = f"كم عدد {phrase} في الصورتين معا؟"
        else:
            question = f"How many {phrase} are in the two images together?"
        return [(question, str(total))], [draw_scene(s) for s in scenes], False
    while True:
        scenes = [_scene_with(rng, rng.randint(0, 5), shape, None, rng.randint(0, 4)) for _ in range(2)]
        first, second = (scene.count(shape) for scene in scenes)
        if first != second:
            break
    if language == "ar":
        question = f"أي صورة فيها {AR_PLURAL[shape]} أكثر؟ أجب بالأولى أو الثانية."
        answer = "الأولى" if first > second else "الثانية"
    else:
        question = f"Which image has more {EN_PLURAL[shape]}? Answer first or second."
        answer = "first" if first > second else "second"
    return [(question, answer)], [draw_scene(s) for s in scenes], False


TASK_BUILDERS = {
    "counting": _counting,
    "pointing": _pointing,
    "boxes": _boxes,
    "reading": _reading,
    "multi_qa": _multi_qa,
    "multi_image": _multi_image,
}


# ---------------------------------------------------------------- samples


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:07d}"


def _task_order(seed: int, split: str, count: int) -> list[str]:
    # Balanced: every task within one of count / len(TASKS), in shuffled order.
    order = [TASKS[i % len(TASKS)] for i in range(count)]
    random.Random(f"{seed}/{split}/tasks").shuffle(order)
    return order


def make_sample(seed: int, split: str, index: int, task: str) -> tuple[dict, list[bytes]]:
    """(the sample's JSON record, its images as PNG bytes); depends only on the arguments."""
    rng = random.Random(f"{seed}/{split}/{index}")
    language = "ar" if rng.random() < ARABIC_FRACTION else "en"
    turns, images, grounding = TASK_BUILDERS[task](rng, language)
    prefix = (IMAGE_PLACEHOLDER + "\n") * len(images)
    conversations = []
    for i, (question, answer) in enumerate(turns):
        conversations.append({"role": "user", "content": (prefix if i == 0 else "") + question})
        conversations.append({"role": "assistant", "content": answer})
    key = sample_key(split, index)
    record = {
        "id": key,
        "task": task,
        "language": language,
        "grounding": grounding,
        "conversations": conversations,
    }
    return record, [png_bytes(image) for image in images]


def iter_samples(seed: int, split: str, count: int) -> Iterator[tuple[dict, list[bytes]]]:
    for index, task in enumerate(_task_order(seed, split, count)):
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
    """Writes samples into shard-NNNNNN.tar files (megavl.data.shards); returns their names."""
    writer = ShardWriter(split_dir, "shard", samples_per_shard)
    os.makedirs(split_dir, exist_ok=True)
    _clear_split_dir(split_dir)
    for record, images in samples:
        writer.add(record["id"], _tar_members(record, images))
    return writer.close()


# ---------------------------------------------------------------- corpus


def _write_split(out_dir: str, split: str, count: int, seed: int, samples_per_shard: int, texts: list[str]):
    tasks, languages = Counter(), Counter()
    stats = Counter()

    def tracked() -> Iterator[tuple[dict, list[bytes]]]:
        for record, images in iter_samples(seed, split, count):
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
) -> dict:
    """Writes shards, tokenizer and manifest.json under ``out_dir``; returns the manifest."""
    check_arabic_rendering()
    find_font()
    parameters = {
        "train_samples": train_samples,
        "val_samples": val_samples,
        "seed": seed,
        "vocab_size": vocab_size,
        "samples_per_shard": samples_per_shard,
    }
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # its absence marks a corpus being rewritten

    # The tokenizer learns from the train split only, so val stays unseen text.
    train_texts: list[str] = []
    splits = {
        "train": _write_split(out_dir, "train", train_samples, seed, samples_per_shard, train_texts),
        "val": _write_split(out_dir, "val", val_samples, seed, samples_per_shard, []),
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
