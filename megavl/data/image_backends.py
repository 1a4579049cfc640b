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
  the GPU. It uses DALI's cubic filter with antialiasing, the same kernel as
  Pillow's BICUBIC; what differs is rounding: Pillow stores the intermediate
  of its two separable passes as 8-bit and clips it, DALI keeps it in float.
  Measured on photos and drawings with sharp edges (PNG, JPEG; up- and
  downscaling): mean |difference| 0.1-0.2 of one 8-bit level, at most about
  26 levels at a few pixels on hard edges. Images whose colour handling DALI
  does not reproduce (transparency, 16-bit, CMYK, formats DALI cannot read)
  are rendered by Pillow inside DaliBackend.

select_backend() picks one from config.data.image_backend. DALI is optional
(pip install 'megavl[dali]') and imported only when a DALI back end is built.
"""

from __future__ import annotations

import abc
import io
import logging
import os
import time
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from megavl.config import IMAGE_BACKENDS, VisionConfig
from megavl.data.batch import ImagePatches
from megavl.data.image_patches import image_to_patches
from megavl.data.images import IMAGE_MEAN, IMAGE_STD, ImageDecodeError, decode_image, open_image_header, smart_resize
from megavl.data.resolution import ImagePart, ImagePlan

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # DataConfig.max_image_pixels' default

RenderedParts = list[tuple[str, torch.Tensor]]

# Source formats and Pillow modes whose decoding DALI reproduces exactly
# (checked against Pillow's convert("RGB")). Everything else, transparency
# above all (DALI drops alpha; images._to_rgb composites it on white), goes
# through Pillow.
_DALI_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP"})
_DALI_MODES = frozenset({"RGB", "L", "P", "1"})


class ImageBatchError(ImageDecodeError):
    """One item of a render_batch call could not be rendered; ``index`` says which."""

    def __init__(self, index: int, error: ImageDecodeError):
        super().__init__(error.reason)
        self.index = index

    def __str__(self) -> str:
        return f"image {self.index} of the batch: {self.reason}"


# -- header -----------------------------------------------------------------


def peek_size(data: bytes, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(height, width) of encoded image bytes, read from the header alone.

    Raises ImageDecodeError (which the data loader counts as ``bad_image``)
    for bytes Pillow cannot identify and for images above max_image_pixels,
    before any pixel is decoded. Corrupt pixel data further on is only found
    by render().
    """
    width, height = open_image_header(data, max_image_pixels).size
    return height, width


def _dali_can_decode(header: Image.Image) -> bool:
    if header.format not in _DALI_FORMATS or header.mode not in _DALI_MODES:
        return False
    return not (header.mode == "P" and "transparency" in header.info)


# -- plans and pixels -------------------------------------------------------


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


def _has_thumbnail(plan: ImagePlan) -> bool:
    return any(part.box is None for part in plan.parts)


@lru_cache(maxsize=8)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGE_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=device).view(3, 1, 1)
    return mean, std


def _normalise(hwc: torch.Tensor) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W], (x/255 - mean) / std.

    The operations and their order are image_to_model_input's, so the
    results agree bit for bit.
    """
    mean, std = _mean_std(hwc.device)
    pixels = hwc.permute(2, 0, 1).float().div_(255.0)
    return (pixels - mean) / std


def _compose(resized: torch.Tensor, thumbnail: Optional[torch.Tensor], plan: ImagePlan) -> RenderedParts:
    """Resized (and thumbnail) uint8 HWC pixels -> the plan's normalised parts."""
    if tuple(resized.shape[:2]) != tuple(plan.resize_to):
        raise RuntimeError(f"resized image is {tuple(resized.shape[:2])}, the plan wants {plan.resize_to}")
    image = _normalise(resized)
    if tuple(plan.canvas) == tuple(plan.resize_to):
        canvas = image
    else:
        # Zero after normalising is the mean colour, so padding is exactly 0.
        canvas = image.new_zeros((3, *plan.canvas))
        canvas[:, : plan.resize_to[0], : plan.resize_to[1]] = image
    parts = []
    for part in plan.parts:
        if part.box is None:
            parts.append((part.tag, _normalise(thumbnail)))
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


# -- back ends --------------------------------------------------------------


class ImageBackend(abc.ABC):
    """Carries out ImagePlans on encoded images; see the module docstring."""

    name: str

    def __init__(self, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        if max_image_pixels < 1:
            raise ValueError(f"max_image_pixels = {max_image_pixels} must be >= 1")
        self.max_image_pixels = max_image_pixels

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


def _checked_items(items: Sequence[tuple[bytes, ImagePlan]], max_image_pixels: int) -> list[Image.Image]:
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


class PillowBackend(ImageBackend):
    """Pillow decode + BICUBIC resize; pixels on the CPU."""

    name = "pillow"

    def render_batch(self, items: Sequence[tuple[bytes, ImagePlan]]) -> list[RenderedParts]:
        _checked_items(items, self.max_image_pixels)
        results = []
        for index, (data, plan) in enumerate(items):
            try:
                results.append(self._render_one(data, plan))
            except ImageDecodeError as e:
                raise ImageBatchError(index, e) from None
        return results

    def _render_one(self, data: bytes, plan: ImagePlan) -> RenderedParts:
        image = decode_image(data, self.max_image_pixels)
        thumbnail = _pillow_resize(image, plan.thumbnail_size) if _has_thumbnail(plan) else None
        return _compose(_pillow_resize(image, plan.resize_to), thumbnail, plan)


def _pillow_resize(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """RGB image -> uint8 [H, W, 3] at size (height, width)."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(image, dtype=np.uint8))


def _import_dali():
    """The DALI modules this file uses; ImportError when DALI is not installed."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline

    return fn, types, Pipeline


def dali_available() -> bool:
    try:
        _import_dali()
    except ImportError:
        return False
    return True


def _dali_missing_error(cause: BaseException) -> ImportError:
    return ImportError(
        f"data.image_backend = 'dali' needs NVIDIA DALI, which cannot be imported ({cause}); "
        "install it with: pip install 'megavl[dali]' (the nvidia-dali-cuda120 package), "
        "or set data.image_backend to 'pillow' or 'auto'"
    )


class DaliBackend(ImageBackend):
    """DALI decode + cubic antialiased resize, in pipelines of up to batch_size images.

    device="cpu" runs CPU-only pipelines (no GPU needed); device="gpu" decodes
    with nvJPEG ("mixed") and resizes on the GPU, and returns CUDA tensors on
    torch's current device (or device_id). Padding, cropping and normalising
    happen in torch on the same device. Pipelines are built on first use and
    rebuilt in a forked child, so a back end made before the data-loader
    workers start is safe to use in them (CPU only: CUDA does not survive fork).
    """

    def __init__(
        self,
        device: str = "cpu",
        *,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        batch_size: int = 16,
        num_threads: Optional[int] = None,
        device_id: Optional[int] = None,
    ):
        super().__init__(max_image_pixels)
        if device not in ("cpu", "gpu"):
            raise ValueError(f"DaliBackend device = {device!r}: expected 'cpu' or 'gpu'")
        if batch_size < 1:
            raise ValueError(f"DaliBackend batch_size = {batch_size} must be >= 1")
        try:
            self._fn, self._types, self._pipeline_class = _import_dali()
        except ImportError as e:
            raise _dali_missing_error(e) from None
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError(
                "DaliBackend(device='gpu') needs CUDA, and torch.cuda.is_available() is False; "
                "use device='cpu' or the Pillow back end"
            )
        self.device = device
        self.name = f"dali-{device}"
        self.batch_size = batch_size
        self.num_threads = num_threads or max(1, min(4, len(os.sched_getaffinity(0))))
        if device == "gpu":
            self._device_id = device_id if device_id is not None else torch.cuda.current_device()
            self._torch_device = torch.device("cuda", self._device_id)
        else:
            self._device_id = None
            self._torch_device = torch.device("cpu")
        self._pillow = PillowBackend(max_image_pixels)
        self._pipelines: dict[bool, object] = {}
        self._pid = os.getpid()

    # The pipeline graph is fixed, so images with and without a thumbnail use
    # two pipelines rather than a dummy second resize.
    def _pipeline(self, with_thumbnail: bool):
        if self._pid != os.getpid():
            # A forked child inherits pipeline objects whose threads it lacks.
            self._pipelines = {}
            self._pid = os.getpid()
        if with_thumbnail not in self._pipelines:
            self._pipelines[with_thumbnail] = self._build_pipeline(with_thumbnail)
        return self._pipelines[with_thumbnail]

    def _build_pipeline(self, with_thumbnail: bool):
        fn, types = self._fn, self._types
        pipe = self._pipeline_class(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self._device_id,
            # Inputs are fed and outputs fetched in the same call, so there is
            # nothing to prefetch.
            prefetch_queue_depth=1,
        )
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            image = fn.decoders.image(
                encoded,
                device="mixed" if self.device == "gpu" else "cpu",
                output_type=types.RGB,
                # Plans are made from the stored (unrotated) size, as Pillow reports it.
                adjust_orientation=False,
                # On "mixed", upsample chroma as libjpeg-turbo (Pillow, DALI's CPU decoder) does.
                **({"jpeg_fancy_upsampling": True} if self.device == "gpu" else {}),
            )
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            outputs = [self._resize(image, size)]
            if with_thumbnail:
                thumbnail_size = fn.external_source(name="thumbnail_size", dtype=types.FLOAT, ndim=1)
                outputs.append(self._resize(image, thumbnail_size))
            pipe.set_outputs(*outputs)
        pipe.build()
        return pipe

    def _resize(self, image, size):
        # Keys cubic (a = -0.5) widened when downscaling: Pillow's BICUBIC.
        return self._fn.resize(image, size=size, interp_type=self._types.INTERP_CUBIC, antialias=True)

    def render_batch(self, items: Sequence[tuple[bytes, ImagePlan]]) -> list[RenderedParts]:
        headers = _checked_items(items, self.max_image_pixels)
        results: list[Optional[RenderedParts]] = [None] * len(items)
        groups: dict[bool, list[int]] = {False: [], True: []}
        for index, ((data, plan), header) in enumerate(zip(items, headers)):
            if _dali_can_decode(header):
                groups[_has_thumbnail(plan)].append(index)
            else:
                results[index] = self._render_with_pillow(index, data, plan)
        for with_thumbnail, indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for index, parts in zip(chunk, self._run_chunk(items, chunk, with_thumbnail)):
                    results[index] = parts
        return results

    def _render_with_pillow(self, index: int, data: bytes, plan: ImagePlan) -> RenderedParts:
        try:
            parts = self._pillow._render_one(data, plan)
        except ImageDecodeError as e:
            raise ImageBatchError(index, e) from None
        return [(tag, pixels.to(self._torch_device)) for tag, pixels in parts]

    def _run_chunk(self, items, chunk: list[int], with_thumbnail: bool) -> list[RenderedParts]:
        try:
            outputs = self._run(items, chunk, with_thumbnail)
        except RuntimeError as e:
            # The failed pipeline may be unusable; the next call builds a new one.
            self._pipelines.pop(with_thumbnail, None)
            if "decoders.image" not in str(e):
                raise  # not the image's fault (memory, set-up): skipping images would hide it
            if len(chunk) == 1:
                raise ImageBatchError(chunk[0], ImageDecodeError(f"corrupt image data: {_dali_reason(e)}")) from None
            # DALI fails the whole batch: one image at a time finds the one to blame.
            return [self._run_chunk(items, [index], with_thumbnail)[0] for index in chunk]
        results = []
        for i, index in enumerate(chunk):
            thumbnail = outputs[1][i] if with_thumbnail else None
            results.append(_compose(outputs[0][i], thumbnail, items[index][1]))
        return results

    def _run(self, items, chunk: list[int], with_thumbnail: bool) -> list[list[torch.Tensor]]:
        pipe = self._pipeline(with_thumbnail)
        plans = [items[index][1] for index in chunk]
        pipe.feed_input("encoded", [np.frombuffer(items[index][0], dtype=np.uint8) for index in chunk])
        pipe.feed_input("size", [np.asarray(plan.resize_to, dtype=np.float32) for plan in plans])
        if with_thumbnail:
            pipe.feed_input("thumbnail_size", [np.asarray(plan.thumbnail_size, dtype=np.float32) for plan in plans])
        return [self._to_torch(batch, len(chunk)) for batch in pipe.run()]

    def _to_torch(self, batch, count: int) -> list[torch.Tensor]:
        if self.device == "cpu":
            return [torch.from_numpy(batch.at(i)) for i in range(count)]  # at() returns a copy
        from nvidia.dali.plugin.pytorch import feed_ndarray

        stream = torch.cuda.current_stream(self._torch_device)
        tensors = []
        for i in range(count):
            sample = batch[i]
            out = torch.empty(sample.shape(), dtype=torch.uint8, device=self._torch_device)
            feed_ndarray(sample, out, cuda_stream=stream)
            tensors.append(out)
        # DALI may reuse its output buffers once the batch object is dropped,
        # so the copies must be done before returning.
        stream.synchronize()
        return tensors


def _dali_reason(error: BaseException) -> str:
    """What a DALI pipeline error says went wrong, without the traceback it carries."""
    text = str(error).split("encountered:")[-1]
    lines = [line.strip(" :") for line in text.splitlines()]
    lines = [line for line in lines if line and "no longer valid" not in line]
    return "; ".join(lines)[:300] or type(error).__name__


# -- choosing one -----------------------------------------------------------

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
    # decodes on the CPU (data.num_workers = 0 keeps decoding on the GPU).
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
