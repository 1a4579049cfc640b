"""One stored record (the members of one WebDataset key) -> a Sample.

A record is ``<key>.json`` (see megavl/datasets/synthetic.py and megavl/datasets/prepare.py
for the format) plus one image member per ``<image>`` placeholder,
``<key>.img0.png``, ``<key>.img1.jpg``, ... It is decoded in two phases: plan
reads the JSON and only the image headers, sizes every image with the
dataset's resolution policy (megavl/data/resolution.py) and encodes the
conversation, so the record's length is known; render decodes the pixels of
a whole pack's records in one batch of an image back end
(megavl/data/image_backends.py) once they are packed.

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
from typing import Mapping, Optional, Union

import torch

from megavl.config import Config, ResolutionConfig
from megavl.config.towers import image_normalisation
from megavl.data.batch import ImagePatches, Sample
from megavl.data.conversation import SampleEncoder, count_image_placeholders
from megavl.data.image_rendering import ImageBackend, peek_size, planned_patches, render_by_owner
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

    def __init__(self, tokenizer, config: Config, seed: int, backend: Optional[ImageBackend]):
        """backend: what render uses; None for a decoder that only plans (images decoded elsewhere)."""
        self.config = config
        self.backend = backend
        self.encoder = SampleEncoder(tokenizer, config, seed)
        v = config.model.vision
        self.factor = v.patch_size * v.spatial_merge_size
        self.mean, self.std = image_normalisation(v)

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
        return self.plan_record(self._record(key, members), members, policy, max_pixels)

    def plan_record(
        self,
        record: dict,
        members: Mapping[str, bytes],
        policy: Optional[ResolutionConfig] = None,
        max_pixels: Optional[int] = None,
        prompt: bool = False,
    ) -> PlannedRecord:
        """plan for a record already parsed, its images in members. ``prompt``: the record ends
        with a question and is encoded as a generation prompt (SampleEncoder.encode)."""
        policy = policy or self.config.data.resolution
        if max_pixels is not None:
            max_pixels = min(max_pixels, policy.max_pixels)
        try:
            wanted = count_image_placeholders(record, prompt)
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
            sample = self.encoder.encode(record, placeholders, prompt)
        except ValueError as e:
            raise RecordSkip("invalid_record", str(e)) from None
        return PlannedRecord(sample, plans)

    def render(self, planned: list[PlannedRecord]) -> list[Union[Sample, RecordSkip]]:
        """The records with their images decoded, all images in one back-end batch (DALI
        decodes a batch in one pipeline run). A record whose bytes only fail when decoded
        (truncated or corrupt data) comes back as RecordSkip("bad_image") and the rest are
        rendered again without it."""
        owners = [r for r in range(len(planned)) for _ in planned[r].images]
        items = [image for record in planned for image in record.images]
        rendered, failed = render_by_owner(self.backend, items, owners)
        results: list[Union[Sample, RecordSkip]] = []
        first = 0  # the record's first item
        for r, record in enumerate(planned):
            if r in failed:
                item, error = failed[r]
                results.append(RecordSkip("bad_image", f"img{item - first}: {error.reason}"))
            else:
                parts = rendered[first : first + len(record.images)]
                grids = [image.grid_thw for image in record.sample.images]
                results.append(dataclasses.replace(
                    record.sample, images=planned_patches(parts, self.config.model.vision, grids, record.sample.key)))
            first += len(record.images)
        return results

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
            plan = plan_image(height, width, policy, self.factor, max_pixels)
            return data, dataclasses.replace(plan, mean=self.mean, std=self.std)
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
