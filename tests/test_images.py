"""Image decoding and the native-resolution rule, the first stage of every record."""

from __future__ import annotations

import io
import random

import pytest
import torch
from PIL import Image

from megavl.config import Config


def image_bytes(rng: random.Random, size: tuple[int, int], fmt: str) -> bytes:
    height, width = size
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    image.putpixel((1, 1), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_decode_image_refuses_corrupt_bytes_and_bombs():
    from megavl.data.images import ImageDecodeError, decode_image

    data = image_bytes(random.Random(1), (100, 100), "png")
    assert decode_image(data).size == (100, 100)
    with pytest.raises(ImageDecodeError, match="corrupt|unreadable"):
        decode_image(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="unreadable"):
        decode_image(b"not an image")
    # Refused from the header alone: the size check runs before any pixel is decoded.
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(data[:100], max_pixels_allowed=5000)


def test_image_preprocessing_matches_qwen2_vl_reference():
    # transformers is an install requirement: a missing or renamed reference module is a failure.
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as reference

    from megavl.data.images import image_to_model_input, smart_resize

    rng = random.Random(2)
    for _ in range(2000):
        h, w = rng.randint(1, 4000), rng.randint(1, 4000)
        if max(h, w) / min(h, w) <= 200:
            assert smart_resize(h, w, 28, 3136, 50176) == reference.smart_resize(h, w, 28, 3136, 50176)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)

    config = Config()
    config.data.resolution.max_pixels = 50176
    pixels = torch.randint(0, 256, (300, 200, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    processor = reference.Qwen2VLImageProcessorPil(min_pixels=config.data.resolution.min_pixels, max_pixels=config.data.resolution.max_pixels)
    expected = processor(images=[image], return_tensors="pt")
    patches = image_to_model_input(image, config)
    assert patches.grid_thw == tuple(expected["image_grid_thw"][0].tolist())
    torch.testing.assert_close(patches.pixel_values, expected["pixel_values"], atol=1e-5, rtol=0)


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits_not_clipped():
    """A 16-bit PNG ramp keeps its shading: Pillow's own convert('RGB') clips it to white."""
    import numpy as np

    from megavl.data.images import decode_image

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode.startswith("I")
    rgb = np.asarray(decode_image(buffer.getvalue()))
    assert rgb.shape == (8, 64, 3) and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    np.testing.assert_array_equal(rgb[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and 120 <= rgb[..., 0].mean() <= 135


def test_floating_point_images_are_refused_with_the_reason():
    import numpy as np

    from megavl.data.images import ImageDecodeError, decode_image

    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(buffer, format="TIFF")
    with pytest.raises(ImageDecodeError, match="mode F"):
        decode_image(buffer.getvalue())
