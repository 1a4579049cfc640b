"""Image geometry: which pixels of an image the model sees, and at what size.

A policy (config.ResolutionConfig) turns an image's (height, width) into an
ImagePlan. The plan is pure geometry; an image back end (Pillow or DALI,
megavl/data/image_backends.py) carries it out.

Three policies:
- native: Qwen2-VL's smart_resize, the aspect ratio kept and the area capped.
- fixed: one canvas of fixed_tokens merged tokens, padded or stretched: a square for a
  square count, else the most nearly square grid, landscape (96 -> 8 x 12 tokens).
- tiling: a grid of square tiles chosen to match the aspect ratio, plus an
  optional thumbnail of the whole image (documents).

MaxPixelSchedule raises the native cap stepwise during pretraining.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional

from megavl.config import FIXED_FITS, RESOLUTION_MODES, MaxPixelScheduleConfig, ResolutionConfig
from megavl.config.towers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


@dataclass(frozen=True)
class ImagePart:
    """One image the vision encoder sees, with the text placed before its tokens."""

    tag: str
    # (top, left, height, width) of this part in the canvas, or None for the
    # thumbnail, which is the whole source image resized to thumbnail_size.
    box: Optional[tuple[int, int, int, int]]


@dataclass(frozen=True)
class ImagePlan:
    """How one source image becomes the images the vision encoder sees."""

    # The source image is resized to resize_to (height, width) ...
    resize_to: tuple[int, int]
    # ... and placed at the top-left of a canvas of this size; the rest is
    # filled with the normalisation mean (zero after normalising).
    canvas: tuple[int, int]
    # Crops of the canvas, in reading order, then the thumbnail (if any).
    parts: list[ImagePart] = field(default_factory=list)
    thumbnail_size: Optional[tuple[int, int]] = None
    # Per-channel pixel statistics the parts are normalised with (the tower's, set by the
    # record decoder from model.vision).
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD


TILE_GLOBAL_TAG = "<tile_global>"


def plan_image(
    height: int, width: int, policy: ResolutionConfig, factor: int, max_pixels: Optional[int] = None
) -> ImagePlan:
    """The plan for a height x width image under policy.

    factor is patch_size * spatial_merge_size: every side the encoder sees is
    a multiple of it. max_pixels, when given, replaces policy.max_pixels; it
    is the progressive schedule's cap and only native mode has an area cap to
    replace, so the other modes ignore it.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} (height x width): both sides must be positive")
    _check_factor(factor)
    if policy.mode == "native":
        return _plan_native(height, width, policy, factor, max_pixels)
    if policy.mode == "fixed":
        return _plan_fixed(height, width, policy, factor)
    if policy.mode == "tiling":
        return _plan_tiling(height, width, policy, factor)
    raise ValueError(f"resolution mode = {policy.mode!r}: must be one of {', '.join(RESOLUTION_MODES)}")


def _check_factor(factor: int) -> None:
    if factor <= 0:
        raise ValueError(f"factor = {factor}: must be positive (patch_size * spatial_merge_size)")


def _whole_canvas(canvas: tuple[int, int]) -> list[ImagePart]:
    return [ImagePart("", (0, 0, canvas[0], canvas[1]))]


def _plan_native(
    height: int, width: int, policy: ResolutionConfig, factor: int, max_pixels: Optional[int]
) -> ImagePlan:
    # Imported here: images.py pulls in torch and is the natural caller of
    # this module, so a top-level import would make a cycle.
    from megavl.data.images import smart_resize

    cap = policy.max_pixels if max_pixels is None else max_pixels
    size = smart_resize(height, width, factor, policy.min_pixels, cap)
    return ImagePlan(resize_to=size, canvas=size, parts=_whole_canvas(size))


# The longest fixed grid, columns to rows: a count with no closer factor pair (a prime) would
# make a strip of single tokens.
MAX_FIXED_ASPECT = 4


def fixed_grid(fixed_tokens: int) -> tuple[int, int]:
    """(rows, cols) of merged tokens of the fixed regime: the square for a square count, else the
    most nearly square grid with the longer side across (96 -> 8 x 12)."""
    if fixed_tokens <= 0:
        raise ValueError(f"fixed_tokens = {fixed_tokens}: must be positive (e.g. 64, 96, 256, 400)")
    rows = max(r for r in range(1, math.isqrt(fixed_tokens) + 1) if fixed_tokens % r == 0)
    cols = fixed_tokens // rows
    if cols > MAX_FIXED_ASPECT * rows:
        raise ValueError(
            f"fixed_tokens = {fixed_tokens}: its most nearly square grid is {rows} x {cols} merged tokens, "
            f"longer than {MAX_FIXED_ASPECT}:1; give a count with a closer factor pair (e.g. 64, 96, 256, 400)"
        )
    return rows, cols


def fixed_canvas(fixed_tokens: int, factor: int) -> tuple[int, int]:
    """(height, width) in pixels of the fixed regime: 256 tokens at factor 28 -> 448 x 448, 96 -> 224 x 336."""
    rows, cols = fixed_grid(fixed_tokens)
    return rows * factor, cols * factor


def _plan_fixed(height: int, width: int, policy: ResolutionConfig, factor: int) -> ImagePlan:
    canvas = fixed_canvas(policy.fixed_tokens, factor)
    if policy.fixed_fit == "resize":
        resize_to = canvas
    elif policy.fixed_fit == "pad":
        resize_to = _fit_inside(height, width, canvas)
    else:
        raise ValueError(f"fixed_fit = {policy.fixed_fit!r}: must be one of {', '.join(FIXED_FITS)}")
    return ImagePlan(resize_to=resize_to, canvas=canvas, parts=_whole_canvas(canvas))


def _fit_inside(height: int, width: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """(height, width) scaled to fill the canvas on one side, the aspect ratio kept (the other side
    rounded half up); on a square canvas, the long side becomes the canvas's."""
    canvas_h, canvas_w = canvas
    if height * canvas_w >= width * canvas_h:  # relatively taller than the canvas: its height fills
        return canvas_h, min(canvas_w, _scale(width, canvas_h, height))
    return min(canvas_h, _scale(height, canvas_w, width)), canvas_w


def _scale(n: int, numerator: int, denominator: int) -> int:
    """n * numerator / denominator rounded half up, at least 1."""
    # Integer arithmetic, so the result does not depend on float error.
    return max(1, (2 * n * numerator + denominator) // (2 * denominator))


def choose_tile_grid(height: int, width: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The (rows, cols) grid of tile x tile tiles for a height x width image.

    Candidates are all grids with min_tiles <= rows*cols <= max_tiles. The
    grid whose aspect ratio cols/rows is closest to width/height in log space
    wins (|log((cols/rows) / (width/height))|, compared exactly as fractions).

    Ties (e.g. 1x1, 2x2 and 3x3 for a square image) are broken by area: a grid
    "fits" when the image has at least half its pixels,
    height*width >= rows*cols*tile*tile / 2, so it is upscaled by at most
    sqrt(2) per side. The tied grid with the most tiles that fits wins; when
    none fits, the tied grid with the fewest tiles. Grids tied on both counts
    (1x2 and 2x1 when a square image must use 2 tiles) go to fewer rows.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} (height x width): both sides must be positive")
    if tile <= 0:
        raise ValueError(f"tile_size = {tile}: must be positive")
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(
            f"min_tiles = {min_tiles}, max_tiles = {max_tiles}: need 1 <= min_tiles <= max_tiles"
        )
    grids = _candidate_grids(min_tiles, max_tiles)
    distances = {grid: _aspect_distance(grid, height, width) for grid in grids}
    best = min(distances.values())
    tied = [grid for grid in grids if distances[grid] == best]
    fitting = [(rows, cols) for rows, cols in tied if 2 * height * width >= rows * cols * tile * tile]
    if fitting:
        return max(fitting, key=lambda g: (g[0] * g[1], -g[0]))
    return min(tied, key=lambda g: (g[0] * g[1], g[0]))


def _candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    return [
        (rows, cols)
        for rows in range(1, max_tiles + 1)
        for cols in range(1, max_tiles // rows + 1)
        if rows * cols >= min_tiles
    ]


def _aspect_distance(grid: tuple[int, int], height: int, width: int) -> Fraction:
    """exp(|log((cols/rows) / (width/height))|) as an exact fraction (>= 1).

    exp is monotone, so ordering by this orders by the log distance, and
    exact fractions make ties real ties rather than float accidents.
    """
    rows, cols = grid
    a, b = cols * height, rows * width
    return Fraction(max(a, b), min(a, b))


def _tile_tag(policy: ResolutionConfig, text: str) -> str:
    return text if policy.tile_tags else ""


def _plan_tiling(height: int, width: int, policy: ResolutionConfig, factor: int) -> ImagePlan:
    tile = policy.tile_size
    if tile <= 0 or tile % factor:
        raise ValueError(f"tile_size = {tile}: must be a positive multiple of factor = {factor}")
    rows, cols = choose_tile_grid(height, width, tile, policy.min_tiles, policy.max_tiles)
    canvas = (rows * tile, cols * tile)
    parts = [
        ImagePart(_tile_tag(policy, f"<tile_{r + 1}_{c + 1}>"), (r * tile, c * tile, tile, tile))
        for r in range(rows)
        for c in range(cols)
    ]
    thumbnail_size = None
    # A single tile already is the whole image; a thumbnail would repeat it.
    if policy.thumbnail and rows * cols > 1:
        parts.append(ImagePart(_tile_tag(policy, TILE_GLOBAL_TAG), None))
        thumbnail_size = (tile, tile)
    return ImagePlan(resize_to=canvas, canvas=canvas, parts=parts, thumbnail_size=thumbnail_size)


def vision_token_count(plan: ImagePlan, factor: int) -> int:
    """Merged LM tokens the plan produces: (h/factor)*(w/factor) summed over parts."""
    _check_factor(factor)
    total = 0
    for index, part in enumerate(plan.parts):
        if part.box is not None:
            size = part.box[2:]
        elif plan.thumbnail_size is not None:
            size = plan.thumbnail_size
        else:
            raise ValueError(f"plan.parts[{index}] is a thumbnail (box None) but plan.thumbnail_size is None")
        total += _tokens(size, factor, f"plan.parts[{index}]")
    return total


def _tokens(size: tuple[int, int], factor: int, name: str) -> int:
    height, width = size
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise ValueError(f"{name} size {height}x{width}: sides must be positive multiples of factor = {factor}")
    return (height // factor) * (width // factor)


class MaxPixelSchedule:
    """The native-resolution pixel cap as a step function of the training step.

    With schedule.start_max_pixels == 0 there is one stage (0) and the cap is
    final_max_pixels throughout.

    Otherwise, with S = schedule.stages and the ramp length
    R = floor(schedule.fraction * total_steps + 1/2) (nearest step, halves up),
    stage k < S covers steps [floor(k*R/S), floor((k+1)*R/S)) (steps count
    from 0) and caps at start * (final/start) ** (k/S), rounded down to a
    multiple of factor**2 and at least factor**2. Stage S covers every step
    from R on and caps at final_max_pixels exactly. When R < S some stages are
    empty (their first step equals the next stage's) and are never entered.

    Example: start 800_000, final 6_272_000, fraction 0.35, 4 stages, 1000
    steps: R = 350, stages start at steps 0, 87, 175, 262, 350.

    The cap changes only at stage boundaries, where the trainer rebuilds its
    data loader; fewer stages mean fewer rebuilds.
    """

    def __init__(self, schedule: MaxPixelScheduleConfig, final_max_pixels: int, total_steps: int, factor: int):
        _check_schedule(schedule, final_max_pixels, total_steps, factor)
        self._unit = factor * factor
        self._final = final_max_pixels
        if schedule.start_max_pixels == 0:
            self._boundaries = [0]
            self._caps = [final_max_pixels]
            return
        stages = schedule.stages
        ramp = math.floor(schedule.fraction * total_steps + 0.5)
        self._boundaries = [k * ramp // stages for k in range(stages + 1)]
        self._caps = [self._ramp_cap(schedule.start_max_pixels, k, stages) for k in range(stages)]
        self._caps.append(final_max_pixels)

    def _ramp_cap(self, start: int, k: int, stages: int) -> int:
        value = start * (self._final / start) ** (k / stages)
        return max(self._unit, int(value) // self._unit * self._unit)

    def boundaries(self) -> list[int]:
        """First step of each stage, indexed by stage."""
        return list(self._boundaries)

    def stage_max_pixels(self, stage: int) -> int:
        """The cap during a stage (0 .. len(boundaries()) - 1)."""
        if not 0 <= stage < len(self._caps):
            raise ValueError(f"stage = {stage}: must be in [0, {len(self._caps) - 1}]")
        return self._caps[stage]

    def stage(self, step: int) -> int:
        """The stage a training step (0 = the first) belongs to."""
        if step < 0:
            raise ValueError(f"step = {step}: must be >= 0 (0 is the first training step)")
        # The last stage starting at or before step; this skips empty stages.
        return bisect.bisect_right(self._boundaries, step) - 1

    def max_pixels(self, step: int) -> int:
        """The native-resolution pixel cap at a training step."""
        return self._caps[self.stage(step)]


def _check_schedule(schedule: MaxPixelScheduleConfig, final_max_pixels: int, total_steps: int, factor: int) -> None:
    _check_factor(factor)
    prefix = "data.max_pixels_schedule"
    if final_max_pixels < factor * factor:
        raise ValueError(
            f"final max_pixels = {final_max_pixels}: must be >= factor**2 = {factor * factor}, one merged token"
        )
    if total_steps < 0:
        raise ValueError(f"total_steps = {total_steps}: must be >= 0")
    start = schedule.start_max_pixels
    if start == 0:
        return
    if not 0 < start <= final_max_pixels:
        raise ValueError(
            f"{prefix}.start_max_pixels = {start}: must be 0 (no schedule) or in [1, {final_max_pixels}] "
            f"(the final max_pixels)"
        )
    if not 0.0 < schedule.fraction <= 1.0:
        raise ValueError(f"{prefix}.fraction = {schedule.fraction}: must be in (0, 1]")
    if schedule.stages < 1:
        raise ValueError(f"{prefix}.stages = {schedule.stages}: must be >= 1")
