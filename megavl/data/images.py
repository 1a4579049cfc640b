"""Encoded image bytes -> RGB image -> resized, normalised patches for the vision encoder."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from megavl.config import Config
from megavl.config.towers import image_normalisation
from megavl.data.batch import ImagePatches
from megavl.data.image_patches import image_to_patches


MAX_ASPECT_RATIO = 200


class ImageDecodeError(ValueError):
    """Image bytes that cannot (or should not) be decoded; ``reason`` is a short description."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def open_image_header(data: bytes, max_pixels_allowed: int = 64_000_000) -> Image.Image:
    """Pillow's lazily opened image: header parsed and size-checked, pixels not decoded.

    Checking the size before decoding refuses a small file that would expand
    to gigabytes (a decompression bomb) without allocating them.
    """
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning is redundant with the check below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"decompression bomb: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"unreadable image: {e}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"empty image {width}x{height}")
    if width * height > max_pixels_allowed:
        raise ImageDecodeError(
            f"decompression bomb: {width}x{height} exceeds data.max_image_pixels = {max_pixels_allowed}"
        )
    return image


def decode_image(data: bytes, max_pixels_allowed: int = 64_000_000) -> Image.Image:
    """Decodes PNG/JPEG/... bytes into an RGB image, refusing bombs before decoding."""
    image = open_image_header(data, max_pixels_allowed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            return _to_rgb(image)
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Truncated or corrupt pixel data only shows up here, not in open().
        raise ImageDecodeError(f"corrupt image data: {e}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        # 16-bit greyscale (PNG opens as I;16, or I): Pillow's convert("RGB") clips
        # every value above 255 instead of scaling, which turns the image white.
        grey = np.asarray(image, dtype=np.float64)
        grey = np.rint(np.clip(grey, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "F":
        raise ImageDecodeError("floating-point pixels (mode F) have no defined range to map to 8-bit RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels carry arbitrary colours; put them on white, as
        # Qwen2-VL's preprocessing does, so they do not leak into the input.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 1280
) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of factor, close to the
    original aspect ratio, and height*width within [min_pixels, max_pixels].

    Matches the reference rule exactly, so a model trained on these inputs
    sees the same sizes at inference under Qwen2-VL's processor. That
    includes its one overshoot: for extreme aspect ratios the short side is
    held at one factor and the area can end up above max_pixels.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} must be positive")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image size {height}x{width}: aspect ratio {max(height, width) / min(height, width):.1f} "
            f"is above {MAX_ASPECT_RATIO}"
        )
    if min_pixels < 1 or max_pixels < factor * factor:
        raise ValueError(
            f"min_pixels = {min_pixels} must be >= 1 and max_pixels = {max_pixels} at least one "
            f"{factor}x{factor} unit"
        )
    # A side that rounds to 0 makes the area 0, which the min_pixels branch
    # below scales up.
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_to_model_input(image: Image.Image, config: Config) -> ImagePatches:
    """An RGB image -> patches at the resolution smart_resize picks from config.data."""
    v = config.model.vision
    if v.in_channels != 3:
        raise ValueError(f"model.vision.in_channels = {v.in_channels}: RGB images need 3")
    factor = v.patch_size * v.spatial_merge_size
    height, width = smart_resize(
        image.height, image.width, factor, config.data.resolution.min_pixels, config.data.resolution.max_pixels
    )
    image = image.convert("RGB")
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    pixels = pixels.float().div_(255.0)
    mean, std = image_normalisation(v)
    pixels = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    values, grid = image_to_patches(pixels, v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
    return ImagePatches(values, grid)
