"""Scoring answers: exact match, points inside the object, boxes by IoU, malformed answers wrong."""

from __future__ import annotations

import pytest

from megavl.eval.answers import Score, iou, parse_box, parse_point, score_answer

REF = "<|object_ref_start|>the red circle<|object_ref_end|>"
POINT = REF + "<|point_start|>(500, 400)<|point_end|>"
BOX = REF + "<|box_start|>[100, 200, 300, 400]<|box_end|>"
TARGET = [450, 350, 560, 470]


def test_text_answers_are_exact_matches_after_stripping():
    assert score_answer(" 3 ", "3") == Score(1, 1, 1)
    assert score_answer("4", "3") == Score(1, 0, 1)
    assert score_answer("القمر", "القمر").correct == 1
    assert score_answer("قمر", "القمر").correct == 0
    assert score_answer("", "first").correct == 0


def test_points_hit_inside_the_named_object_and_report_their_distance():
    exact = score_answer(POINT, POINT, TARGET)
    assert (exact.correct, exact.parsed, exact.distance) == (1, 1, 0.0)
    near = score_answer(REF + "<|point_start|>(530, 440)<|point_end|>", POINT, TARGET)
    assert near.correct == 1 and near.distance == pytest.approx(50.0)
    outside = score_answer(REF + "<|point_start|>(600, 400)<|point_end|>", POINT, TARGET)
    assert (outside.correct, outside.parsed, outside.distance) == (0, 1, 100.0)
    # Inside the object counts, however far from its centre; near the centre but outside does not.
    corner = score_answer(REF + "<|point_start|>(455, 465)<|point_end|>", POINT, TARGET)
    assert corner.correct == 1 and corner.distance > 50
    small = [490, 390, 510, 410]
    assert score_answer(REF + "<|point_start|>(530, 400)<|point_end|>", POINT, small).correct == 0
    # Without the object's box, within 50 units of the true point is a hit.
    assert score_answer(REF + "<|point_start|>(530, 440)<|point_end|>", POINT).correct == 1
    assert score_answer(REF + "<|point_start|>(531, 441)<|point_end|>", POINT).correct == 0


def test_boxes_score_by_iou():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    half = score_answer(REF + "<|box_start|>[100, 200, 300, 300]<|box_end|>", BOX)
    assert half.iou == pytest.approx(0.5) and half.correct == 1
    shifted = score_answer(REF + "<|box_start|>[150, 200, 350, 400]<|box_end|>", BOX)
    assert shifted.iou == pytest.approx(150 / 250) and shifted.correct == 1
    poor = score_answer(REF + "<|box_start|>[250, 200, 450, 400]<|box_end|>", BOX)
    assert poor.iou == pytest.approx(50 / 350) and poor.correct == 0


@pytest.mark.parametrize("answer", [
    "",
    "(500, 400)",
    "<|point_start|>(500, 400)<|point_end|>",  # no object named
    "<|object_ref_start|>the blue circle<|object_ref_end|><|point_start|>(500, 400)<|point_end|>",  # wrong one
    REF + "<|point_start|>(500 400)<|point_end|>",
    REF + "<|point_start|>(500, 400)",
    REF + "<|box_start|>[450, 350, 560, 470]<|box_end|>",  # a box where a point was asked
    REF + "<|point_start|>(500, 400)<|point_end|> and more",
    "<|object_ref_start|><|object_ref_start|><|point_start|>((((",
])
def test_malformed_points_are_wrong_never_errors(answer):
    score = score_answer(answer, POINT, TARGET)
    assert (score.answers, score.correct, score.parsed, score.distance) == (1, 0, 0, 0.0)


@pytest.mark.parametrize("answer", [
    "",
    "[100, 200, 300, 400]",
    REF + "<|box_start|>[100, 200, 300]<|box_end|>",
    REF + "<|box_start|>[300, 200, 100, 400]<|box_end|>",  # x1 < x0
    REF + "<|box_start|>[100, 200, 300, 400, 500]<|box_end|>",
    REF + "<|point_start|>(200, 300)<|point_end|>",
    "<|object_ref_start|>the red square<|object_ref_end|><|box_start|>[100, 200, 300, 400]<|box_end|>",
])
def test_malformed_boxes_are_wrong_with_zero_iou(answer):
    score = score_answer(answer, BOX)
    assert (score.answers, score.correct, score.parsed, score.iou) == (1, 0, 0, 0.0)


def test_parsers_read_the_corpus_formats():
    assert parse_point(POINT) == ("the red circle", 500.0, 400.0)
    assert parse_box(BOX) == ("the red circle", (100.0, 200.0, 300.0, 400.0))
    arabic = "<|object_ref_start|>المربع الأزرق<|object_ref_end|><|point_start|>(12, 987)<|point_end|>"
    assert parse_point(arabic) == ("المربع الأزرق", 12.0, 987.0)


def test_scores_add_up_and_survive_their_list_form():
    total = score_answer(POINT, POINT, TARGET) + score_answer("x", POINT, TARGET) + score_answer(BOX, BOX)
    assert (total.answers, total.correct, total.parsed) == (3, 2, 2)
    assert Score.from_list(total.as_list()) == total


def test_a_malformed_reference_is_an_error_not_a_silent_zero():
    with pytest.raises(ValueError, match="not a well-formed point"):
        score_answer(POINT, "<|point_start|>nowhere<|point_end|>")
