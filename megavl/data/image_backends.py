"""Image back ends: encoded bytes + an ImagePlan -> normalised pixels, one tensor per part.

An ImagePlan (megavl/data/resolution.py) says what the model sees of an image:
the source is resized to ``plan.resize_to``, placed top-left on a canvas of
``plan.canvas`` filled with the normalisation mean, and cut into parts (tiles);
a part without a box is the thumbnail, the whole source resized to
``plan.thumbnail_size``. A back end carries the plan out:

    height, width = peek_size(data, max_image_pixels)   # header only
    plan = ...                                           # from (height, width)
    for tag, pixels in backend.render(data, plan):       # float32 [3, h, w]
        patches = to_patches(pixels, config.model.vision)

Two back ends give the same pixels up to resampling round-off:

- PillowBackend decodes and resizes with Pillow (BICUBIC, as
  images.image_to_model_input does and as Qwen2-VL's processor does).
- DaliBackend decodes and resizes with NVIDIA DALI pipelines, on the CPU or,
  with device="gpu", with nvJPEG and GPU resizing; its pixels then stay on
  the GPU (in the training process, after the loader: trainer_decode.py). It uses DALI's cubic filter with antialiasing, the same kernel as
  Pillow's BICUBIC; what differs is rounding: Pillow stores the intermediate
  of its two separable passes as 8-bit and clips it, DALI keeps it in float.
  Measured on photos and drawings with sharp edges (PNG, JPEG; up- and
  downscaling): mean |difference| 0.1-0.2 of one 8-bit level, at most about
  26 levels at a few pixels on hard edges. Images whose colour handling DALI
  does not reproduce (transparency, 16-bit, CMYK, formats DALI cannot read)
  are rendered by Pillow inside DaliBackend.

select_backend() picks one from config.data.image_backend. DALI is optional
(pip install 'megavl[dali]') and imported only when a DALI back end is built.

What the back ends share is in image_rendering.py; the back ends are in
pillow_backend.py and dali_backend.py; this module chooses between them.
"""

from __future__ import annotations

import io
import logging
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from megavl.config import IMAGE_BACKENDS
from megavl.data.dali_backend import DaliBackend, dali_missing_error
# Under this name dali_available and an explicit "dali" both probe for DALI
# (tests replace it to stand for a machine without DALI).
from megavl.data.dali_backend import import_dali as _import_dali
from megavl.data.image_rendering import DEFAULT_MAX_IMAGE_PIXELS, ImageBackend
from megavl.data.images import smart_resize
from megavl.data.pillow_backend import PillowBackend
from megavl.data.resolution import ImagePart, ImagePlan

logger = logging.getLogger(__name__)


def dali_available() -> bool:
    try:
        _import_dali()
    except ImportError:
        return False
    return True


# (pid, name, on_cuda, max_image_pixels) -> back end. Keyed by pid so a forked
# data-loader worker makes its own.
_SELECTED: dict[tuple, ImageBackend] = {}


def select_backend(
    name: str, device: Optional[torch.device] = None, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> ImageBackend:
    """The back end for data.image_backend = name, made once per process.

    device is where training runs (None: CUDA if available). "pillow" is
    Pillow; "dali" is DALI, on the GPU when device is CUDA; "auto" is DALI on
    the GPU when device is CUDA and DALI is installed, else whichever of DALI
    (CPU) and Pillow renders a few sample photos faster here (Pillow without
    DALI).
    """
    if name not in IMAGE_BACKENDS:
        raise ValueError(f"data.image_backend = {name!r}: expected one of {', '.join(IMAGE_BACKENDS)}")
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    # Dataloader workers are forked, and a forked process cannot use CUDA: there DALI
    # decodes on the CPU. (The loader asks for the CPU anyway; GPU decoding happens after
    # it, data.decode_images_in = trainer, megavl/data/trainer_decode.py.)
    on_cuda = on_cuda and torch.utils.data.get_worker_info() is None
    key = (os.getpid(), name, on_cuda, max_image_pixels)
    if key not in _SELECTED:
        _SELECTED[key] = _make_backend(name, on_cuda, device, max_image_pixels)
    return _SELECTED[key]


def resolve_image_backend(name: str, previous: Optional[str] = None) -> str:
    """The concrete back end ("pillow" or "dali") a run uses for data.image_backend = name.

    previous: the concrete choice a resumed run made, kept so that it decodes as before.
    """
    if name != "auto":
        return name
    if previous in ("pillow", "dali"):
        return previous
    return select_backend("auto").name.split("-")[0]


def _make_backend(name: str, on_cuda: bool, device: Optional[torch.device], max_image_pixels: int) -> ImageBackend:
    device_id = device.index if device is not None and device.type == "cuda" else None
    if name == "pillow":
        return PillowBackend(max_image_pixels)
    if name == "dali":
        # Asked for by name, so a missing DALI is an error that says how to install it.
        try:
            _import_dali()
        except ImportError as e:
            raise dali_missing_error(e) from None
        return DaliBackend("gpu" if on_cuda else "cpu", max_image_pixels=max_image_pixels, device_id=device_id)
    if not dali_available():
        logger.info("data.image_backend = auto: DALI is not installed; using pillow")
        return PillowBackend(max_image_pixels)
    if on_cuda:
        logger.info("data.image_backend = auto: CUDA and DALI present; using dali-gpu")
        return DaliBackend("gpu", max_image_pixels=max_image_pixels, device_id=device_id)
    return _faster_on_samples(
        [PillowBackend(max_image_pixels), DaliBackend("cpu", max_image_pixels=max_image_pixels)]
    )


def _faster_on_samples(candidates: list[ImageBackend]) -> ImageBackend:
    samples = _timing_samples()
    timings = {}
    for backend in candidates:
        try:
            timings[backend.name] = time_backend(backend, samples, repeats=2)
        except Exception as e:  # a broken optional install must not stop training
            logger.warning("data.image_backend = auto: %s failed on sample images (%s); not using it", backend.name, e)
    if not timings:
        raise RuntimeError("data.image_backend = auto: no image back end could render the sample images")
    chosen = min(candidates, key=lambda b: timings.get(b.name, float("inf")))
    measured = ", ".join(f"{name} {seconds * 1000:.1f} ms/image" for name, seconds in timings.items())
    logger.info("data.image_backend = auto: %s on %d sample photos; using %s", measured, len(samples), chosen.name)
    return chosen


def time_backend(backend: ImageBackend, items: Sequence[tuple[bytes, ImagePlan]], repeats: int = 2) -> float:
    """Best seconds per image of render_batch(items) over repeats, after one warm-up call."""
    backend.render_batch(items)  # builds pipelines, warms caches
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        backend.render_batch(items)
        if backend.name == "dali-gpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best / len(items)


def _timing_samples() -> list[tuple[bytes, ImagePlan]]:
    """Three photo-like JPEGs of 1-3 MP, each with a native plan of about 1 MP."""
    samples = []
    for seed, (height, width) in enumerate([(768, 1280), (1200, 1600), (2000, 1500)]):
        samples.append((sample_jpeg(height, width, seed), native_plan(height, width)))
    return samples


def native_plan(height: int, width: int, max_pixels: int = 14 * 14 * 4 * 1280, factor: int = 28) -> ImagePlan:
    """The plain plan: the whole image at Qwen2-VL's size, one untagged part."""
    size = smart_resize(height, width, factor, max_pixels=max_pixels)
    return ImagePlan(resize_to=size, canvas=size, parts=[ImagePart("", (0, 0, *size))])


def sample_jpeg(height: int, width: int, seed: int, quality: int = 90) -> bytes:
    """A photo-like JPEG made in memory: smooth colour fields, grain and hard-edged blocks.

    Pure noise would make decoding unrealistically slow and flat colour
    unrealistically fast; this sits between, like a photo.
    """
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    channels = []
    for _ in range(3):
        fy, fx, phase = rng.uniform(0.5, 6.0), rng.uniform(0.5, 6.0), rng.uniform(0, 2 * np.pi)
        channels.append(128 + 90 * np.sin(2 * np.pi * (fy * y + fx * x) + phase))
    pixels = np.stack(channels, axis=-1)
    # A small noise tile repeated costs little and still gives JPEG texture to code.
    grain = rng.normal(0.0, 8.0, (64, 64, 3)).astype(np.float32)
    pixels += np.tile(grain, (height // 64 + 1, width // 64 + 1, 1))[:height, :width]
    for _ in range(12):
        top, left = rng.integers(0, height), rng.integers(0, width)
        bottom, right = top + rng.integers(8, height // 3 + 9), left + rng.integers(8, width // 3 + 9)
        pixels[top:bottom, left:right] = rng.integers(0, 256, 3)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
