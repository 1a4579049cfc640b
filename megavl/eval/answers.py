"""Scoring one generated answer against the corpus's exact answer.

The synthetic corpus (megavl/datasets/synthetic_tasks.py) answers in three forms:

* plain text: a count, a word, "first" / "second" - scored by exact match after
  stripping surrounding whitespace;
* a point: ``<|object_ref_start|>the red circle<|object_ref_end|><|point_start|>(x, y)<|point_end|>``
  - scored by the distance to the true point (0..1000 units of width and height) and
  whether the point falls inside the named object's box;
* a box: ``... <|box_start|>[x0, y0, x1, y1]<|box_end|>`` - scored by IoU, correct when
  IoU >= 0.5.

A grounded answer must name the object it locates; an answer that does not parse (wrong
reference, missing tags, a box with x1 < x0, ...) is wrong, never an exception. Every
score is a sum over answers (``Score``), so per-rank scores add up across processes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from megavl.data.tokenizer import BOX_END, BOX_START, OBJECT_REF_END, OBJECT_REF_START, POINT_END, POINT_START

# The form of an answer, from the reference answer.
TEXT, POINT, BOX = "text", "point", "box"

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_REF = re.escape(OBJECT_REF_START) + r"(.*?)" + re.escape(OBJECT_REF_END)
_POINT = re.compile(r"^\s*" + _REF + re.escape(POINT_START) + r"\(" + _NUMBER + "," + _NUMBER + r"\)"
                    + re.escape(POINT_END) + r"\s*$", re.DOTALL)
_BOX = re.compile(r"^\s*" + _REF + re.escape(BOX_START) + r"\[" + ",".join([_NUMBER] * 4) + r"\]"
                  + re.escape(BOX_END) + r"\s*$", re.DOTALL)


def answer_form(reference: str) -> str:
    """TEXT, POINT or BOX: the form of a reference answer."""
    if POINT_START in reference:
        return POINT
    if BOX_START in reference:
        return BOX
    return TEXT


def parse_point(text: str) -> Optional[tuple[str, float, float]]:
    """(object reference, x, y) of a pointing answer, or None when it does not parse."""
    match = _POINT.match(text)
    if match is None:
        return None
    return match.group(1).strip(), float(match.group(2)), float(match.group(3))


def parse_box(text: str) -> Optional[tuple[str, tuple[float, float, float, float]]]:
    """(object reference, (x0, y0, x1, y1)) of a box answer, or None when it does not parse
    or the box is inverted."""
    match = _BOX.match(text)
    if match is None:
        return None
    x0, y0, x1, y1 = (float(match.group(i)) for i in range(2, 6))
    if x1 < x0 or y1 < y0:
        return None
    return match.group(1).strip(), (x0, y0, x1, y1)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes (0 when either is empty)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, width) * max(0.0, height)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Score:
    """One answer's score, or a sum of them.

    answers: how many; correct: exact match, a point inside the object, or IoU >= 0.5;
    parsed: grounded answers in the right form naming the right object (text answers count
    as parsed); distance: summed over parsed points (0..1000 units); iou: summed over boxes
    (0 for a malformed one)."""

    answers: int = 0
    correct: int = 0
    parsed: int = 0
    distance: float = 0.0
    iou: float = 0.0

    FIELDS = ("answers", "correct", "parsed", "distance", "iou")

    def __add__(self, other: "Score") -> "Score":
        return Score(*(getattr(self, f) + getattr(other, f) for f in self.FIELDS))

    def as_list(self) -> list[float]:
        return [float(getattr(self, f)) for f in self.FIELDS]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> "Score":
        answers, correct, parsed, distance, box_iou = values
        return cls(round(answers), round(correct), round(parsed), float(distance), float(box_iou))


def score_answer(prediction: str, reference: str, target_box: Optional[Sequence[float]] = None) -> Score:
    """The score of one generated answer. ``target_box`` (0..1000) is the named object's box,
    which a pointing answer must fall inside; without it, a point within 50 units of the
    true point counts as a hit."""
    form = answer_form(reference)
    if form == TEXT:
        right = prediction.strip() == reference.strip()
        return Score(1, int(right), 1)
    if form == POINT:
        truth, predicted = parse_point(reference), parse_point(prediction)
        if truth is None:
            raise ValueError(f"reference answer {reference!r} is not a well-formed point")
        if predicted is None or predicted[0] != truth[0]:
            return Score(1, 0, 0)
        distance = math.dist(predicted[1:], truth[1:])
        if target_box is not None:
            x0, y0, x1, y1 = target_box
            hit = x0 <= predicted[1] <= x1 and y0 <= predicted[2] <= y1
        else:
            hit = distance <= 50
        return Score(1, int(hit), 1, distance=distance)
    truth, predicted = parse_box(reference), parse_box(prediction)
    if truth is None:
        raise ValueError(f"reference answer {reference!r} is not a well-formed box")
    if predicted is None or predicted[0] != truth[0]:
        return Score(1, 0, 0)
    overlap = iou(predicted[1], truth[1])
    return Score(1, int(overlap >= 0.5), 1, iou=overlap)
