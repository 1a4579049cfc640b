"""The Pillow image back end: Pillow decode and BICUBIC resize, pixels on the CPU.

BICUBIC is what images.image_to_model_input and Qwen2-VL's processor use, so
this back end gives the pixels of the existing preprocessing.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from megavl.data.image_rendering import (
    ImageBackend,
    ImageBatchError,
    RenderedParts,
    checked_items,
    compose,
    has_thumbnail,
)
from megavl.data.images import ImageDecodeError, decode_image
from megavl.data.resolution import ImagePlan


class PillowBackend(ImageBackend):
    """Pillow decode + BICUBIC resize; pixels on the CPU."""

    name = "pillow"

    def render_batch(self, items: Sequence[tuple[bytes, ImagePlan]]) -> list[RenderedParts]:
        checked_items(items, self.max_image_pixels)
        results = []
        for index, (data, plan) in enumerate(items):
            try:
                results.append(self.render_one(data, plan))
            except ImageDecodeError as e:
                raise ImageBatchError(index, e) from None
        return results

    def render_one(self, data: bytes, plan: ImagePlan) -> RenderedParts:
        """One image whose plan and header checked_items has checked; raises ImageDecodeError."""
        image = decode_image(data, self.max_image_pixels)
        thumbnail = _pillow_resize(image, plan.thumbnail_size) if has_thumbnail(plan) else None
        return compose(_pillow_resize(image, plan.resize_to), thumbnail, plan)


def _pillow_resize(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """RGB image -> uint8 [H, W, 3] at size (height, width)."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(image, dtype=np.uint8))
