"""What every image back end shares: checking an ImagePlan, the canvas and its parts, the interface.

A back end decodes an image and resizes it to ``plan.resize_to`` (and the
thumbnail to ``plan.thumbnail_size``), as uint8 [H, W, 3]; compose() turns
those pixels into the plan's normalised parts, the same way for every back
end, so they differ only in decoding and resampling (megavl/data/image_backends.py).
"""

from __future__ import annotations

import abc
from functools import lru_cache
from typing import Hashable, Optional, Sequence

import torch
from PIL import Image

from megavl.config import VisionConfig
from megavl.data.batch import ImagePatches
from megavl.data.image_patches import image_to_patches
from megavl.data.images import ImageDecodeError, open_image_header
from megavl.data.resolution import ImagePlan

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # DataConfig.max_image_pixels' default

RenderedParts = list[tuple[str, torch.Tensor]]


class ImageBatchError(ImageDecodeError):
    """One item of a render_batch call could not be rendered; ``index`` says which."""

    def __init__(self, index: int, error: ImageDecodeError):
        super().__init__(error.reason)
        self.index = index

    def __str__(self) -> str:
        return f"image {self.index} of the batch: {self.reason}"


# -- header and plan -------------------------------------------------------


def peek_size(data: bytes, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(height, width) of encoded image bytes, read from the header alone.

    Raises ImageDecodeError (which the data loader counts as ``bad_image``)
    for bytes Pillow cannot identify and for images above max_image_pixels,
    before any pixel is decoded. Corrupt pixel data further on is only found
    by render().
    """
    width, height = open_image_header(data, max_image_pixels).size
    return height, width


def check_plan(plan: ImagePlan) -> None:
    """Raises ValueError naming the field when a plan cannot be carried out."""
    for name in ("resize_to", "canvas"):
        size = getattr(plan, name)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"ImagePlan.{name} = {size}: expected (height, width), both positive")
    if plan.resize_to[0] > plan.canvas[0] or plan.resize_to[1] > plan.canvas[1]:
        raise ValueError(f"ImagePlan.resize_to = {plan.resize_to} does not fit in canvas = {plan.canvas}")
    if not plan.parts:
        raise ValueError("ImagePlan.parts is empty: a plan needs at least one part")
    for i, part in enumerate(plan.parts):
        if part.box is None:
            if plan.thumbnail_size is None or len(plan.thumbnail_size) != 2 or min(plan.thumbnail_size) <= 0:
                raise ValueError(
                    f"ImagePlan.parts[{i}] is a thumbnail (box None) but thumbnail_size = "
                    f"{plan.thumbnail_size}; expected (height, width), both positive"
                )
            continue
        top, left, height, width = part.box
        inside = top >= 0 and left >= 0 and top + height <= plan.canvas[0] and left + width <= plan.canvas[1]
        if height <= 0 or width <= 0 or not inside:
            raise ValueError(
                f"ImagePlan.parts[{i}].box = {part.box} (top, left, height, width) is empty or "
                f"lies outside canvas = {plan.canvas}"
            )


def has_thumbnail(plan: ImagePlan) -> bool:
    return any(part.box is None for part in plan.parts)


@lru_cache(maxsize=8)
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...],
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(mean, device=device).view(3, 1, 1), torch.tensor(std, device=device).view(3, 1, 1)


def _normalise(hwc: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W], (x/255 - mean) / std with the plan's statistics.

    The operations and their order are image_to_model_input's, so the
    results agree bit for bit.
    """
    mean, std = _mean_std(tuple(plan.mean), tuple(plan.std), hwc.device)
    pixels = hwc.permute(2, 0, 1).float().div_(255.0)
    return (pixels - mean) / std


def compose(resized: torch.Tensor, thumbnail: Optional[torch.Tensor], plan: ImagePlan) -> RenderedParts:
    """Resized (and thumbnail) uint8 HWC pixels -> the plan's normalised parts."""
    if tuple(resized.shape[:2]) != tuple(plan.resize_to):
        raise RuntimeError(f"resized image is {tuple(resized.shape[:2])}, the plan wants {plan.resize_to}")
    image = _normalise(resized, plan)
    if tuple(plan.canvas) == tuple(plan.resize_to):
        canvas = image
    else:
        # Zero after normalising is the mean colour, so padding is exactly 0.
        canvas = image.new_zeros((3, *plan.canvas))
        canvas[:, : plan.resize_to[0], : plan.resize_to[1]] = image
    parts = []
    for part in plan.parts:
        if part.box is None:
            parts.append((part.tag, _normalise(thumbnail, plan)))
        else:
            top, left, height, width = part.box
            parts.append((part.tag, canvas[:, top : top + height, left : left + width].contiguous()))
    return parts


def to_patches(pixels: torch.Tensor, vision: VisionConfig) -> ImagePatches:
    """Normalised pixels [3, H, W] of one part -> the vision encoder's patches."""
    if vision.in_channels != 3:
        raise ValueError(f"model.vision.in_channels = {vision.in_channels}: RGB images need 3")
    values, grid = image_to_patches(pixels, vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size)
    return ImagePatches(values, grid)


# -- the interface ---------------------------------------------------------


class ImageBackend(abc.ABC):
    """Carries out ImagePlans on encoded images; megavl/data/image_backends.py describes the back ends."""

    name: str

    def __init__(self, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        if max_image_pixels < 1:
            raise ValueError(f"max_image_pixels = {max_image_pixels} must be >= 1")
        self.max_image_pixels = max_image_pixels

    @property
    def output_device(self) -> torch.device:
        """Where the rendered pixels are."""
        return torch.device("cpu")

    def render(self, data: bytes, plan: ImagePlan) -> RenderedParts:
        """[(part.tag, float32 [3, h, w]) for each part of plan], in the plan's order.

        Raises ImageDecodeError for unreadable, corrupt or oversized images
        and ValueError for an inconsistent plan.
        """
        try:
            return self.render_batch([(data, plan)])[0]
        except ImageBatchError as e:
            raise ImageDecodeError(e.reason) from None

    @abc.abstractmethod
    def render_batch(self, items: Sequence[tuple[bytes, ImagePlan]]) -> list[RenderedParts]:
        """render() for several images at once.

        One bad image fails the call with ImageBatchError, whose ``index``
        names it, so a caller can drop that item and render the rest again.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def render_by_owner(backend: ImageBackend, items: Sequence[tuple[bytes, ImagePlan]], owners: Sequence[Hashable]
                    ) -> tuple[list[Optional[RenderedParts]], dict[Hashable, tuple[int, ImageBatchError]]]:
    """Renders items in one back-end batch; owners[i] is what item i belongs to (a record).

    An item that fails fails its owner: the owner's items are dropped and the rest are rendered
    again. Returns each item's parts (None for the items of a failed owner) and, for each failed
    owner, the index of the item that failed and its error. The loader (records.py) and the
    trainer (trainer_decode.py) both render this way.
    """
    results: list[Optional[RenderedParts]] = [None] * len(items)
    failed: dict[Hashable, tuple[int, ImageBatchError]] = {}
    pending = list(range(len(items)))
    while pending:
        try:
            rendered = backend.render_batch([items[i] for i in pending])
        except ImageBatchError as e:
            item = pending[e.index]
            failed[owners[item]] = (item, e)
            pending = [i for i in pending if owners[i] != owners[item]]
            continue
        for i, parts in zip(pending, rendered):
            results[i] = parts
        break
    return results, failed


def planned_patches(parts: Sequence[RenderedParts], vision: VisionConfig, planned: Sequence[Sequence[int]],
                    key: str) -> list[ImagePatches]:
    """The patches of rendered images' parts, checked against the grids planned for them (which
    the record's tokens were counted from); RuntimeError naming the record when they differ."""
    patches = [to_patches(pixels, vision) for image_parts in parts for _, pixels in image_parts]
    if [tuple(p.grid_thw) for p in patches] != [tuple(grid) for grid in planned]:
        raise RuntimeError(f"record {key!r}: rendered image grids {[p.grid_thw for p in patches]} "
                           f"differ from the planned {[tuple(grid) for grid in planned]}")
    return patches


def checked_items(items: Sequence[tuple[bytes, ImagePlan]], max_image_pixels: int) -> list[Image.Image]:
    """Headers of all items, opened and size-checked, after checking every plan."""
    for data, plan in items:
        check_plan(plan)
    headers = []
    for index, (data, _) in enumerate(items):
        try:
            headers.append(open_image_header(data, max_image_pixels))
        except ImageDecodeError as e:
            raise ImageBatchError(index, e) from None
    return headers
