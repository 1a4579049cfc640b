"""Drawing for the synthetic corpus: scenes of coloured shapes, and words on a plain canvas.

A Scene is laid out first (shapes placed where they overlap nothing), so the
tasks can ask and answer questions about it, and drawn afterwards. Shapes are
drawn without antialiasing in saturated colours, so each object's pixels are
exactly its colour. A TextImage is drawn as large as fits; its layout draws
from the sample's generator when drawn.
"""

from __future__ import annotations

import functools
import io
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

from PIL import Image, ImageDraw, ImageFont, features

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
        return sum(1 for s in self.shapes if matches(s.shape, s.colour, shape, colour))

    def unique(self) -> list[Shape]:
        combos = Counter((s.shape, s.colour) for s in self.shapes)
        return [s for s in self.shapes if combos[(s.shape, s.colour)] == 1]


@dataclass(frozen=True)
class TextImage:
    """``text`` drawn on a plain canvas, as large as fits (draw_text)."""

    text: str


def matches(shape: str, colour: str, wanted_shape: Optional[str], wanted_colour: Optional[str]) -> bool:
    """Whether a (shape, colour) fits a question's predicate; None matches anything."""
    return wanted_shape in (None, shape) and wanted_colour in (None, colour)


def _canvas_size(rng: random.Random) -> tuple[int, int]:
    return rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)


def empty_scene(rng: random.Random) -> Scene:
    width, height = _canvas_size(rng)
    return Scene(width, height, rng.choice(BACKGROUNDS), [])


def place(rng: random.Random, scene: Scene, shape: str, colour: str, attempts: int = 200) -> bool:
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


def random_combo(rng: random.Random, keep: Callable[[str, str], bool] = lambda s, c: True) -> tuple[str, str]:
    return rng.choice([(s, c) for s in SHAPES for c in COLOURS if keep(s, c)])


def scene_with(rng: random.Random, targets: int, shape, colour, distractors: int) -> Scene:
    """``targets`` shapes matching (shape, colour) (None = any) plus non-matching ones."""
    scene = empty_scene(rng)
    for _ in range(targets):
        place(rng, scene, *random_combo(rng, lambda s, c: matches(s, c, shape, colour)))
    for _ in range(distractors):
        place(rng, scene, *random_combo(rng, lambda s, c: not matches(s, c, shape, colour)))
    rng.shuffle(scene.shapes)  # so drawing order doesn't reveal which were targets
    return scene


def scene_of_unique(rng: random.Random, unique: int, duplicated_pairs: int) -> Scene:
    """``unique`` shapes of distinct (shape, colour) plus pairs of other combos."""
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    rng.shuffle(combos)
    scene = empty_scene(rng)
    for s, c in combos[:unique]:
        place(rng, scene, s, c)
    for s, c in combos[unique:unique + duplicated_pairs]:
        place(rng, scene, s, c)
        place(rng, scene, s, c)
    return scene


# ---------------------------------------------------------------- drawing


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


@functools.lru_cache(maxsize=None)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    engine = ImageFont.Layout.RAQM if features.check("raqm") else ImageFont.Layout.BASIC
    return ImageFont.truetype(path, size, layout_engine=engine)


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


def draw_text(rng: random.Random, text: str, font_path: str) -> Image.Image:
    """The text, as large as fits, on a plain canvas; ``font_path`` needs Latin and Arabic glyphs."""
    width, height = _canvas_size(rng)
    image = Image.new("RGB", (width, height), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    laid_out = _layout_text(text)
    size = max(12, int(height * 0.45))
    while True:
        left, top, right, bottom = draw.textbbox((0, 0), laid_out, font=_font(font_path, size))
        if (right - left <= width * 0.85 and bottom - top <= height * 0.7) or size <= 10:
            break
        size -= 2
    room_x, room_y = max(0, width - (right - left)), max(0, height - (bottom - top))
    x = rng.randint(room_x // 4, max(room_x // 4, room_x - room_x // 4)) - left
    y = rng.randint(room_y // 4, max(room_y // 4, room_y - room_y // 4)) - top
    draw.text((x, y), laid_out, font=_font(font_path, size), fill=rng.choice(TEXT_COLOURS))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
