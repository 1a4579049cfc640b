"""The two input readers of tools/prepare_data.py: a LLaVA JSON list and chat-messages JSONL.

Each reader yields one Entry per input sample, converted to megavl's record
(a Candidate) and checked for damaged text and structure, or carrying the
SampleError that makes it unusable. The formats are described in
megavl/datasets/prepare.py.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from megavl.data.tokenizer import IMAGE_PLACEHOLDER
from megavl.datasets.prepare_checks import Candidate, PrepareError, SampleError, check_structure, check_text

FORMATS = ("llava", "messages")
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
ROLES = ("user", "assistant", "system")


@dataclass
class Entry:
    """One input sample: where it came from, and either a candidate or why it is unusable."""

    where: dict  # {"index": i} or {"line": n}, as written in the report
    position: int  # 0-based; gives the key
    id: Any = None
    candidate: Optional[Candidate] = None
    error: Optional[SampleError] = None


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
