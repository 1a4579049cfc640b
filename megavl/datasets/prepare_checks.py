"""Per-sample checks of tools/prepare_data.py: text, structure, answers and placeholders, images.

Each check raises SampleError with the reason the sample is skipped for;
megavl/datasets/prepare.py lists the reasons in the order they are checked.
PrepareError is for arguments or input that make the whole run impossible.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from PIL import Image, ImageFile, UnidentifiedImageError

from megavl.data.tokenizer import IM_END, IM_START, IMAGE_PAD, IMAGE_PLACEHOLDER, VISION_END, VISION_START

REASONS = (
    "bad_text",
    "bad_record",
    "duplicate_id",
    "no_answer",
    "empty_answer",
    "placeholder_mismatch",
    "image_outside_root",
    "missing_image",
    "image_too_large",
    "bad_image",
)
# Text holding these would break the turn layout or the image-token count,
# so the loader refuses it; better to say so now, with the sample's id.
CHAT_TOKENS = (IM_START, IM_END, IMAGE_PAD, VISION_START, VISION_END)
_SURROGATE = re.compile("[\ud800-\udfff]")


class PrepareError(ValueError):
    """Arguments or input that make the whole run impossible."""


class SampleError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Candidate:
    """A sample converted to megavl's record, images not yet read."""

    id: Any
    conversations: list[dict]
    images: list[str]
    grounding: Optional[bool] = None

    def record(self) -> dict:
        record = {"id": self.id, "conversations": self.conversations}
        if self.grounding is not None:
            record["grounding"] = self.grounding
        return record


# ---------------------------------------------------------------- text


def _strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(location, string) for every string in a parsed JSON value, keys included."""
    if isinstance(value, str):
        yield path or "<top>", value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield f"{path}.<key>" if path else "<key>", key
            yield from _strings(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")


def check_text(raw: Any) -> None:
    """Raises bad_text for a lone surrogate or U+FFFD anywhere in the sample."""
    for where, text in _strings(raw):
        surrogate = _SURROGATE.search(text)
        if surrogate:
            raise SampleError("bad_text", f"{where}: lone surrogate U+{ord(surrogate.group()):04X}")
        if "\ufffd" in text:
            raise SampleError("bad_text", f"{where}: U+FFFD replacement character (invalid bytes in the input)")


# ---------------------------------------------------------------- records


def check_structure(candidate: Candidate) -> None:
    """The record rules megavl's loader enforces (megavl.data.conversation), as bad_record."""
    for i, turn in enumerate(candidate.conversations):
        role, content = turn["role"], turn["content"]
        if role == "system" and i != 0:
            raise SampleError("bad_record", f"turn {i} is a system turn; only the first may be one")
        if role != "user" and IMAGE_PLACEHOLDER in content:
            raise SampleError("bad_record", f"turn {i} ({role}) holds an image; images belong to user turns")
        for token in CHAT_TOKENS:
            if token in content:
                raise SampleError("bad_record", f"turn {i} contains the chat token {token}")


def check_answers_and_placeholders(candidate: Candidate) -> None:
    answers = [(i, t["content"]) for i, t in enumerate(candidate.conversations) if t["role"] == "assistant"]
    if not answers:
        raise SampleError("no_answer", "no assistant turn, so nothing to train on")
    for i, content in answers:
        if not content.strip():
            raise SampleError("empty_answer", f"turn {i} (assistant) is blank")
    placeholders = sum(t["content"].count(IMAGE_PLACEHOLDER) for t in candidate.conversations)
    if placeholders != len(candidate.images):
        raise SampleError(
            "placeholder_mismatch",
            f"{placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(candidate.images)} images",
        )


# ---------------------------------------------------------------- images


@contextlib.contextmanager
def _own_pixel_limit():
    # Pillow refuses images above its own limit inside open(); this module
    # checks the header size against max_image_pixels instead, which may be
    # higher or lower.
    # A caller's LOAD_TRUNCATED_IMAGES would hide truncation, so it is off too.
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _inside_root(image_root: str, path: str) -> str:
    """The real path of an image, which must lie inside the image root: an input file
    must not make the tool read (and ship in its shards) files from elsewhere."""
    root = os.path.realpath(image_root)
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, full]) != root:
        raise SampleError("image_outside_root", f"{path!r} leads to {full!r}, outside --image-root {image_root!r}")
    return full


def load_image(image_root: str, path: str, max_pixels: int) -> tuple[str, bytes]:
    """(extension, bytes) of a checked image: the file's own PNG/JPEG bytes, or a PNG re-encoding."""
    full = _inside_root(image_root, path)
    if not os.path.isfile(full):
        raise SampleError("missing_image", f"{path!r} is not a file under {image_root!r}")
    try:
        with open(full, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SampleError("bad_image", f"{path!r}: cannot read the file: {e}") from None
    with _own_pixel_limit():
        image = _decoded(data, path, max_pixels)
    if image.format == "PNG":
        return "png", data
    if image.format in ("JPEG", "MPO"):  # MPO: a JPEG with extra frames appended
        return "jpg", data
    return "png", _png(image, path)


def _decoded(data: bytes, path: str, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SampleError("bad_image", f"{path!r}: not an image Pillow can read: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise SampleError(
            "image_too_large", f"{path!r}: {width}x{height} = {width * height} pixels, above {max_pixels}"
        )
    if width <= 0 or height <= 0:
        raise SampleError("bad_image", f"{path!r}: empty image {width}x{height}")
    try:
        # Truncated or corrupt pixel data only shows up when it is decoded.
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise SampleError("bad_image", f"{path!r}: truncated or corrupt pixel data: {e}") from None
    return image


_PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")


def _png(image: Image.Image, path: str) -> bytes:
    try:
        if image.mode not in _PNG_MODES:
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    except (OSError, ValueError) as e:
        raise SampleError("bad_image", f"{path!r}: cannot re-encode {image.format} as PNG: {e}") from None
    return buffer.getvalue()
