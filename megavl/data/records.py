"""One stored record (the members of one WebDataset key) -> a Sample.

A record is ``<key>.json`` (see megavl/data/synthetic.py and tools/prepare_data.py
for the format) plus one image member per ``<image>`` placeholder,
``<key>.img0.png``, ``<key>.img1.jpg``, ... Images go through the dataset's
resolution policy (megavl/data/resolution.py) and an image back end
(megavl/data/image_backends.py).

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

import json
import re
from typing import Mapping, Optional

from megavl.config import Config, ResolutionConfig
from megavl.data.batch import Sample
from megavl.data.conversation import SampleEncoder, count_image_placeholders
from megavl.data.image_backends import ImageBackend, peek_size, to_patches
from megavl.data.resolution import plan_image

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


class RecordDecoder:
    def __init__(self, tokenizer, config: Config, seed: int, backend: ImageBackend):
        self.config = config
        self.backend = backend
        self.encoder = SampleEncoder(tokenizer, config, seed)
        v = config.model.vision
        self.factor = v.patch_size * v.spatial_merge_size

    def decode(
        self,
        key: str,
        members: Mapping[str, bytes],
        policy: Optional[ResolutionConfig] = None,
        max_pixels: Optional[int] = None,
    ) -> Sample:
        """members maps extensions (``json``, ``img0.png``, ...) to bytes. policy
        defaults to config.data.resolution; max_pixels (the progressive
        schedule's cap) lowers the policy's native max_pixels, never raises it."""
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
        inputs = [self._image(i, images[i], policy, max_pixels) for i in range(wanted)]
        try:
            return self.encoder.encode(record, inputs)
        except ValueError as e:
            raise RecordSkip("invalid_record", str(e)) from None

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

    def _image(self, index: int, data: bytes, policy: ResolutionConfig, max_pixels: Optional[int]):
        try:
            height, width = peek_size(data, self.config.data.max_image_pixels)
            plan = plan_image(height, width, policy, self.factor, max_pixels)
            parts = self.backend.render(data, plan)
        except ValueError as e:  # ImageDecodeError included
            raise RecordSkip("bad_image", f"img{index}: {e}") from None
        vision = self.config.model.vision
        return [(tag, to_patches(pixels, vision)) for tag, pixels in parts]
