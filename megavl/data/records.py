"""One stored record (the members of one WebDataset key) -> a Sample.

A record is ``<key>.json`` (see megavl/data/synthetic.py and tools/prepare_data.py
for the format) plus one image member per ``<image>`` placeholder,
``<key>.img0.png``, ``<key>.img1.jpg``, ... It is decoded in two phases: plan
reads the JSON and only the image headers, sizes every image with the
dataset's resolution policy (megavl/data/resolution.py) and encodes the
conversation, so the record's length is known; render decodes the pixels with
an image back end (megavl/data/image_backends.py) once the record is packed.

A record that cannot be used raises RecordSkip with one of these reasons,
which the loaders count and log with the key:

    missing_json    no .json member
    bad_json        not UTF-8 JSON, or not a JSON object
    invalid_record  malformed conversation, image members that do not match
                    the placeholders, text with chat special tokens
    missing_image   a placeholder without its image member
    bad_image       corrupt, truncated or oversized image bytes
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from megavl.config import Config, ResolutionConfig
from megavl.data.batch import ImagePatches, Sample
from megavl.data.conversation import SampleEncoder, count_image_placeholders
from megavl.data.image_backends import ImageBackend, peek_size, to_patches
from megavl.data.resolution import ImagePart, ImagePlan, plan_image

RECORD_SKIP_REASONS = ("missing_json", "bad_json", "invalid_record", "missing_image", "bad_image")
_IMAGE_MEMBER = re.compile(r"^img(\d+)\.(?:png|jpe?g)$", re.IGNORECASE)


class RecordSkip(Exception):
    """A record that cannot be trained on; ``reason`` is one of RECORD_SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def image_members(members: Mapping[str, bytes]) -> dict[int, bytes]:
    """The record's image members by index (``img3.png`` -> 3)."""
    images = {}
    for ext, data in members.items():
        match = _IMAGE_MEMBER.match(ext)
        if match:
            images[int(match.group(1))] = data
    return images


@dataclass
class PlannedRecord:
    """A record whose tokens are final but whose images are not decoded yet.

    sample.images hold the planned grids with empty pixel values, so lengths
    and vision-token counts are exact; images keeps each image's encoded bytes
    and plan for render.
    """

    sample: Sample
    images: list[tuple[bytes, ImagePlan]] = field(default_factory=list)


class RecordDecoder:
    """Two phases, so that packing can be decided before any pixel is decoded:
    plan (JSON, image headers, tokens) and render (pixels)."""

    def __init__(self, tokenizer, config: Config, seed: int, backend: ImageBackend):
        self.config = config
        self.backend = backend
        self.encoder = SampleEncoder(tokenizer, config, seed)
        v = config.model.vision
        self.factor = v.patch_size * v.spatial_merge_size

    def plan(
        self,
        key: str,
        members: Mapping[str, bytes],
        policy: Optional[ResolutionConfig] = None,
        max_pixels: Optional[int] = None,
    ) -> PlannedRecord:
        """members maps extensions (``json``, ``img0.png``, ...) to bytes. policy
        defaults to config.data.resolution; max_pixels (the progressive
        schedule's cap) lowers the policy's native max_pixels, never raises it.
        Only image headers are read here."""
        policy = policy or self.config.data.resolution
        if max_pixels is not None:
            max_pixels = min(max_pixels, policy.max_pixels)
        record = self._record(key, members)
        try:
            wanted = count_image_placeholders(record)
        except ValueError as e:
            raise RecordSkip("invalid_record", str(e)) from None
        images = image_members(members)
        missing = [i for i in range(wanted) if i not in images]
        if missing:
            raise RecordSkip("missing_image", f"{wanted} <image> placeholders but no img{missing[0]} member")
        if len(images) != wanted:
            raise RecordSkip("invalid_record", f"{len(images)} image members but {wanted} <image> placeholders")
        plans = [self._plan_image(i, images[i], policy, max_pixels) for i in range(wanted)]
        placeholders = [[(part.tag, self._planned_patches(size)) for part, size in _part_sizes(plan)]
                        for _, plan in plans]
        try:
            sample = self.encoder.encode(record, placeholders)
        except ValueError as e:
            raise RecordSkip("invalid_record", str(e)) from None
        return PlannedRecord(sample, plans)

    def render(self, planned: PlannedRecord) -> Sample:
        """The planned record with its images decoded; raises RecordSkip("bad_image")
        for bytes that only fail when decoded (truncated or corrupt data)."""
        vision = self.config.model.vision
        patches = []
        for index, (data, plan) in enumerate(planned.images):
            try:
                parts = self.backend.render(data, plan)
            except ValueError as e:  # ImageDecodeError included
                raise RecordSkip("bad_image", f"img{index}: {e}") from None
            patches += [to_patches(pixels, vision) for _, pixels in parts]
        planned_grids = [image.grid_thw for image in planned.sample.images]
        if [p.grid_thw for p in patches] != planned_grids:
            raise RuntimeError(f"record {planned.sample.key!r}: rendered image grids "
                               f"{[p.grid_thw for p in patches]} differ from the planned {planned_grids}")
        return dataclasses.replace(planned.sample, images=patches)

    @staticmethod
    def _record(key: str, members: Mapping[str, bytes]) -> dict:
        if "json" not in members:
            raise RecordSkip("missing_json", "no .json member")
        try:
            record = json.loads(members["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RecordSkip("bad_json", str(e)) from None
        if not isinstance(record, dict):
            raise RecordSkip("bad_json", f"top level is a {type(record).__name__}, not an object")
        record.setdefault("id", key)
        return record

    def _plan_image(self, index: int, data: bytes, policy: ResolutionConfig,
                    max_pixels: Optional[int]) -> tuple[bytes, ImagePlan]:
        try:
            height, width = peek_size(data, self.config.data.max_image_pixels)
            return data, plan_image(height, width, policy, self.factor, max_pixels)
        except ValueError as e:  # ImageDecodeError included
            raise RecordSkip("bad_image", f"img{index}: {e}") from None

    def _planned_patches(self, size: tuple[int, int]) -> ImagePatches:
        v = self.config.model.vision
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size
        height, width = size
        return ImagePatches(torch.empty(0, patch_dim), (1, height // v.patch_size, width // v.patch_size))


def _part_sizes(plan: ImagePlan) -> list[tuple[ImagePart, tuple[int, int]]]:
    """Each part of the plan with the (height, width) the encoder will see."""
    return [(part, plan.thumbnail_size if part.box is None else (part.box[2], part.box[3])) for part in plan.parts]
