"""Image resolution policies (native, fixed, tiling) and the progressive max-pixel schedule."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from megavl.config import MaxPixelScheduleConfig, ResolutionConfig
from megavl.data.images import smart_resize
from megavl.data.resolution import (
    ImagePart,
    ImagePlan,
    MaxPixelSchedule,
    choose_tile_grid,
    plan_image,
    vision_token_count,
)

FACTOR = 28  # patch 14 x merge 2
TILE = 448


def policy(**changes) -> ResolutionConfig:
    return dataclasses.replace(ResolutionConfig(), **changes)


def schedule(**changes) -> MaxPixelScheduleConfig:
    return dataclasses.replace(MaxPixelScheduleConfig(), **changes)


def assert_parts_tile_canvas(plan: ImagePlan) -> None:
    """The boxed parts lie inside the canvas, do not overlap and cover all of it."""
    canvas_h, canvas_w = plan.canvas
    boxes = [part.box for part in plan.parts if part.box is not None]
    for top, left, h, w in boxes:
        assert h > 0 and w > 0 and top >= 0 and left >= 0
        assert top + h <= canvas_h and left + w <= canvas_w
    for (t1, l1, h1, w1), (t2, l2, h2, w2) in itertools.combinations(boxes, 2):
        overlaps = t1 < t2 + h2 and t2 < t1 + h1 and l1 < l2 + w2 and l2 < l1 + w1
        assert not overlaps, f"boxes {(t1, l1, h1, w1)} and {(t2, l2, h2, w2)} overlap"
    assert sum(h * w for _, _, h, w in boxes) == canvas_h * canvas_w


# ---------------------------------------------------------------- tile grid

# (height, width, min_tiles, max_tiles) -> (rows, cols), tile 448.
GRID_CASES = [
    # Square: 1x1, 2x2, 3x3 tie on aspect ratio; 1000x1000 has more than half
    # of 3x3's 1344x1344 pixels, so it gets 3x3; 800x800 only fills 2x2.
    ((1000, 1000, 1, 9), (3, 3)),
    ((800, 800, 1, 9), (2, 2)),
    # Around the "half the grid's pixels" threshold of 2x2 (401_408 px).
    ((634, 634, 1, 4), (2, 2)),
    ((633, 633, 1, 4), (1, 1)),
    ((100, 100, 1, 9), (1, 1)),
    ((2000, 700, 1, 9), (3, 1)),  # tall document: 1/3 is the closest ratio
    ((3508, 2480, 1, 9), (3, 2)),  # A4 page at 300 dpi
    ((448, 1792, 1, 9), (1, 4)),
    ((100, 5000, 1, 9), (1, 9)),  # wider than any grid: the widest
    ((5000, 100, 1, 9), (9, 1)),
    # 16:9: 1x2 and 2x4 tie; the image fills 2x4.
    ((1080, 1920, 1, 9), (2, 4)),
    # 2:1 but small: neither 1x2 nor 2x4 is half filled -> fewest tiles.
    ((224, 448, 1, 9), (1, 2)),
    # max_tiles caps the grid.
    ((1000, 1000, 1, 6), (2, 2)),
    ((100, 5000, 1, 6), (1, 6)),
    ((2000, 700, 1, 2), (2, 1)),
    ((1000, 1000, 1, 1), (1, 1)),
    # min_tiles excludes small grids even when the image is small.
    ((100, 100, 2, 9), (2, 2)),
    ((100, 100, 5, 9), (3, 3)),
    # A square forced into 2 tiles: 1x2 and 2x1 tie exactly -> fewer rows.
    ((1000, 1000, 2, 2), (1, 2)),
]


@pytest.mark.parametrize("args, expected", GRID_CASES, ids=[f"{a[0]}x{a[1]}-{a[2]}..{a[3]}" for a, _ in GRID_CASES])
def test_choose_tile_grid(args, expected):
    height, width, min_tiles, max_tiles = args
    rows, cols = choose_tile_grid(height, width, TILE, min_tiles, max_tiles)
    assert (rows, cols) == expected
    assert min_tiles <= rows * cols <= max_tiles


def test_choose_tile_grid_is_symmetric_under_transpose():
    for height, width in [(1000, 700), (3508, 2480), (1080, 1920), (300, 2000), (640, 640)]:
        rows, cols = choose_tile_grid(height, width, TILE, 1, 9)
        assert choose_tile_grid(width, height, TILE, 1, 9) == (cols, rows)


@pytest.mark.parametrize(
    "args, field",
    [
        ((0, 100, TILE, 1, 9), "image size"),
        ((100, -5, TILE, 1, 9), "image size"),
        ((100, 100, 0, 1, 9), "tile_size"),
        ((100, 100, TILE, 0, 9), "min_tiles = 0"),
        ((100, 100, TILE, 4, 3), "max_tiles = 3"),
    ],
)
def test_choose_tile_grid_rejects_bad_input(args, field):
    with pytest.raises(ValueError, match=field):
        choose_tile_grid(*args)


# ---------------------------------------------------------------- native


@pytest.mark.parametrize("height, width", [(1000, 700), (37, 2000), (4000, 3000), (56, 56), (10, 10)])
def test_native_follows_smart_resize(height, width):
    p = policy(mode="native")
    plan = plan_image(height, width, p, FACTOR)
    size = smart_resize(height, width, FACTOR, p.min_pixels, p.max_pixels)
    assert plan.resize_to == plan.canvas == size
    assert size[0] % FACTOR == 0 and size[1] % FACTOR == 0
    assert plan.parts == [ImagePart("", (0, 0, size[0], size[1]))]
    assert plan.thumbnail_size is None
    assert vision_token_count(plan, FACTOR) == (size[0] // FACTOR) * (size[1] // FACTOR)


def test_native_max_pixels_argument_overrides_the_policy():
    p = policy(mode="native", max_pixels=1_003_520)
    full = plan_image(3000, 4000, p, FACTOR)
    capped = plan_image(3000, 4000, p, FACTOR, max_pixels=200_704)
    assert full.canvas == smart_resize(3000, 4000, FACTOR, p.min_pixels, 1_003_520)
    assert capped.canvas == smart_resize(3000, 4000, FACTOR, p.min_pixels, 200_704)
    assert capped.canvas[0] * capped.canvas[1] <= 200_704 < full.canvas[0] * full.canvas[1]


# ---------------------------------------------------------------- fixed


@pytest.mark.parametrize("tokens, side", [(256, 448), (400, 560), (64, 224)])
@pytest.mark.parametrize("fit", ["pad", "resize"])
def test_fixed_regime_is_a_square_of_fixed_tokens(tokens, side, fit):
    plan = plan_image(1000, 700, policy(mode="fixed", fixed_tokens=tokens, fixed_fit=fit), FACTOR)
    assert plan.canvas == (side, side)
    assert plan.parts == [ImagePart("", (0, 0, side, side))]
    assert plan.thumbnail_size is None
    assert vision_token_count(plan, FACTOR) == tokens


def test_fixed_resize_stretches_to_the_square():
    plan = plan_image(1000, 500, policy(mode="fixed", fixed_tokens=256, fixed_fit="resize"), FACTOR)
    assert plan.resize_to == (448, 448)


@pytest.mark.parametrize(
    "height, width, expected",
    [
        (1000, 500, (448, 224)),
        (300, 1200, (112, 448)),
        (448, 448, (448, 448)),
        (100, 100, (448, 448)),  # small images are scaled up to the regime
        (1000, 333, (448, 149)),  # 149.18 rounds down
        (1000, 335, (448, 150)),  # 150.08
        (1, 5000, (1, 448)),  # the short side never vanishes
    ],
)
def test_fixed_pad_keeps_the_aspect_ratio(height, width, expected):
    plan = plan_image(height, width, policy(mode="fixed", fixed_tokens=256, fixed_fit="pad"), FACTOR)
    assert plan.resize_to == expected
    assert plan.canvas == (448, 448)
    resized_h, resized_w = plan.resize_to
    scale = 448 / max(height, width)
    assert abs(resized_h - height * scale) <= 0.5 or resized_h == 1
    assert abs(resized_w - width * scale) <= 0.5 or resized_w == 1


@pytest.mark.parametrize("tokens, grid", [(96, (8, 12)), (200, (10, 20)), (12, (3, 4)), (7 * 9, (7, 9))])
def test_a_count_that_is_not_square_is_the_most_nearly_square_landscape_grid(tokens, grid):
    rows, cols = grid
    plan = plan_image(1000, 700, policy(mode="fixed", fixed_tokens=tokens, fixed_fit="resize"), FACTOR)
    assert plan.canvas == plan.resize_to == (rows * FACTOR, cols * FACTOR)
    assert vision_token_count(plan, FACTOR) == tokens


@pytest.mark.parametrize(
    "height, width, expected",
    [
        (1000, 500, (224, 112)),  # taller than the 224 x 336 canvas: its height fills it
        (300, 1200, (84, 336)),  # wider: its width fills it
        (200, 300, (224, 336)),  # the canvas's own aspect
        (1, 5000, (1, 336)),
    ],
)
def test_a_fixed_grid_pads_inside_its_canvas(height, width, expected):
    plan = plan_image(height, width, policy(mode="fixed", fixed_tokens=96, fixed_fit="pad"), FACTOR)
    assert plan.canvas == (224, 336)
    assert plan.resize_to == expected


def test_fixed_ignores_max_pixels():
    p = policy(mode="fixed", fixed_tokens=400)
    assert plan_image(900, 1600, p, FACTOR, max_pixels=784) == plan_image(900, 1600, p, FACTOR)


# ---------------------------------------------------------------- tiling


def test_tiling_tall_document_with_tags_and_thumbnail():
    plan = plan_image(2000, 700, policy(mode="tiling", tile_tags=True, thumbnail=True), FACTOR)
    assert plan.resize_to == plan.canvas == (3 * TILE, TILE)
    assert plan.parts == [
        ImagePart("<tile_1_1>", (0, 0, TILE, TILE)),
        ImagePart("<tile_2_1>", (TILE, 0, TILE, TILE)),
        ImagePart("<tile_3_1>", (2 * TILE, 0, TILE, TILE)),
        ImagePart("<tile_global>", None),
    ]
    assert plan.thumbnail_size == (TILE, TILE)
    assert vision_token_count(plan, FACTOR) == 4 * 256


def test_tiling_parts_are_row_major():
    plan = plan_image(1080, 1920, policy(mode="tiling", tile_tags=True), FACTOR)
    assert plan.canvas == (2 * TILE, 4 * TILE)
    tiles = plan.parts[:-1]
    assert [part.tag for part in tiles] == [f"<tile_{r}_{c}>" for r in (1, 2) for c in (1, 2, 3, 4)]
    assert [part.box for part in tiles] == [
        (r * TILE, c * TILE, TILE, TILE) for r in range(2) for c in range(4)
    ]
    assert plan.parts[-1] == ImagePart("<tile_global>", None)


def test_tiling_without_tags_leaves_tags_empty():
    plan = plan_image(800, 800, policy(mode="tiling", tile_tags=False), FACTOR)
    assert [part.tag for part in plan.parts] == ["", "", "", "", ""]
    assert plan.parts[-1].box is None


def test_tiling_2x2_with_thumbnail_is_five_tiles_of_tokens():
    plan = plan_image(800, 800, policy(mode="tiling", thumbnail=True), FACTOR)
    assert plan.canvas == (2 * TILE, 2 * TILE)
    assert vision_token_count(plan, FACTOR) == 5 * 256


def test_tiling_without_thumbnail():
    plan = plan_image(800, 800, policy(mode="tiling", thumbnail=False), FACTOR)
    assert all(part.box is not None for part in plan.parts)
    assert plan.thumbnail_size is None
    assert vision_token_count(plan, FACTOR) == 4 * 256


def test_single_tile_gets_no_thumbnail():
    plan = plan_image(100, 100, policy(mode="tiling", thumbnail=True, tile_tags=True), FACTOR)
    assert plan.parts == [ImagePart("<tile_1_1>", (0, 0, TILE, TILE))]
    assert plan.thumbnail_size is None


def test_tiling_uses_tile_size_and_ignores_max_pixels():
    p = policy(mode="tiling", tile_size=336, max_tiles=4)
    plan = plan_image(700, 1400, p, FACTOR, max_pixels=784)
    assert plan == plan_image(700, 1400, p, FACTOR)
    assert plan.canvas == (336, 672)
    assert vision_token_count(plan, FACTOR) == 3 * 144


PLAN_CASES = [
    (mode, size, extra)
    for mode, extra in [
        ("native", {}),
        ("fixed", {"fixed_fit": "pad"}),
        ("fixed", {"fixed_fit": "resize", "fixed_tokens": 400}),
        ("tiling", {}),
        ("tiling", {"thumbnail": False, "max_tiles": 12}),
    ]
    for size in [(1000, 1000), (2000, 700), (448, 1792), (100, 100), (100, 5000), (3508, 2480)]
]


@pytest.mark.parametrize("mode, size, extra", PLAN_CASES)
def test_every_plan_is_well_formed(mode, size, extra):
    plan = plan_image(*size, policy(mode=mode, **extra), FACTOR)
    assert plan.canvas[0] % FACTOR == 0 and plan.canvas[1] % FACTOR == 0
    assert plan.resize_to[0] <= plan.canvas[0] and plan.resize_to[1] <= plan.canvas[1]
    assert_parts_tile_canvas(plan)
    thumbnails = [i for i, part in enumerate(plan.parts) if part.box is None]
    assert thumbnails in ([], [len(plan.parts) - 1])  # at most one, and last
    assert (plan.thumbnail_size is not None) == bool(thumbnails)
    assert vision_token_count(plan, FACTOR) > 0


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"mode": "dynamic"}, "mode = 'dynamic'"),
        ({"mode": "fixed", "fixed_fit": "crop"}, "fixed_fit = 'crop'"),
        # 202 = 2 x 101: no grid closer than 50:1.
        ({"mode": "fixed", "fixed_tokens": 202}, "fixed_tokens = 202: its most nearly square grid is 2 x 101"),
        ({"mode": "fixed", "fixed_tokens": 0}, "fixed_tokens = 0"),
        ({"mode": "tiling", "tile_size": 450}, "tile_size = 450"),
        ({"mode": "tiling", "min_tiles": 5, "max_tiles": 4}, "max_tiles = 4"),
    ],
)
def test_plan_image_rejects_bad_policies(changes, match):
    with pytest.raises(ValueError, match=match):
        plan_image(1000, 1000, policy(**changes), FACTOR)


@pytest.mark.parametrize("mode", ["native", "fixed", "tiling", "dynamic"])
@pytest.mark.parametrize("height, width", [(0, 100), (100, 0), (-1, 100)])
def test_plan_image_rejects_empty_images(mode, height, width):
    with pytest.raises(ValueError, match="must be positive"):
        plan_image(height, width, policy(mode=mode), FACTOR)


def test_vision_token_count_rejects_inconsistent_plans():
    no_thumbnail_size = ImagePlan((448, 448), (448, 448), [ImagePart("", None)])
    with pytest.raises(ValueError, match=r"parts\[0\].*thumbnail_size is None"):
        vision_token_count(no_thumbnail_size, FACTOR)
    off_grid = ImagePlan((450, 448), (450, 448), [ImagePart("", (0, 0, 450, 448))])
    with pytest.raises(ValueError, match="450x448"):
        vision_token_count(off_grid, FACTOR)


# ---------------------------------------------------------------- max-pixel schedule

EXAMPLE = dict(start_max_pixels=800_000, fraction=0.35, stages=4)
FINAL = 6_272_000


def test_no_schedule_keeps_the_final_cap():
    s = MaxPixelSchedule(schedule(start_max_pixels=0), FINAL, 1000, FACTOR)
    assert s.boundaries() == [0]
    for step in (0, 1, 349, 350, 999, 10**6):
        assert s.stage(step) == 0
        assert s.max_pixels(step) == FINAL


def test_example_schedule():
    s = MaxPixelSchedule(schedule(**EXAMPLE), FINAL, 1000, FACTOR)
    # floor(k * 350 / 4) for k = 0..4.
    assert s.boundaries() == [0, 87, 175, 262, 350]
    assert [s.stage(step) for step in (0, 86, 87, 174, 175, 261, 262, 349, 350, 999)] == [
        0, 0, 1, 1, 2, 2, 3, 3, 4, 4,
    ]
    caps = [s.stage_max_pixels(k) for k in range(5)]
    assert caps == [799_680, 1_338_288, 2_239_888, 3_747_520, FINAL]
    unit = FACTOR * FACTOR
    growth = (FINAL / 800_000) ** 0.25  # 7.84 ** (1/4), about 1.673
    for k in range(4):
        assert caps[k] % unit == 0
        assert 0 <= 800_000 * growth**k - caps[k] < unit  # rounded down, by less than one unit
    assert s.max_pixels(0) == 799_680
    assert all(s.max_pixels(step) == FINAL for step in range(350, 1000))


@pytest.mark.parametrize(
    "total_steps, changes",
    [(1000, {}), (1000, {"stages": 1}), (37, {"stages": 7}), (5, {}), (10_000, {"fraction": 1.0, "stages": 9})],
)
def test_schedule_is_monotone_and_changes_only_at_boundaries(total_steps, changes):
    s = MaxPixelSchedule(schedule(**{**EXAMPLE, **changes}), FINAL, total_steps, FACTOR)
    steps = range(total_steps + 20)
    stages = [s.stage(step) for step in steps]
    caps = [s.max_pixels(step) for step in steps]
    assert stages == sorted(stages)
    assert caps == sorted(caps)
    assert caps[-1] == FINAL
    boundaries = s.boundaries()
    assert boundaries == sorted(boundaries) and boundaries[0] == 0
    changes_at = {step for step in steps[1:] if caps[step] != caps[step - 1]}
    assert changes_at <= set(boundaries)
    # Every stage that holds steps is entered at its first step.
    for stage, (first, next_first) in enumerate(zip(boundaries, boundaries[1:])):
        if next_first > first:
            assert s.stage(first) == stage
    assert s.stage(boundaries[-1]) == len(boundaries) - 1


def test_short_run_skips_empty_stages():
    # round(0.35 * 5) = 2 ramp steps for 4 stages: stages 0 and 2 are empty.
    s = MaxPixelSchedule(schedule(**EXAMPLE), FINAL, 5, FACTOR)
    assert s.boundaries() == [0, 0, 1, 1, 2]
    assert [s.stage(step) for step in range(5)] == [1, 3, 4, 4, 4]


def test_ramp_length_rounds_half_up():
    # 0.5 * 7 = 3.5 -> the final cap starts at step 4.
    s = MaxPixelSchedule(schedule(start_max_pixels=800_000, fraction=0.5, stages=1), FINAL, 7, FACTOR)
    assert s.boundaries() == [0, 4]


def test_zero_steps_is_all_final():
    s = MaxPixelSchedule(schedule(**EXAMPLE), FINAL, 0, FACTOR)
    assert s.max_pixels(0) == FINAL


def test_tiny_start_is_at_least_one_token():
    s = MaxPixelSchedule(schedule(start_max_pixels=100, stages=2), FINAL, 100, FACTOR)
    assert s.max_pixels(0) == FACTOR * FACTOR


@pytest.mark.parametrize(
    "changes, final, total_steps, match",
    [
        ({"start_max_pixels": FINAL + 1}, FINAL, 100, "start_max_pixels = 6272001"),
        ({"start_max_pixels": -1}, FINAL, 100, "start_max_pixels = -1"),
        ({"start_max_pixels": 800_000, "fraction": 0.0}, FINAL, 100, "fraction = 0.0"),
        ({"start_max_pixels": 800_000, "fraction": 1.5}, FINAL, 100, "fraction = 1.5"),
        ({"start_max_pixels": 800_000, "stages": 0}, FINAL, 100, "stages = 0"),
        ({}, 100, 100, "final max_pixels = 100"),
        ({}, FINAL, -1, "total_steps = -1"),
    ],
)
def test_schedule_rejects_bad_settings(changes, final, total_steps, match):
    with pytest.raises(ValueError, match=match):
        MaxPixelSchedule(schedule(**changes), final, total_steps, FACTOR)


def test_schedule_rejects_negative_steps_and_unknown_stages():
    s = MaxPixelSchedule(schedule(**EXAMPLE), FINAL, 1000, FACTOR)
    with pytest.raises(ValueError, match="step = -1"):
        s.stage(-1)
    with pytest.raises(ValueError, match="stage = 5"):
        s.stage_max_pixels(5)
