"""Conversation datasets with image files -> megavl WebDataset shards, ready for energon.

Two input formats:

``llava``: one JSON file holding a list of samples::

    {"id": ..., "image": "rel/a.jpg" | ["a.jpg", "b.jpg"] (optional),
     "conversations": [{"from": "human" | "gpt" | "system", "value": "<image>\\n..."}]}

``messages``: JSONL, one sample per line (blank lines are ignored)::

    {"id": ..., "images": ["a.jpg", ...] (optional),
     "messages": [{"role": "user" | "assistant" | "system",
                   "content": "text with <image>" | [part, ...]}]}

  where a part is ``{"type": "text", "text": ...}``, ``{"type": "image",
  "image": path}`` or ``{"type": "image_url", "image_url": {"url": path}}``
  (``file://`` URLs are accepted; remote and data URLs are not). Parts are
  joined with nothing in between and each image part becomes ``<image>``.
  "images" lists the images of ``<image>`` placeholders in string content,
  or of ``{"type": "image"}`` parts without a path; a sample takes its
  images either from "images" or from parts with paths, not both.

Both map to megavl's record (see megavl.data.conversation)::

    {"id": <the input's id, unchanged>, "conversations": [{"role", "content"}],
     "grounding": bool (only when the input has it)}

with one ``<image>`` per image, in order. An id is a non-empty string or
an integer. Image paths are relative to the image root; an absolute path or
``file://`` URL must lie inside it too, and a path that leads out of it (``..``,
a symbolic link) is refused as ``image_outside_root``.

Output, in this order::

    out/.megavl-prepare          marks the folder as this tool's output, so a
                                 later run may clear and rewrite it
    out/{split}-000000.tar ...   WebDataset shards; each is written as
                                 {name}.tmp and renamed once complete
    out/{split}-000000.tar.idx   energon's byte offsets of the samples in each shard
    out/.nv-meta/                energon index, split and dataset.yaml
    out/report.jsonl             one line per skipped sample
    out/summary.json             {"format", "split", "written", "skipped": {reason:
                                 count}, "shards"}; written last, so its presence
                                 marks a complete run

Keys. The sample at input position i (its index in the JSON list, or its
line number - 1 in JSONL) is stored under the key ``s{i:09d}``: members
``s000000042.json``, ``s000000042.img0.png``, ``s000000042.img1.jpg``, ...
Ids may hold dots, slashes or ``__`` that WebDataset readers take as
separators, so they stay inside the JSON only; the keys are unique, sort in
input order and point back to the input line.

Images. PNG and JPEG bytes are copied unchanged (``.png`` / ``.jpg``, chosen
by the content, not the file name); any other format Pillow reads (WebP,
GIF, BMP, TIFF, ...) is re-encoded to PNG, first frame only.

Skipped samples. Each sample is checked in the order below and skipped with
the first reason that applies; the run goes on. ``report.jsonl`` lines are
``{"id", "index" | "line", "reason", "detail"}`` ("index" for llava,
1-based "line" for messages). Reasons:

``bad_text``
    Damaged text: a line of the JSONL that is not valid UTF-8, or any string
    of the sample (keys included) holding a lone surrogate (a ``\\udXXX``
    escape without its pair: not encodable as UTF-8) or U+FFFD, the
    replacement character. The llava file is decoded with invalid bytes
    replaced by U+FFFD, so they mark the samples they fall in; U+FFFD
    already present in the input is text damaged before, and is refused too.
``bad_record``
    Malformed structure: not an object, missing or invalid "id", missing or
    empty conversations/messages, a turn without string text, an unknown
    ``from``/role or part type, a system turn after the first, an image in a
    non-user turn, image paths that are not non-empty strings, chat special
    tokens (``<|im_start|>`` ...) in the text, a JSONL line that is not JSON.
``duplicate_id``
    An earlier sample with the same id (compared as text) was written; the
    first good copy wins.
``no_answer``
    No assistant (gpt) turn.
``empty_answer``
    An assistant turn whose text is blank.
``placeholder_mismatch``
    The number of ``<image>`` placeholders differs from the number of images.
``image_outside_root``
    An image path that leads outside the image root (an absolute path or
    ``file://`` URL elsewhere, ``..``, a symbolic link pointing out).
``missing_image``
    An image path that is not a file under the image root.
``image_too_large``
    More pixels than ``max_image_pixels``, read from the header before any
    pixel is decoded (decompression bombs).
``bad_image``
    A file Pillow cannot read, or whose pixel data is truncated or corrupt
    (every image is fully decoded once).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from megavl.datasets.energon_meta import write_energon_metadata
from megavl.datasets.prepare_checks import (
    REASONS,
    PrepareError,
    SampleError,
    check_answers_and_placeholders,
    load_image,
)
from megavl.datasets.prepare_output import MARKER, REPORT, SUMMARY, claim_output_dir, write_atomically
from megavl.datasets.prepare_readers import FORMATS, READERS, Entry
from megavl.datasets.shards import ShardWriter

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_SAMPLES_PER_SHARD", "FORMATS", "MARKER", "REASONS", "REPORT",
           "SUMMARY", "PrepareError", "format_summary", "prepare"]

DEFAULT_SAMPLES_PER_SHARD = 1000
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def _printable(value: Any) -> Any:
    # Lone surrogates cannot be written as UTF-8; the report shows them escaped.
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


# ---------------------------------------------------------------- the run


@dataclass
class _Tally:
    written: int = 0
    # As text: the loader's sample keys and conversation-mask seeds use str(id).
    written_ids: set = field(default_factory=set)
    skipped: Counter = field(default_factory=Counter)
    report: list = field(default_factory=list)

    def skip(self, entry: Entry, error: SampleError) -> None:
        self.skipped[error.reason] += 1
        self.report.append(
            {"id": _printable(entry.id), **entry.where, "reason": error.reason, "detail": _printable(error.detail)}
        )


def _check_arguments(fmt, input_path, image_root, samples_per_shard, max_image_pixels, split) -> None:
    if fmt not in FORMATS:
        raise PrepareError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not os.path.isfile(input_path):
        raise PrepareError(f"--input {input_path!r} is not a file")
    if not os.path.isdir(image_root):
        raise PrepareError(f"--image-root {image_root!r} is not a folder")
    if samples_per_shard < 1:
        raise PrepareError(f"--samples-per-shard is {samples_per_shard}; it must be at least 1")
    if max_image_pixels < 1:
        raise PrepareError(f"--max-image-pixels is {max_image_pixels}; it must be at least 1")
    if not SPLIT_NAME.match(split):
        raise PrepareError(f"--split {split!r} must be letters, digits, '_' or '-' (it names the shard files)")


def _members(entry: Entry, image_root: str, max_pixels: int) -> list[tuple[str, bytes]]:
    candidate = entry.candidate
    check_answers_and_placeholders(candidate)
    members = [("json", json.dumps(candidate.record(), ensure_ascii=False).encode("utf-8"))]
    for i, path in enumerate(candidate.images):
        ext, data = load_image(image_root, path, max_pixels)
        members.append((f"img{i}.{ext}", data))
    return members


def prepare(
    fmt: str,
    input_path: str,
    image_root: str,
    out_dir: str,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    split: str = "train",
) -> dict:
    """Converts ``input_path`` into shards under ``out_dir``; returns the summary (also in summary.json).

    Raises PrepareError for unusable arguments or input; bad samples are
    skipped and reported instead. See the module docstring for the details.
    """
    _check_arguments(fmt, input_path, image_root, samples_per_shard, max_image_pixels, split)
    # Reading first: input that cannot be parsed at all leaves --out untouched.
    entries = READERS[fmt](input_path)
    claim_output_dir(out_dir)
    writer = ShardWriter(out_dir, split, samples_per_shard)
    tally = _Tally()
    try:
        for entry in entries:
            try:
                if entry.error is not None:
                    raise entry.error
                if str(entry.candidate.id) in tally.written_ids:
                    raise SampleError("duplicate_id", f"id {entry.candidate.id!r} was already written")
                members = _members(entry, image_root, max_image_pixels)
            except SampleError as e:
                tally.skip(entry, e)
                continue
            writer.add(f"s{entry.position:09d}", members)
            tally.written += 1
            tally.written_ids.add(str(entry.candidate.id))
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise

    if shards:
        counts = write_energon_metadata(out_dir, shards, split)
        if sum(counts.values()) != tally.written:
            raise RuntimeError(f"energon indexed {sum(counts.values())} samples but {tally.written} were written")
    summary = {
        "format": fmt,
        "split": split,
        "written": tally.written,
        "skipped": {reason: tally.skipped[reason] for reason in REASONS if tally.skipped[reason]},
        "shards": shards,
    }
    write_atomically(
        os.path.join(out_dir, REPORT), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in tally.report)
    )
    write_atomically(os.path.join(out_dir, SUMMARY), json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    return summary


def format_summary(summary: dict, out_dir: str) -> str:
    """The summary as lines for a person."""
    lines = [
        f"wrote {_count(summary['written'], 'sample')} in {_count(len(summary['shards']), 'shard')} "
        f"to {out_dir} (split {summary['split']!r})"
    ]
    skipped = summary["skipped"]
    if skipped:
        lines.append(f"skipped {_count(sum(skipped.values()), 'sample')}:")
        width = max(len(reason) for reason in skipped)
        lines += [f"  {reason:<{width}}  {count}" for reason, count in skipped.items()]
        lines.append(f"details: {os.path.join(out_dir, REPORT)}")
    else:
        lines.append("skipped no samples")
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
