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
an integer. Image paths are relative to the image root (absolute ones are
used as they are).

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

import contextlib
import io
import json
import os
import re
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from PIL import Image, ImageFile, UnidentifiedImageError

from megavl.data.energon_meta import META_DIR, write_energon_metadata
from megavl.data.shards import TEMPORARY_SUFFIX, ShardWriter
from megavl.data.tokenizer import IM_END, IM_START, IMAGE_PAD, IMAGE_PLACEHOLDER, VISION_END, VISION_START

FORMATS = ("llava", "messages")
REASONS = (
    "bad_text",
    "bad_record",
    "duplicate_id",
    "no_answer",
    "empty_answer",
    "placeholder_mismatch",
    "missing_image",
    "image_too_large",
    "bad_image",
)
DEFAULT_SAMPLES_PER_SHARD = 1000
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000

MARKER = ".megavl-prepare"
REPORT = "report.jsonl"
SUMMARY = "summary.json"

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
ROLES = ("user", "assistant", "system")
# Text holding these would break the turn layout or the image-token count,
# so the loader refuses it; better to say so now, with the sample's id.
CHAT_TOKENS = (IM_START, IM_END, IMAGE_PAD, VISION_START, VISION_END)
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
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


@dataclass
class Entry:
    """One input sample: where it came from, and either a candidate or why it is unusable."""

    where: dict  # {"index": i} or {"line": n}, as written in the report
    position: int  # 0-based; gives the key
    id: Any = None
    candidate: Optional[Candidate] = None
    error: Optional[SampleError] = None


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


def _printable(value: Any) -> Any:
    # Lone surrogates cannot be written as UTF-8; the report shows them escaped.
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


# ---------------------------------------------------------------- structure


def _sample_id(raw: dict) -> Any:
    sample_id = raw.get("id")
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)) or sample_id == "":
        raise SampleError("bad_record", f"'id' is {sample_id!r}; it must be a non-empty string or an integer")
    return sample_id


def _grounding(raw: dict) -> Optional[bool]:
    grounding = raw.get("grounding")
    if grounding is not None and not isinstance(grounding, bool):
        raise SampleError("bad_record", f"'grounding' is {grounding!r}; it must be true or false")
    return grounding


def _image_paths(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise SampleError("bad_record", f"'{name}' is {value!r}; it must be a path or a list of non-empty paths")
    return list(paths)


def _turns(raw: dict, name: str) -> list:
    turns = raw.get(name)
    if not isinstance(turns, list) or not turns:
        raise SampleError("bad_record", f"'{name}' must be a non-empty list, got {type(turns).__name__}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SampleError("bad_record", f"{name}[{i}] must be an object, got {type(turn).__name__}")
    return turns


def llava_sample(raw: Any) -> Candidate:
    """A LLaVA sample as a megavl record; raises SampleError if it has the wrong shape."""
    if not isinstance(raw, dict):
        raise SampleError("bad_record", f"sample is a {type(raw).__name__}, not an object")
    sample_id = _sample_id(raw)
    images = _image_paths(raw.get("image"), "image")
    conversations = []
    for i, turn in enumerate(_turns(raw, "conversations")):
        source = turn.get("from")
        if source not in LLAVA_ROLES:
            raise SampleError(
                "bad_record", f"conversations[{i}].from is {source!r}; valid: {', '.join(LLAVA_ROLES)}"
            )
        if not isinstance(turn.get("value"), str):
            raise SampleError("bad_record", f"conversations[{i}].value must be a string")
        conversations.append({"role": LLAVA_ROLES[source], "content": turn["value"]})
    return Candidate(sample_id, conversations, images, _grounding(raw))


def _local_path(url: Any, where: str) -> str:
    if not isinstance(url, str) or not url:
        raise SampleError("bad_record", f"{where} is {url!r}; it must be a non-empty path")
    if url.startswith("file://"):
        return url[len("file://"):]
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", url)
    # A single letter before the colon is a Windows drive, not a scheme.
    if scheme and len(scheme.group(1)) > 1:
        raise SampleError("bad_record", f"{where} is a {scheme.group(1)}: URL; only local image paths are supported")
    return url


def _part_text(part: Any, where: str, images: list[Optional[str]]) -> str:
    """The text a content part stands for; image parts add their path (or None) to ``images``."""
    if not isinstance(part, dict):
        raise SampleError("bad_record", f"{where} must be an object, got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise SampleError("bad_record", f"{where}.text must be a string")
        return part["text"]
    if kind == "image":
        # Without a path the part stands for the next entry of "images".
        path = part.get("image")
        images.append(None if path is None else _local_path(path, f"{where}.image"))
        return IMAGE_PLACEHOLDER
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        images.append(_local_path(url, f"{where}.image_url.url"))
        return IMAGE_PLACEHOLDER
    raise SampleError("bad_record", f"{where}.type is {kind!r}; valid: text, image, image_url")


def messages_sample(raw: Any) -> Candidate:
    """A chat-messages sample as a megavl record; raises SampleError if it has the wrong shape."""
    if not isinstance(raw, dict):
        raise SampleError("bad_record", f"line is a JSON {type(raw).__name__}, not an object")
    sample_id = _sample_id(raw)
    listed = _image_paths(raw.get("images"), "images")
    part_images: list[Optional[str]] = []
    conversations = []
    for i, message in enumerate(_turns(raw, "messages")):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise SampleError("bad_record", f"messages[{i}].role is {role!r}; valid: {', '.join(ROLES)}")
        if isinstance(content, list):
            content = "".join(_part_text(p, f"messages[{i}].content[{j}]", part_images) for j, p in enumerate(content))
        elif not isinstance(content, str):
            raise SampleError("bad_record", f"messages[{i}].content must be a string or a list of parts")
        conversations.append({"role": role, "content": content})
    return Candidate(sample_id, conversations, _message_images(listed, part_images), _grounding(raw))


def _message_images(listed: list[str], part_images: list[Optional[str]]) -> list[str]:
    """The sample's images: the paths in its image parts, or else its "images" list."""
    with_path = [path for path in part_images if path is not None]
    if with_path and len(with_path) != len(part_images):
        raise SampleError("bad_record", "some image parts have a path and some do not; give all or none a path")
    if with_path and listed:
        raise SampleError("bad_record", "both 'images' and image parts with paths; the image order would be ambiguous")
    return with_path or listed


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


# ---------------------------------------------------------------- readers


def _entry(where: dict, position: int, raw: Any, convert: Callable[[Any], Candidate]) -> Entry:
    sample_id = raw.get("id") if isinstance(raw, dict) else None
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
        sample_id = None
    entry = Entry(where, position, sample_id)
    try:
        check_text(raw)
        entry.candidate = convert(raw)
        check_structure(entry.candidate)
    except SampleError as e:
        entry.error = e
    return entry


def read_llava(path: str) -> Iterator[Entry]:
    """The samples of a LLaVA JSON file; the file is parsed before this returns."""
    with open(path, "rb") as f:
        data = f.read()
    # Invalid bytes become U+FFFD, which check_text then pins on the samples
    # they fall in, rather than the whole file failing to decode.
    try:
        samples = json.loads(data.decode("utf-8-sig", errors="replace"))
    except json.JSONDecodeError as e:
        raise PrepareError(f"--input {path!r} is not valid JSON ({e}); the llava format is one JSON list") from None
    if not isinstance(samples, list):
        raise PrepareError(
            f"--input {path!r} holds a JSON {type(samples).__name__}; the llava format is a list of samples"
        )
    return (_entry({"index": index}, index, raw, llava_sample) for index, raw in enumerate(samples))


def read_messages(path: str) -> Iterator[Entry]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte-order mark
            if not line.strip():
                continue
            yield _messages_line(line, number)


def _messages_line(line: bytes, number: int) -> Entry:
    where, position = {"line": number}, number - 1
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        entry = Entry(where, position, _id_if_readable(line.decode("utf-8", errors="replace")))
        entry.error = SampleError("bad_text", f"invalid UTF-8 at byte {e.start} of the line")
        return entry
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        return Entry(where, position, error=SampleError("bad_record", f"not valid JSON: {e}"))
    return _entry(where, position, raw, messages_sample)


def _id_if_readable(text: str) -> Any:
    # Names the sample in the report when only its text, not its JSON, is damaged.
    with contextlib.suppress(json.JSONDecodeError):
        raw = json.loads(text)
        if isinstance(raw, dict) and isinstance(raw.get("id"), (str, int)):
            return raw["id"]
    return None


READERS = {"llava": read_llava, "messages": read_messages}


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


def load_image(image_root: str, path: str, max_pixels: int) -> tuple[str, bytes]:
    """(extension, bytes) of a checked image: the file's own PNG/JPEG bytes, or a PNG re-encoding."""
    full = os.path.join(image_root, path)
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


# ---------------------------------------------------------------- output folder


def claim_output_dir(out_dir: str) -> None:
    """Creates ``out_dir``, or empties it of a previous run's output; refuses anything else."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PrepareError(f"--out {out_dir!r} exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    entries = os.listdir(out_dir)
    if entries and MARKER not in entries:
        raise PrepareError(
            f"--out {out_dir!r} is not empty and is not an earlier output of this tool (it has no {MARKER} "
            "file); give a new or empty folder"
        )
    for name in entries:
        path = os.path.join(out_dir, name)
        if name == META_DIR and os.path.isdir(path):
            shutil.rmtree(path)
        elif _is_previous_output(name):
            os.remove(path)
    with open(os.path.join(out_dir, MARKER), "w", encoding="utf-8") as f:
        f.write("written by tools/prepare_data.py; the folder may be overwritten by its next run\n")


def _temp_name(name: str) -> str:
    # Hidden: the report and summary appear only when complete.
    return f".{name}.tmp"


def _is_previous_output(name: str) -> bool:
    temporary = name.startswith(".") and name.endswith(".tmp")
    return name in (REPORT, SUMMARY) or name.endswith((".tar", ".tar.idx", TEMPORARY_SUFFIX)) or temporary


def _write_atomically(path: str, text: str) -> None:
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, _temp_name(name))
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


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
    _write_atomically(
        os.path.join(out_dir, REPORT), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in tally.report)
    )
    _write_atomically(os.path.join(out_dir, SUMMARY), json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
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
