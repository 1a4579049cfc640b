"""The six tasks of the synthetic corpus, in English and Arabic, with answers exact by construction.

counting, pointing, boxes, reading, multi_qa (2-4 questions on one image)
and multi_image (two images in one sample). A task lays out its images
(megavl/datasets/synthetic_scenes.py) from the sample's generator, asks about
them and answers from the layout; the corpus writer draws them afterwards.
Coordinates in answers are integers on a 0..1000 scale of the image's width
and height.
"""

from __future__ import annotations

import random
from typing import Optional, Union

from megavl.data.tokenizer import BOX_END, BOX_START, OBJECT_REF_END, OBJECT_REF_START, POINT_END, POINT_START
from megavl.datasets.synthetic_scenes import (
    COLOURS,
    SHAPES,
    Scene,
    Shape,
    TextImage,
    empty_scene,
    place,
    random_combo,
    scene_of_unique,
    scene_with,
)

TASKS = ["counting", "pointing", "boxes", "reading", "multi_qa", "multi_image"]

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
POINT_QUESTIONS = {"en": "Point to {}.", "ar": "أشر إلى {}."}
BOX_QUESTIONS = {"en": "Give the bounding box of {}.", "ar": "أعط الصندوق المحيط ب{}."}

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

Picture = Union[Scene, TextImage]


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


def _point_qa(scene: Scene, target: Shape, language: str) -> tuple[str, str, list[int]]:
    cx, cy = target.centre
    x, y = _scale(cx, scene.width), _scale(cy, scene.height)
    return _grounded_qa(scene, target, language, POINT_QUESTIONS, f"{POINT_START}({x}, {y}){POINT_END}")


def _box_qa(scene: Scene, target: Shape, language: str) -> tuple[str, str, list[int]]:
    coords = _scaled_box(scene, target)
    return _grounded_qa(scene, target, language, BOX_QUESTIONS, f"{BOX_START}[{', '.join(map(str, coords))}]{BOX_END}")


def _scaled_box(scene: Scene, target: Shape) -> list[int]:
    x0, y0, x1, y1 = target.box
    return [_scale(x0, scene.width), _scale(y0, scene.height), _scale(x1, scene.width), _scale(y1, scene.height)]


def _grounded_qa(scene: Scene, target: Shape, language: str, questions: dict[str, str],
                 location: str) -> tuple[str, str, list[int]]:
    """The question naming ``target``, the answer (its reference followed by ``location``) and
    the target's box on the 0..1000 scale (what a pointing answer must fall inside)."""
    phrase = _object_phrase(target.shape, target.colour, language)
    answer = f"{OBJECT_REF_START}{phrase}{OBJECT_REF_END}{location}"
    return questions[language].format(phrase), answer, _scaled_box(scene, target)


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
# Each returns (turns, pictures to draw, grounding); a turn is (question, answer) or, for a
# grounding question, (question, answer, the target's 0..1000 box). The first question starts
# with one placeholder per picture.


def _counting(rng: random.Random, language: str):
    shape, colour = _count_predicate(rng)
    scene = scene_with(rng, rng.randint(0, 5), shape, colour, rng.randint(0, 5))
    question = _count_question(rng, shape, colour, language)
    return [(question, str(scene.count(shape, colour)))], [scene], False


def _grounding_scene(rng: random.Random) -> tuple[Scene, Shape]:
    while True:
        scene = scene_of_unique(rng, rng.randint(1, 4), rng.randint(0, 2))
        unique = scene.unique()
        if unique:
            return scene, rng.choice(unique)


def _pointing(rng: random.Random, language: str):
    scene, target = _grounding_scene(rng)
    return [_point_qa(scene, target, language)], [scene], True


def _boxes(rng: random.Random, language: str):
    scene, target = _grounding_scene(rng)
    return [_box_qa(scene, target, language)], [scene], True


def _reading(rng: random.Random, language: str):
    if language == "ar":
        text, question = rng.choice(AR_WORDS), rng.choice(AR_READ_QUESTIONS)
    else:
        text = rng.choice(EN_WORDS) if rng.random() < 0.6 else str(rng.randint(0, 10 ** rng.randint(1, 4) - 1))
        question = rng.choice(EN_READ_QUESTIONS)
    return [(question, text)], [TextImage(text)], False


def _multi_qa(rng: random.Random, language: str):
    questions = rng.randint(2, 4)
    if rng.random() < 0.5:
        scene = empty_scene(rng)
        for _ in range(rng.randint(3, 9)):
            place(rng, scene, *random_combo(rng))
        predicates = set()
        while len(predicates) < questions:
            predicates.add(_count_predicate(rng))
        turns = [
            (_count_question(rng, shape, colour, language), str(scene.count(shape, colour)))
            for shape, colour in sorted(predicates, key=str)
        ]
        rng.shuffle(turns)
        return turns, [scene], False
    while True:
        scene = scene_of_unique(rng, questions + rng.randint(0, 2), rng.randint(0, 1))
        if len(scene.unique()) >= questions:
            break
    targets = rng.sample(scene.unique(), questions)
    turns = [(_point_qa if rng.random() < 0.5 else _box_qa)(scene, t, language) for t in targets]
    return turns, [scene], True


def _multi_image(rng: random.Random, language: str):
    shape = rng.choice(SHAPES)
    if rng.random() < 0.5:
        colour = rng.choice([None, *COLOURS])
        scenes = [scene_with(rng, rng.randint(0, 4), shape, colour, rng.randint(0, 4)) for _ in range(2)]
        total = sum(scene.count(shape, colour) for scene in scenes)
        phrase = _plural_phrase(shape, colour, language)
        if language == "ar":
            question = f"كم عدد {phrase} في الصورتين معا؟"
        else:
            question = f"How many {phrase} are in the two images together?"
        return [(question, str(total))], scenes, False
    while True:
        scenes = [scene_with(rng, rng.randint(0, 5), shape, None, rng.randint(0, 4)) for _ in range(2)]
        first, second = (scene.count(shape) for scene in scenes)
        if first != second:
            break
    if language == "ar":
        question = f"أي صورة فيها {AR_PLURAL[shape]} أكثر؟ أجب بالأولى أو الثانية."
        answer = "الأولى" if first > second else "الثانية"
    else:
        question = f"Which image has more {EN_PLURAL[shape]}? Answer first or second."
        answer = "first" if first > second else "second"
    return [(question, answer)], scenes, False


TASK_BUILDERS = {
    "counting": _counting,
    "pointing": _pointing,
    "boxes": _boxes,
    "reading": _reading,
    "multi_qa": _multi_qa,
    "multi_image": _multi_image,
}
