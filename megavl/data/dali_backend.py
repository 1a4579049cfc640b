"""The DALI image back end: NVIDIA DALI decode and cubic antialiased resize, on the CPU or the GPU.

With device="gpu" it decodes with nvJPEG and resizes on the GPU, and its
pixels stay there. DALI's cubic filter with antialiasing is the same kernel
as Pillow's BICUBIC; what differs is rounding: Pillow stores the intermediate
of its two separable passes as 8-bit and clips it, DALI keeps it in float.
Measured on photos and drawings with sharp edges (PNG, JPEG; up- and
downscaling): mean |difference| 0.1-0.2 of one 8-bit level, at most about 26
levels at a few pixels on hard edges. Images whose colour handling DALI does
not reproduce (transparency, 16-bit, CMYK, formats DALI cannot read) are
rendered by Pillow inside DaliBackend.

DALI is optional (pip install 'megavl[dali]') and imported only when a
DaliBackend is built.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from megavl.data.image_rendering import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageBackend,
    ImageBatchError,
    RenderedParts,
    checked_items,
    compose,
    has_thumbnail,
)
from megavl.data.images import ImageDecodeError
from megavl.data.pillow_backend import PillowBackend
from megavl.data.resolution import ImagePlan

# Source formats and Pillow modes whose decoding DALI reproduces exactly
# (checked against Pillow's convert("RGB")). Everything else, transparency
# above all (DALI drops alpha; images._to_rgb composites it on white), goes
# through Pillow.
_DALI_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP"})
_DALI_MODES = frozenset({"RGB", "L", "P", "1"})


def _dali_can_decode(header: Image.Image) -> bool:
    if header.format not in _DALI_FORMATS or header.mode not in _DALI_MODES:
        return False
    return not (header.mode == "P" and "transparency" in header.info)


def import_dali():
    """The DALI modules this file uses; ImportError when DALI is not installed."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline

    return fn, types, Pipeline


def dali_missing_error(cause: BaseException) -> ImportError:
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
            self._fn, self._types, self._pipeline_class = import_dali()
        except ImportError as e:
            raise dali_missing_error(e) from None
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

    @property
    def output_device(self) -> torch.device:
        return self._torch_device

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
        headers = checked_items(items, self.max_image_pixels)
        results: list[Optional[RenderedParts]] = [None] * len(items)
        groups: dict[bool, list[int]] = {False: [], True: []}
        for index, ((data, plan), header) in enumerate(zip(items, headers)):
            if _dali_can_decode(header):
                groups[has_thumbnail(plan)].append(index)
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
            parts = self._pillow.render_one(data, plan)
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
            results.append(compose(outputs[0][i], thumbnail, items[index][1]))
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
