"""What is evaluated: one item per answer of a record, read straight from a dataset's shards.

An item is a prompt (the record's messages up to the question, earlier answers as the
record gives them) and the reference answer. Items are grouped for reporting by the
record's ``task`` (reading split by ``language``, as English and Arabic reading are
different skills); a record without a task is in group ``other``.

Records are read in shard order from the energon-prepared folder (its
``.nv-meta/split.yaml`` lists the shards), so every process sees the same items in the
same order and can take its share by index.
"""

from __future__ import annotations

import copy
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator, Optional

import yaml

from megavl.datasets.energon_meta import META_DIR

GROUP_ORDER = ("counting", "reading_en", "reading_ar", "pointing", "boxes", "multi_qa", "multi_image")


@dataclass
class EvalItem:
    key: str  # record id, with "#turn" when the record has several answers
    group: str
    prompt: dict  # the record, its conversations cut before the answer
    members: dict  # the record's image members (extension -> bytes)
    reference: str
    target_box: Optional[list] = None


def _split_shards(path: str, split: Optional[str]) -> tuple[list[str], set[str]]:
    """(the split part's shard paths, in order, and the excluded "shard" / "shard/key" names),
    as energon reads split.yaml: shard names may be brace patterns (shard-{000000..000003}.tar)."""
    from braceexpand import braceexpand

    meta = os.path.join(path, META_DIR, "split.yaml")
    if not os.path.isfile(meta):
        raise FileNotFoundError(
            f"{path!r} is not a prepared dataset folder: no {META_DIR}/split.yaml "
            "(tools/prepare_data.py and tools/make_synthetic_data.py write one)"
        )
    with open(meta, encoding="utf-8") as f:
        description = yaml.safe_load(f) or {}
    parts = description.get("split_parts") or {}
    if not parts:
        raise ValueError(f"{meta}: no split_parts")
    if split is None:
        if len(parts) != 1:
            raise ValueError(f"{meta} has split parts {sorted(parts)}: name one")
        split = next(iter(parts))
    if split not in parts:
        raise ValueError(f"{meta} has no split part {split!r}; it has {sorted(parts)}")
    names = [name for pattern in parts[split] for name in braceexpand(pattern)]
    return names, set(description.get("exclude") or [])


def read_records(path: str, split: Optional[str] = None) -> Iterator[tuple[str, dict]]:
    """(key, {extension: bytes}) of every record in the folder's shards, in order."""
    names, excluded = _split_shards(path, split)
    for name in names:
        if name in excluded:
            continue
        for key, members in _shard_records(os.path.join(path, name)):
            if f"{name}/{key}" not in excluded:
                yield key, members


def _shard_records(shard: str) -> Iterator[tuple[str, dict]]:
    # WebDataset's grouping: consecutive members whose names share the part before the first dot.
    with tarfile.open(shard) as tar:
        key, members = None, {}
        for member in tar:
            if not member.isfile():
                continue
            stem, _, extension = os.path.basename(member.name).partition(".")
            if stem != key:
                if key is not None:
                    yield key, members
                key, members = stem, {}
            members[extension] = tar.extractfile(member).read()
        if key is not None:
            yield key, members


def group_of(record: dict) -> str:
    task = str(record.get("task") or "other")
    if task == "reading":
        return f"reading_{record.get('language', 'en')}"
    return task


def items_of(key: str, record: dict, members: dict) -> list[EvalItem]:
    """One item per assistant message: the messages before it are the prompt."""
    messages = record.get("conversations") or []
    answers = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    boxes = record.get("target_boxes") or []
    images = {ext: data for ext, data in members.items() if ext != "json"}
    items = []
    for turn, index in enumerate(answers):
        if index == 0 or messages[index - 1].get("role") != "user":
            continue  # an answer to no question has no prompt to ask
        prompt = copy.deepcopy(record)
        prompt["conversations"] = messages[:index]
        items.append(EvalItem(
            key=f"{key}#{turn}" if len(answers) > 1 else key,
            group=group_of(record),
            prompt=prompt,
            members=images,
            reference=messages[index]["content"],
            target_box=boxes[turn] if turn < len(boxes) else None,
        ))
    return items


def load_items(path: str, limit: Optional[int] = None, split: Optional[str] = None) -> list[EvalItem]:
    """The items of the first ``limit`` records (all when None) of the folder."""
    items = []
    for count, (key, members) in enumerate(read_records(path, split)):
        if limit is not None and count >= limit:
            break
        try:
            record = json.loads(members["json"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: record {key!r} has no readable .json member ({e})") from None
        items += items_of(str(record.get("id", key)), record, members)
    return items


def ordered_groups(items: list[EvalItem]) -> list[str]:
    """The groups present, the corpus's known ones first in a fixed order (every process
    derives the same list from the same items)."""
    present = {item.group for item in items}
    return [g for g in GROUP_ORDER if g in present] + sorted(present - set(GROUP_ORDER))


def prompt_item(prompt: str, image_paths: list[str], key: str = "prompt") -> EvalItem:
    """An item (with no reference answer) for a question about image files: each image goes
    where the prompt has an ``<image>``, or all of them before the text when it has none."""
    import io

    from PIL import Image

    from megavl.data.tokenizer import IMAGE_PLACEHOLDER

    members = {}
    for i, path in enumerate(image_paths):
        with open(path, "rb") as f:
            data = f.read()
        extension = os.path.splitext(path)[1].lower().lstrip(".")
        if extension not in ("png", "jpg", "jpeg"):
            # The record decoder reads PNG and JPEG members; anything Pillow opens is re-encoded.
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
            except Exception as e:  # noqa: BLE001 - Pillow raises many kinds
                raise ValueError(f"--image {path}: not an image Pillow can read ({e})") from None
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            data, extension = buffer.getvalue(), "png"
        members[f"img{i}.{extension}"] = data
    placeholders = prompt.count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(image_paths):
        raise ValueError(f"the prompt has {placeholders} {IMAGE_PLACEHOLDER} but {len(image_paths)} --image files")
    content = prompt if placeholders else (IMAGE_PLACEHOLDER + "\n") * len(image_paths) + prompt
    record = {"id": key, "conversations": [{"role": "user", "content": content}]}
    return EvalItem(key=key, group="other", prompt=record, members=members, reference="")
